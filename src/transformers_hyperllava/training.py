"""Two-stage HyperLLaVA training with the Transformers `Trainer` (`hyperllava-train`).

Stages (paper §4.1, docs/training.md): `align` trains the projector and the visual expert on captions; `instruct` adds
the LLM and the language expert; `experts` is the parameter-efficient variant (LLM frozen). LoRA on the LLM goes
through PEFT (`--lora_r`). Everything else (bf16, activation checkpointing, DDP/FSDP/DeepSpeed through `accelerate
launch` or `torchrun`, `--resume_from_checkpoint`, `--push_to_hub`) is the Trainer's own. See docs/training.md.
"""

import functools
import json
import logging
import os
import shutil
import sys
from contextlib import contextmanager
from dataclasses import dataclass, field
from pathlib import Path

import torch
import yaml
from huggingface_hub import HfApi
from huggingface_hub.utils import HFValidationError, validate_repo_id
from safetensors.torch import load_file, save_file
from torch.nn.modules.utils import consume_prefix_in_state_dict_if_present
from transformers import AutoConfig, HfArgumentParser, Trainer, TrainingArguments, set_seed
from transformers.tokenization_utils_base import ADDED_TOKENS_FILE, SPECIAL_TOKENS_MAP_FILE, TOKENIZER_CONFIG_FILE
from transformers.trainer_pt_utils import LabelSmoother
from transformers.trainer_utils import get_last_checkpoint
from transformers.utils import (
    CHAT_TEMPLATE_FILE,
    CONFIG_NAME,
    GENERATION_CONFIG_NAME,
    IMAGE_PROCESSOR_NAME,
    LEGACY_PROCESSOR_CHAT_TEMPLATE_FILE,
    PROCESSOR_NAME,
    SAFE_WEIGHTS_INDEX_NAME,
)

from .data import LlavaDataCollator, LlavaJsonDataset
from .files import replaced_when_done, stop_signals_interrupt
from .modeling_hyperllava import HyperLlavaForConditionalGeneration
from .processing_hyperllava import CHAT_TEMPLATE, HyperLlavaProcessor

logger = logging.getLogger(__name__)

# Which parameter groups each stage trains; the vision tower is never trained (LLaVA-1.5's recipe).
STAGES = {
    "align": ("projector", "visual_expert"),
    "instruct": ("projector", "visual_expert", "llm", "language_expert"),
    "experts": ("projector", "visual_expert", "language_expert"),
}
# The paper's learning rates (stage 1: 1e-3, stage 2: 2e-5); `experts` trains only small new modules, for which
# LLaVA's LoRA recipe uses 2e-4 (our choice, the paper has no such stage).
LEARNING_RATES = {"align": 1e-3, "instruct": 2e-5, "experts": 2e-4}
# The file stage 1 writes: the projector and visual-expert weights it trained, with the model's names.
PROJECTOR_FILE = "mm_projector.safetensors"
# What a loader reads from a model folder, the processor's files too. A save replaces those of an earlier one in the
# same folder (left, they would be read with the new ones: another run's chat_template.json, which Transformers prefers
# to the chat_template.jinja saved now, or LoRA's adapter on top of merged weights). With --push_to_hub the Trainer's
# push at each checkpoint copies the checkpoint's such files into --output_dir (and uploads them); those that the
# stage's own save does not write are removed, there and on the Hub (stage align's whole model beside its projector).
MODEL_FILES = (
    CONFIG_NAME,
    GENERATION_CONFIG_NAME,
    "model*.safetensors*",
    "pytorch_model*.bin*",
    "adapter_*",
    PROCESSOR_NAME,
    IMAGE_PROCESSOR_NAME,
    CHAT_TEMPLATE_FILE,
    LEGACY_PROCESSOR_CHAT_TEMPLATE_FILE,
    TOKENIZER_CONFIG_FILE,
    SPECIAL_TOKENS_MAP_FILE,
    ADDED_TOKENS_FILE,
    "tokenizer.json",  # (the fast and the SentencePiece tokenizers' own files, which Transformers names per class)
    "tokenizer.model",
)
LORA_TARGETS = r".*language_model\.layers\.\d+\.(self_attn\.(q|k|v|o)_proj|mlp\.(gate|up|down)_proj)"


def parameter_group(name: str) -> str:
    """The group of a parameter name: vision_tower, projector, visual_expert, llm, language_expert or lora."""
    # PEFT's wrapper, and its trained copy of a module in `modules_to_save` (the copy's frozen original, under
    # `original_module`, falls in the same group).
    name = name.removeprefix("base_model.model.").replace(".modules_to_save.default.", ".")
    if "lora_" in name:
        return "lora"
    if "multi_modal_projector.visual_expert" in name:
        return "visual_expert"
    if "multi_modal_projector." in name:
        return "projector"
    if "language_model.language_expert." in name:
        return "language_expert"
    if "vision_tower." in name:
        return "vision_tower"
    return "llm"  # the decoder layers, embeddings, final norm and lm_head


def trainable_counts(model) -> dict[str, int]:
    """Trainable parameters by group."""
    counts = {}
    for name, param in model.named_parameters():
        if param.requires_grad:
            group = parameter_group(name)
            counts[group] = counts.get(group, 0) + param.numel()
    return counts


def apply_stage(model, stage: str) -> dict[str, int]:
    """Set `requires_grad` for `stage` (before `add_lora`, which sets its own); returns trainable counts."""
    if stage not in STAGES:
        raise ValueError(f"stage={stage!r} is not valid; allowed values: {list(STAGES)}")
    if getattr(model, "peft_config", None):  # a PeftModel, or adapters added with Transformers' `add_adapter`
        # The stage's groups would overrule PEFT's own choice: LoRA's matrices frozen, the weights they wrap trained.
        raise ValueError(
            "the stages set requires_grad on a model before PEFT wraps it, but this one has PEFT adapters "
            f"({', '.join(model.peft_config)}), whose choice of trained parameters the stage would undo: pass the "
            "unwrapped model with lora=(r, alpha, dropout), or train a model with a LoraConfig of your own in a "
            "Trainer of your own (docs/training.md)"
        )
    for name, param in model.named_parameters():
        param.requires_grad_(parameter_group(name) in STAGES[stage])
    return trainable_counts(model)


def add_lora(model, stage: str, r: int, alpha: int, dropout: float):
    """Wrap `model` with PEFT LoRA adapters on the LLM's linear layers; the LLM's own weights stay frozen."""
    if stage == "align":
        raise ValueError("LoRA adapts the LLM, which the align stage does not train: use --stage instruct or experts")
    from peft import LoraConfig, get_peft_model

    # Beside the adapters train the stage's other groups, never the LLM itself: the projector, the visual expert
    # (inside the projector) and the language expert, as PEFT's `modules_to_save`. PEFT then trains copies of them and
    # saves those with the adapters in every checkpoint, so that resuming or loading the best checkpoint restores them
    # (trained only through `requires_grad`, they were left out and silently reset); `merge_and_unload` puts the
    # trained copies in place.
    trained = ["multi_modal_projector", "language_expert"]
    config = LoraConfig(
        r=r, lora_alpha=alpha, lora_dropout=dropout, target_modules=LORA_TARGETS, modules_to_save=trained
    )
    return get_peft_model(model, config)


def save_trained_weights(state_dict: dict, model, path):
    """Write the weights `model` trains (from the full, gathered `state_dict`) to a safetensors file."""
    trained = {name for name, param in model.named_parameters() if param.requires_grad}
    missing = sorted(trained - state_dict.keys())
    if missing:
        raise ValueError(f"the state dict to save {path} from has no weights named {missing[:3]} (of {len(missing)})")
    tensors = {name: tensor.contiguous() for name, tensor in state_dict.items() if name in trained}
    with replaced_when_done(path) as partial:
        save_file(tensors, partial, metadata={"format": "pt"})


def load_trained_weights(model, path):
    """Load stage 1's projector + visual-expert file into `model`, refusing anything that does not fit exactly."""
    try:
        state = load_file(path)
    except Exception as error:  # not a safetensors file (LLaVA's own mm_projector.bin is a pickle), or missing
        raise ValueError(
            f"--pretrained_projector {path}: cannot read it as safetensors ({error}); it takes the "
            f"{PROJECTOR_FILE} that stage 1 (--stage align) writes"
        ) from error
    if not state:  # (as a compiled stage 1 wrote it before this was fixed)
        raise ValueError(f"--pretrained_projector {path} holds no tensors: run stage 1 (--stage align) again")
    wrong = [name for name in state if parameter_group(name) not in STAGES["align"]]
    if wrong:
        raise ValueError(f"{path}: expected only projector and visual-expert weights, found {wrong[:5]}")
    wanted = {name for name, _ in model.named_parameters() if parameter_group(name) in STAGES["align"]}
    missing = sorted(wanted - state.keys())
    if missing:
        raise ValueError(
            f"{path} has no weights for {missing[:5]}: was stage 1 run with the same model config (visual_expert, "
            f"expert sizes)?"
        )
    try:
        _, unexpected = model.load_state_dict(state, strict=False)
    except RuntimeError as error:  # PyTorch names each misshapen weight with both shapes
        raise ValueError(
            f"--pretrained_projector {path} does not fit the model (was stage 1 run with the same config: "
            f"visual_expert, expert sizes?): {error}"
        ) from error
    if unexpected:
        raise ValueError(f"{path}: weights the model does not have: {unexpected[:5]}")


@dataclass
class ModelArguments:
    model_name_or_path: str = field(
        metadata={"help": "A HyperLLaVA checkpoint, or a LLaVA one (upgraded on the fly with from_llava)"}
    )
    processor_name_or_path: str | None = field(default=None, metadata={"help": "Defaults to model_name_or_path"})
    pretrained_projector: str | None = field(
        default=None, metadata={"help": f"Stage 1's {PROJECTOR_FILE}, loaded over the model's projector/visual expert"}
    )
    hyperllava_config: str | None = field(
        default=None,
        metadata={
            "help": 'JSON of HyperLLaVA config fields for a LLaVA checkpoint, e.g. \'{"visual_expert": "both"}\''
        },
    )
    lora_r: int = field(default=0, metadata={"help": "LoRA rank on the LLM (0: no LoRA)"})
    lora_alpha: int = field(default=16)
    lora_dropout: float = field(default=0.05)

    def __post_init__(self):
        # Checked before anything loads (PEFT would refuse a negative rank only once the model is built).
        if self.lora_r < 0:
            raise ValueError(f"--lora_r must be 0 (no LoRA) or a positive rank, got {self.lora_r}")
        if self.lora_r and self.lora_alpha <= 0:
            # LoRA scales its update by lora_alpha / lora_r: at 0 the adapters would train and change nothing.
            raise ValueError(f"--lora_alpha must be positive, got {self.lora_alpha}")


@dataclass
class DataArguments:
    data_path: str = field(metadata={"help": "LLaVA-format JSON (or JSON Lines) file"})
    eval_data_path: str | None = field(
        default=None, metadata={"help": "Evaluation samples in the same format (with --eval_strategy steps or epoch)"}
    )
    image_folder: str | None = field(
        default=None, metadata={"help": "Folder the samples' image names are relative to"}
    )
    max_length: int = field(default=2048, metadata={"help": "Samples are truncated to this many tokens"})


@dataclass
class HyperLlavaTrainingArguments(TrainingArguments):
    """TrainingArguments with the paper's optimiser defaults: AdamW (0.9, 0.999), eps 1e-8, no weight decay
    (the Trainer's own defaults), cosine schedule with 3% warm-up, and the stage's learning rate."""

    stage: str = field(default="instruct", metadata={"help": "align, instruct or experts", "choices": list(STAGES)})
    learning_rate: float | None = field(
        default=None, metadata={"help": "Defaults to 1e-3 (align), 2e-5 (instruct), 2e-4 (experts)"}
    )
    lr_scheduler_type: str = field(default="cosine")
    warmup_steps: float = field(default=0.03, metadata={"help": "Steps, or a fraction (< 1) of all steps"})
    # The samples hold only model inputs, and the collator builds exactly the model's inputs: nothing to filter.
    remove_unused_columns: bool = field(default=False)

    def __post_init__(self):
        if self.stage not in STAGES:
            raise ValueError(f"stage={self.stage!r} is not valid; allowed values: {list(STAGES)}")
        if self.learning_rate is None:
            self.learning_rate = LEARNING_RATES[self.stage]
        if self.train_sampling_strategy in ("group_by_length", "batch_rebalance"):
            # The Trainer would measure each sample by the processor's first input, here `pixel_values` (its number of
            # images; a text-only sample has none and fails), after reading every sample, images included.
            raise ValueError(
                f"--train_sampling_strategy {self.train_sampling_strategy} is not supported: the Trainer measures "
                "samples by the processor's first input, which is the images here. Use random (the default) or "
                "sequential"
            )
        super().__post_init__()


def hyperllava_config_overrides(value) -> dict:
    """--hyperllava_config: a JSON object on the command line, or a mapping in a YAML/JSON arguments file."""
    if not value:
        return {}
    try:
        overrides = value if isinstance(value, dict) else json.loads(value)
    except json.JSONDecodeError as error:
        raise ValueError(f"--hyperllava_config is not valid JSON ({error}): {value!r}") from error
    if not isinstance(overrides, dict):
        raise ValueError(f"--hyperllava_config must be a JSON object of config fields, got {value!r}")
    return overrides


def check_model_folder(model_args: ModelArguments):
    """A mistyped folder, or stage 1's output given as the model: Transformers would report the one as a malformed Hub
    id and the other as a folder without a processor."""
    for option in ("model_name_or_path", "processor_name_or_path"):
        name = getattr(model_args, option)
        if name is None or Path(name).is_dir():
            continue
        try:
            validate_repo_id(name)
        except HFValidationError:
            raise ValueError(f"--{option} {name}: not a folder, and not a Hub repo id") from None
    folder = Path(model_args.model_name_or_path)
    if (folder / PROJECTOR_FILE).is_file() and not (folder / "config.json").is_file():
        raise ValueError(
            f"--model_name_or_path {folder} holds stage 1's {PROJECTOR_FILE} only: pass it as --pretrained_projector "
            f"{folder / PROJECTOR_FILE}, with the model stage 1 started from as --model_name_or_path"
        )


def check_output_dir(args: HyperLlavaTrainingArguments):
    """Refuses an --output_dir where this run's files would mix with an earlier run's (unless it resumes that run)."""
    if args.resume_from_checkpoint or not os.path.isdir(args.output_dir):
        return
    checkpoint = get_last_checkpoint(args.output_dir)
    if checkpoint is not None:  # the Trainer would save this run's checkpoints into those folders, beside their files
        raise ValueError(
            f"--output_dir {args.output_dir} holds checkpoints of an earlier run ({Path(checkpoint).name}): resume "
            "it with --resume_from_checkpoint true, or give another --output_dir"
        )
    if args.stage == "align" and (Path(args.output_dir) / CONFIG_NAME).is_file():
        raise ValueError(
            f"--output_dir {args.output_dir} holds a model (config.json): stage align saves only {PROJECTOR_FILE}, "
            "and whoever loads the folder would read that model instead; give another --output_dir"
        )


def check_resume(resume, output_dir, lora):
    """A checkpoint resumes the run that saved it: with LoRA of the same rank and alpha (its adapter_config.json), or
    without. Else the Trainer fails on the files it misses, or PEFT on the shapes, without saying why."""
    if str(resume).lower() == "true":  # the last checkpoint in --output_dir
        resume = get_last_checkpoint(output_dir) if os.path.isdir(output_dir) else None
    if not resume or not os.path.isdir(resume):  # no checkpoint there: the Trainer says so
        return
    adapter = Path(resume) / "adapter_config.json"
    if adapter.is_file() != bool(lora):
        saved = "with LoRA (it holds adapter_config.json)" if adapter.is_file() else "without LoRA"
        given = "with --lora_r" if lora else "without --lora_r"
        raise ValueError(
            f"--resume_from_checkpoint {resume} was saved {saved}: resume it as it was trained, not {given}"
        )
    if lora:
        try:
            saved = json.loads(adapter.read_text(encoding="utf-8"))
        except (ValueError, RecursionError) as error:  # (not JSON or not UTF-8; nested too deeply)
            raise ValueError(f"--resume_from_checkpoint {resume}: cannot read {adapter}: {error}") from error
        if not isinstance(saved, dict):
            raise ValueError(
                f"--resume_from_checkpoint {resume}: {adapter} must hold a JSON object, got {type(saved).__name__}"
            )
        if (saved.get("r"), saved.get("lora_alpha")) != lora[:2]:
            raise ValueError(
                f"--resume_from_checkpoint {resume} was saved with --lora_r {saved.get('r')} --lora_alpha "
                f"{saved.get('lora_alpha')}; this run has --lora_r {lora[0]} --lora_alpha {lora[1]}"
            )


def load_model(model_args: ModelArguments):
    """The model to train; a half-precision checkpoint is trained in float32 master weights (`--bf16` autocasts)."""
    config = AutoConfig.from_pretrained(model_args.model_name_or_path)
    overrides = hyperllava_config_overrides(model_args.hyperllava_config)
    if config.model_type == "hyperllava":
        if overrides:
            raise ValueError("--hyperllava_config applies to LLaVA checkpoints; this one is already HyperLLaVA")
        model = HyperLlavaForConditionalGeneration.from_pretrained(model_args.model_name_or_path)
    elif config.model_type == "llava":
        model = HyperLlavaForConditionalGeneration.from_llava(model_args.model_name_or_path, **overrides)
    else:
        raise ValueError(
            f"{model_args.model_name_or_path}: model_type {config.model_type!r} is neither hyperllava nor llava"
        )
    if any(param.dtype in (torch.float16, torch.bfloat16) for param in model.parameters()):
        model.float()  # updates at lr 2e-5 would round away in half-precision weights
    if model_args.pretrained_projector:
        load_trained_weights(model, model_args.pretrained_projector)
    return model


def check_processor_fits(processor, config, model_args: ModelArguments):
    """A processor from another model (--processor_name_or_path) would give the token ids another meaning."""
    tokenizer, vocab_size = processor.tokenizer, config.text_config.vocab_size
    image_token_id = tokenizer.convert_tokens_to_ids(processor.image_token)
    if len(tokenizer) > vocab_size or image_token_id != config.image_token_id:
        raise ValueError(
            f"the processor of {model_args.processor_name_or_path or model_args.model_name_or_path} does not fit the "
            f"model {model_args.model_name_or_path}: its tokenizer has {len(tokenizer)} tokens and "
            f"{processor.image_token} = {image_token_id}; the model has {vocab_size} token embeddings and "
            f"image_token_id = {config.image_token_id}"
        )


def load_processor(path):
    """The processor of a HyperLLaVA or LLaVA folder as a `HyperLlavaProcessor` with LLaVA-1.5's vicuna_v1 template,
    whose `{% generation %}` block marks the supervised answers (a llava-hf template has none)."""
    processor = HyperLlavaProcessor.from_pretrained(path)
    processor.chat_template = CHAT_TEMPLATE
    return processor


def build_trainer(
    model, processor, dataset, args: HyperLlavaTrainingArguments, lora=None, eval_dataset=None
) -> Trainer:
    """A Trainer for `args.stage`: parameters frozen per the stage (plus LoRA when `lora` = (r, alpha, dropout))."""
    apply_stage(model, args.stage)
    if lora is not None:
        model = add_lora(model, args.stage, *lora)
    counts = trainable_counts(model)
    total = sum(p.numel() for p in model.parameters())
    if args.process_index == 0:
        # A warning, so that the Trainer's default log level (which hides info) still shows it.
        logger.warning(
            "Stage %s: %s trainable parameters of %s (%.2f%%); by group: %s",
            args.stage,
            f"{sum(counts.values()):,}",
            f"{total:,}",
            100 * sum(counts.values()) / total,
            counts,
        )
    if args.gradient_checkpointing:
        # With a frozen embedding nothing before the first checkpointed layer needs a gradient; this keeps one.
        model.enable_input_require_grads()
    text_only = getattr(dataset, "text_only_ids", [])
    if args.stage == "align" and text_only:  # (a batch of them would have no gradient at all: a failed backward)
        raise ValueError(
            f"stage align trains only what the images reach (the projector and the visual expert), but "
            f"{len(text_only)} sample(s) have no image, e.g. {text_only[:3]}: leave them out of stage 1's data"
        )
    if args.ddp_find_unused_parameters is None and text_only:
        # A process whose batch has no image computes no gradient for the projector and the visual expert. Under
        # activation checkpointing the Trainer tells DDP that every parameter gets one, and DDP would wait for them
        # for ever. (The LLaVA codebase runs its projector on a blank image for them and uses none of its features.)
        args.ddp_find_unused_parameters = True
    # The Trainer's label smoothing shifts the labels only for the causal LMs it knows, not LLaVA-like models: each
    # token would be scored against itself instead of the next one.
    smoothing = args.label_smoothing_factor
    return Trainer(
        model=model,
        args=args,
        train_dataset=dataset,
        eval_dataset=eval_dataset,
        data_collator=LlavaDataCollator(processor.tokenizer.pad_token_id),
        processing_class=processor,
        compute_loss_func=functools.partial(LabelSmoother(smoothing), shift_labels=True) if smoothing else None,
    )


@contextmanager
def staged_save(folder: Path, writer=True):
    """Yields a staging folder inside `folder` for `save_pretrained` calls; their files replace `folder`'s model files
    when the block completes. Saved in place, an interrupted save could leave a folder that loads a mix of two runs:
    Transformers writes the config first and removes the old shards before the new ones exist. The staging path is the
    same on every process (all take part in gathering sharded weights); those that write (`writer`) also move."""
    staging, aside = folder / ".saving", folder / ".previous"
    if writer:
        for leftover in (staging, aside):  # an earlier save's, stopped outright (SIGKILL, a power cut)
            shutil.rmtree(leftover, ignore_errors=True)
    try:
        yield staging
    except BaseException:
        if writer:
            shutil.rmtree(staging, ignore_errors=True)
        raise
    if not writer:
        return
    # The previous save's files (an earlier, larger save's extra shards included: the new index would not name them)
    # are moved aside, then the new ones in; on any error or Ctrl-C between two moves, the new ones are moved out and
    # the old ones back, so that the folder holds one save or the other. What `from_pretrained` reads first leaves
    # first and comes in last: a save stopped outright half-way leaves a folder that does not load, rather than a mix.
    new = sorted((path.name for path in staging.iterdir()), key=read_first_last)
    old = {path.name for pattern in MODEL_FILES for path in folder.glob(pattern)}
    old = sorted(old | {name for name in new if (folder / name).exists()}, key=read_first_last, reverse=True)
    aside.mkdir()
    moved_aside, moved_in = [], []
    try:
        for name in old:
            os.replace(folder / name, aside / name)
            moved_aside.append(name)
        for name in new:
            os.replace(staging / name, folder / name)
            moved_in.append(name)
    except BaseException:
        for name in reversed(moved_in):
            os.replace(folder / name, staging / name)
        for name in reversed(moved_aside):
            os.replace(aside / name, folder / name)
        shutil.rmtree(staging)
        aside.rmdir()
        raise
    shutil.rmtree(aside)
    staging.rmdir()


def read_first_last(name):
    """Sorts what `from_pretrained` reads first, the config and then the weights' index, last."""
    return name == CONFIG_NAME, name == SAFE_WEIGHTS_INDEX_NAME


def remove_model_files(folder: Path, keep):
    """Removes `folder`'s MODEL_FILES but those named in `keep`."""
    for pattern in MODEL_FILES:
        for path in folder.glob(pattern):
            if path.name not in keep:
                path.unlink()


def save_stage(trainer: Trainer, processor, output_dir):
    """Stage align: the trained projector + visual expert only. Others: a Hub-format folder with the processor."""
    # The processes that write: the main one, or one per node with --save_on_each_node (as `Trainer.save_model`).
    args, model, writer = trainer.args, trainer.model, trainer.args.should_save
    if args.stage == "align":
        # Gathered from every rank under FSDP / ZeRO-3. With --torch_compile the wrapped model is the compiled module,
        # whose state dict prefixes every name with `_orig_mod.`.
        state_dict = trainer.accelerator.get_state_dict(trainer.model_wrapped)
        consume_prefix_in_state_dict_if_present(state_dict, "_orig_mod.")
        if writer:
            Path(output_dir).mkdir(parents=True, exist_ok=True)
            save_trained_weights(state_dict, model, Path(output_dir) / PROJECTOR_FILE)
            if args.push_to_hub:  # what the Trainer's checkpoint pushes copied there: not this stage's product
                remove_model_files(Path(output_dir), keep=())
        return
    with staged_save(Path(output_dir), writer) as staging:
        if hasattr(model, "merge_and_unload"):  # LoRA: fold the adapters into the LLM's weights
            if writer:
                model.merge_and_unload().save_pretrained(staging)
        else:
            # (As an internal call: with --push_to_hub the Trainer would upload --output_dir, as yet without this save.
            # `main` uploads the finished folder.)
            trainer.save_model(staging, _internal_call=True)
        if writer:
            processor.save_pretrained(staging)


def parse_arguments(argv):
    """The command line, or a single .json / .yaml file of the same arguments."""
    parser = HfArgumentParser((ModelArguments, DataArguments, HyperLlavaTrainingArguments))
    if not (len(argv) == 1 and argv[0].endswith((".json", ".yaml", ".yml"))):
        return parser.parse_args_into_dataclasses(argv)
    path = argv[0]
    try:
        with open(path, encoding="utf-8") as file:  # (a file, not its text: PyYAML's syntax errors then name it)
            settings = json.load(file) if path.endswith(".json") else yaml.safe_load(file)
    except json.JSONDecodeError as error:
        raise ValueError(f"{path}: invalid JSON: {error}") from error
    except UnicodeDecodeError as error:
        raise ValueError(f"{path}: not UTF-8 text (byte {error.start}): re-encode it") from error
    except RecursionError as error:  # (a damaged or hostile file: the JSON and YAML readers recurse per level)
        raise ValueError(f"{path}: nested too deeply to read ({error})") from error
    if not isinstance(settings, dict):
        got = "nothing" if settings is None else f"a {type(settings).__name__}"
        hint = " (a data file? pass it as --data_path)" if isinstance(settings, list) else ""
        raise ValueError(f"{path}: an arguments file maps argument names to values; this one holds {got}{hint}")
    # The values go to the dataclasses as they are, unchecked. PyYAML reads YAML 1.1, where `2e-5` and `2e3` (no dot)
    # are strings, which would reach, say, the learning rate as one: a number argument's string is read as a number,
    # and a whole-number argument's value must be whole.
    numbers = {action.dest: action.type for action in parser._actions if action.type in (float, int)}
    for key, value in settings.items():
        kind = numbers.get(key)
        if kind is None or isinstance(value, bool) or not isinstance(value, (str, float)):
            continue
        try:
            number = float(value)
        except ValueError:
            raise ValueError(f"{path}: {key} must be a number, got {value!r}") from None
        if kind is int and not number.is_integer():
            raise ValueError(f"{path}: {key} must be a whole number, got {value!r}")
        settings[key] = int(number) if kind is int else number
    return parser.parse_dict(settings)


# A job's time limit (SIGTERM) or a closed terminal (SIGHUP) leaves no partial output either, as Ctrl-C does.
@stop_signals_interrupt()
def main(argv=None):
    model_args, data_args, args = parse_arguments(sys.argv[1:] if argv is None else argv)
    logging.basicConfig(format="%(asctime)s %(levelname)s %(name)s: %(message)s", level=args.get_process_log_level())

    lora = (model_args.lora_r, model_args.lora_alpha, model_args.lora_dropout) if model_args.lora_r else None
    if lora and (args.fsdp or args.deepspeed):
        # The LoRA weights are merged into the LLM on save, on one process: sharded parameters would save partial.
        raise ValueError("--lora_r is not supported with --fsdp or --deepspeed; use DDP, or train without LoRA")
    check_model_folder(model_args)
    check_output_dir(args)
    check_resume(args.resume_from_checkpoint, args.output_dir, lora)
    processor = load_processor(model_args.processor_name_or_path or model_args.model_name_or_path)
    check_processor_fits(processor, AutoConfig.from_pretrained(model_args.model_name_or_path), model_args)
    # The data is checked before the model loads (minutes at 7B), so that a bad sample is named at once.
    dataset = LlavaJsonDataset(data_args.data_path, processor, data_args.image_folder, data_args.max_length)
    eval_dataset = None
    if data_args.eval_data_path:
        eval_dataset = LlavaJsonDataset(
            data_args.eval_data_path, processor, data_args.image_folder, data_args.max_length
        )
    # Seeded before anything random is drawn, as Transformers' example scripts do: the experts added to a LLaVA
    # checkpoint and LoRA's matrices are drawn before the Trainer seeds (with --seed alone, each run would differ).
    set_seed(args.seed)
    model = load_model(model_args)
    trainer = build_trainer(model, processor, dataset, args, lora, eval_dataset)
    # A checkpoint folder, or "true" for the last one in --output_dir (what the Trainer does with True).
    resume = args.resume_from_checkpoint
    trainer.train(resume_from_checkpoint=True if str(resume).lower() == "true" else resume)
    if dataset.num_dropped and args.process_index == 0:
        # This process's record, its dataloader workers' drops included (other DDP processes keep their own).
        logger.warning("%d sample(s) were dropped for max_length=%d", dataset.num_dropped, data_args.max_length)
    save_stage(trainer, processor, args.output_dir)
    if args.push_to_hub and trainer.is_world_process_zero():
        # The folder as save_stage wrote it (Trainer.push_to_hub would save the whole, unmerged model again), after the
        # Trainer's last checkpoint push, which would otherwise land on top of it.
        trainer._finish_current_push()
        api = HfApi(token=args.hub_token)
        repo = api.create_repo(
            args.hub_model_id or Path(args.output_dir).name, private=args.hub_private_repo, exist_ok=True
        )
        api.upload_folder(
            repo_id=repo.repo_id,
            folder_path=args.output_dir,
            ignore_patterns=["checkpoint-*", "runs/*"],
            delete_patterns=list(MODEL_FILES),  # (those the checkpoint pushes uploaded and this folder no longer has)
        )
    # Every process waits for the save, then leaves the process group: a gloo process that exits with it still open
    # can abort ("terminate called without an active exception") and fail the whole launch. The DDP wrapper is freed
    # first: freed later (at exit), its reducer drops the last reference to the gloo group while holding the GIL, and
    # the group's destructor waits for a gloo thread that needs the GIL: a hang (pytorch/pytorch#56297).
    trainer.accelerator.wait_for_everyone()
    trainer.model_wrapped = trainer.model
    trainer.accelerator.free_memory()
    trainer.accelerator.end_training()


if __name__ == "__main__":
    main()
