"""Convert a LLaVA-1.5 / HyperLLaVA training checkpoint to a Hub-ready HyperLLaVA folder, and optionally push it.

The output folder loads with `AutoModelForImageTextToText.from_pretrained(folder_or_repo, trust_remote_code=True)`
(or without `trust_remote_code` where `transformers_hyperllava` is installed) and `AutoProcessor.from_pretrained`.

Inputs (`--input`), detected from `config.json`:

1. A LLaVA-codebase training run (`LlavaLlamaForCausalLM`, `mm_*` fields), weights as `pytorch_model*.bin` or
   `model*.safetensors` shards with their index. Key names: `KEY_MAPPINGS["llava_codebase"]`. HyperLLaVA trained in
   the LLaVA codebase stores its experts as `model.mm_visual_expert_first.<param>`,
   `model.mm_visual_expert_second.<param>` and `model.language_expert.<param>`, `<param>` being a
   `HyperExpert` parameter name (`encoder_weight`, `encoder_bias`, `latent`, `hyper_in.weight`, ...), and its expert
   hyperparameters in `config.json` under `HyperLlavaConfig`'s field names (`visual_expert`, ...).
2. A stage-1 output (`mm_projector.bin`, with or without the stage's `config.json`) plus `--base-model`, the LLM
   folder (`LlamaForCausalLM`) that stage 1 trained on.
3. When the checkpoint lacks the vision tower: `--vision-tower`, a CLIP folder (`CLIPModel` or `CLIPVisionModel`),
   by default the checkpoint's `mm_vision_tower` (a local folder or a Hub id, resolved through the Hub cache).
4. A Transformers LLaVA checkpoint (`llava-hf` layout, old or new key names) or a HyperLLaVA one.

Experts the input never had (a LLaVA input's, or those the expert flags add) are created the way the model
initialises them (the parts producing W_u are zero, so the converted model computes what its LLaVA base computes); an
expert that the input's config declares must be in its weights. The tokenizer gets `<image>` and a pad token when it
lacks them; the new embedding rows start at the mean of the old ones.

The work streams: one input shard is open at a time and one output shard is buffered, so a 7B/13B checkpoint
converts on an ordinary machine. Everything that can be checked before writing (configuration, key names, shapes,
readable shards) is checked first; the output is written to a temporary folder next to `--output` and renamed into
place at the end, so an error, Ctrl-C or SIGTERM leaves no half-written output.

    hyperllava-convert --input llava-v1.5-7b-hyperllava --vision-tower clip-vit-large-patch14-336 \
        --output hyperllava-7b --dtype bf16 --push-to-hub org/hyperllava-7b
"""

import argparse
import json
import os
import pickle
import re
import shlex
import sys
import zipfile
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path

import torch
import yaml
from huggingface_hub import (
    HfApi,
    ModelCard,
    ModelCardData,
    metadata_load,
    snapshot_download,
    split_torch_state_dict_into_shards,
)
from huggingface_hub.errors import StrictDataclassError
from huggingface_hub.utils import HFValidationError, validate_repo_id
from safetensors import safe_open
from safetensors.torch import save_file
from tokenizers import AddedToken
from tqdm.auto import tqdm
from transformers import (
    AutoConfig,
    AutoTokenizer,
    GenerationConfig,
    LlamaConfig,
    LlavaImageProcessorPil,
)
from transformers.dynamic_module_utils import custom_object_save
from transformers.utils import is_protobuf_available, is_sentencepiece_available

from transformers_hyperllava import HyperLlavaConfig, HyperLlavaForConditionalGeneration
from transformers_hyperllava.configuration_hyperllava import NOT_MODEL_FIELDS
from transformers_hyperllava.files import folder_replaced_when_done, stop_signals_interrupt
from transformers_hyperllava.processing_hyperllava import HyperLlavaProcessor

# Input key -> output key, per input layout: the first rule whose pattern matches the whole key wins; a `None` target
# drops the key on purpose. Adapting the converter to another naming is a change in these tables only.
KEY_MAPPINGS = {
    "llava_codebase": [  # LLaVA's LlavaLlamaForCausalLM; also a plain LlamaForCausalLM (`--base-model`)
        (r"model\.embed_tokens\.(.+)", r"model.language_model.embed_tokens.\1"),
        (r"model\.layers\.(\d+)\.self_attn\.rotary_emb\.inv_freq", None),  # recomputed from the config
        (r"model\.vision_tower\.vision_tower\.vision_model\.embeddings\.position_ids", None),  # see "clip"
        (r"model\.layers\.(\d+)\.(.+)", r"model.language_model.layers.\1.\2"),
        (r"model\.norm\.(.+)", r"model.language_model.norm.\1"),
        (r"lm_head\.(.+)", r"lm_head.\1"),
        (r"model\.mm_projector\.0\.(.+)", r"model.multi_modal_projector.linear_1.\1"),
        (r"model\.mm_projector\.2\.(.+)", r"model.multi_modal_projector.linear_2.\1"),
        (r"model\.mm_visual_expert_(first|second)\.(.+)", r"model.multi_modal_projector.visual_expert_\1.\2"),
        (r"model\.language_expert\.(.+)", r"model.language_model.language_expert.\1"),
        (r"model\.vision_tower\.vision_tower\.vision_model\.(.+)", r"model.vision_tower.\1"),
    ],
    "clip": [  # a CLIPModel or CLIPVisionModel folder: only the vision tower is kept
        # A buffer older CLIP checkpoints (openai/clip-vit-large-patch14-336) saved; now built from the config.
        (r"vision_model\.embeddings\.position_ids", None),
        (r"vision_model\.(.+)", r"model.vision_tower.\1"),
        (r"text_model\..+|text_projection\..+|visual_projection\..+|logit_scale", None),
    ],
    "llava_hf": [  # Transformers LLaVA / HyperLLaVA: v4 names (first rules) and v5 names (last rule)
        (r"language_model\.lm_head\.(.+)", r"lm_head.\1"),
        (r"language_model\.model\.(.+)", r"model.language_model.\1"),
        (r"(?:model\.)?vision_tower\.vision_model\.embeddings\.position_ids", None),  # see "clip"
        (r"(?:model\.)?vision_tower\.vision_model\.(.+)", r"model.vision_tower.\1"),
        (r"(vision_tower|multi_modal_projector)\.(.+)", r"model.\1.\2"),
        (r"(model\.(?:vision_tower|multi_modal_projector|language_model)\..+|lm_head\..+)", r"\1"),
    ],
}

# The expert modules: each that the input never had is created fresh (see `prepare`).
EXPERT_MODULES = (
    "model.multi_modal_projector.visual_expert_first",
    "model.multi_modal_projector.visual_expert_second",
    "model.language_model.language_expert",
)
VOCAB_KEYS = ("model.language_model.embed_tokens.weight", "lm_head.weight")
EXPERT_FIELDS = (
    "visual_expert",
    "language_expert_layers",
    "language_guidance_layer",
    "expert_embedding_dim",
    "expert_bottleneck_dim",
    "hypernetwork_hidden_dim",
    "expert_mode",
)
# Fields of an input Transformers config that describe the file rather than the model, or are set anew.
NOT_CARRIED_OVER = (*NOT_MODEL_FIELDS, "_name_or_path", "dtype", "torch_dtype", "image_token_id", "image_token_index")
DTYPES = {"bf16": torch.bfloat16, "fp16": torch.float16, "fp32": torch.float32}
# `mm_vision_select_feature` -> LlavaConfig.vision_feature_select_strategy
SELECT_FEATURE = {"patch": "default", "cls_patch": "full"}
# LLaVA-codebase settings this converter reproduces; anything else is refused rather than converted wrongly.
SUPPORTED_LLAVA_SETTINGS = {
    "mm_projector_type": ("mlp2x_gelu",),
    "image_aspect_ratio": ("pad", "square", None),
    "mm_patch_merge_type": ("flat", None),
    "mm_use_im_start_end": (False, None),
    "mm_vision_select_feature": (*SELECT_FEATURE, None),
}
WEIGHT_INDEXES = ("model.safetensors.index.json", "pytorch_model.bin.index.json")
WEIGHT_FILES = ("model.safetensors", "pytorch_model.bin")
WEIGHT_SHARDS = ("model-*.safetensors", "pytorch_model-*.bin")
PROJECTOR_FILES = ("mm_projector.safetensors", "mm_projector.bin")
TOKENIZER_FILES = ("tokenizer.json", "tokenizer.model", "tokenizer_config.json")
SENTENCEPIECE_PACKAGES = {"sentencepiece": is_sentencepiece_available, "protobuf": is_protobuf_available}


class ConversionError(Exception):
    """A problem with the inputs or settings, reported to the user without a traceback."""


# ----------------------------------------------------------------------------------------------------------------
# Reading weights


def find_weight_files(path: Path) -> list[Path]:
    """The weight files of a checkpoint folder (or the file itself), in the order their keys are streamed."""
    if path.is_file():
        return [path]
    for name in WEIGHT_INDEXES:
        if (path / name).is_file():
            weight_map = read_json(path / name).get("weight_map")
            if not isinstance(weight_map, dict):
                raise ConversionError(f"{path / name} has no weight_map (tensor name -> shard file)")
            wrong = [(key, value) for key, value in weight_map.items() if not isinstance(value, str)]
            if wrong:
                key, value = wrong[0]
                raise ConversionError(
                    f"{path / name}: weight_map maps tensor names to shard file names; {key!r} maps to "
                    f"{json.dumps(value)} ({len(wrong)} tensor(s) without a file name)"
                )
            files = [path / f for f in dict.fromkeys(weight_map.values())]
            absent = [f.name for f in files if not f.is_file()]
            if absent:
                raise ConversionError(f"{path / name} lists shards that do not exist: {absent}")
            return files
    for pattern in (*WEIGHT_FILES, *WEIGHT_SHARDS, *PROJECTOR_FILES):
        files = sorted(path.glob(pattern))
        if files:
            return files
    return []


@contextmanager
def open_weights(path: Path):
    """A read-only `{key: tensor}` view of one weight file; tensors are read from disk only when accessed."""
    try:
        if path.suffix == ".safetensors":
            weights = _SafetensorsView(safe_open(path, framework="pt"))
        else:
            # weights_only: never unpickle arbitrary objects; mmap: tensors are paged in on access, not at load (only
            # in torch's zip format: the older one, before torch 1.6, is read whole).
            weights = torch.load(path, map_location="cpu", weights_only=True, mmap=zipfile.is_zipfile(path))
    except pickle.UnpicklingError as error:  # what weights_only=True raises for anything but tensors and containers
        # (torch's message goes on to advise weights_only=False: only the line that names the object is kept.)
        lines = str(error).splitlines()
        reason = next((line.strip() for line in lines if "unsupported" in line.lower()), "weights-only load failed")
        raise ConversionError(
            f"{path} holds objects other than tensors, which are never unpickled: {reason}"
        ) from error
    except Exception as error:  # safetensors and zip errors mean "this file is damaged"
        raise ConversionError(f"cannot read {path}: the file is truncated or corrupted ({error})") from error
    if not isinstance(weights, (dict, _SafetensorsView)) or (
        isinstance(weights, dict) and not all(isinstance(t, torch.Tensor) for t in weights.values())
    ):
        raise ConversionError(f"{path} does not hold a state dict of tensors")
    yield weights  # the file is unmapped once the caller drops the view and its tensors


class _SafetensorsView:
    def __init__(self, handle):
        self.handle = handle

    def shapes(self):
        return {key: tuple(self.handle.get_slice(key).get_shape()) for key in self.handle.keys()}  # noqa: SIM118

    def __getitem__(self, key):
        return self.handle.get_tensor(key)


def read_shapes(path: Path) -> dict[str, tuple]:
    with open_weights(path) as weights:
        if isinstance(weights, _SafetensorsView):
            return weights.shapes()
        return {key: tuple(tensor.shape) for key, tensor in weights.items()}


def map_key(key: str, table: str):
    """(matched, target): the output name of an input key under `KEY_MAPPINGS[table]` (target None: dropped)."""
    for pattern, target in KEY_MAPPINGS[table]:
        match = re.fullmatch(pattern, key)
        if match:
            return True, None if target is None else match.expand(target)
    return False, None


# ----------------------------------------------------------------------------------------------------------------
# Configuration


def read_json(path: Path) -> dict:
    try:
        data = json.loads(path.read_text(encoding="utf-8"))
    except (OSError, ValueError) as error:  # ValueError: not JSON, or not UTF-8
        raise ConversionError(f"cannot read {path}: {error}") from error
    except RecursionError as error:  # (a damaged or hostile file: Python's JSON reader recurses per level)
        raise ConversionError(f"cannot read {path}: JSON nested too deeply ({error})") from error
    if not isinstance(data, dict):
        raise ConversionError(f"cannot read {path}: a JSON object was expected, got a {type(data).__name__}")
    return data


def input_layout(config: dict) -> str:
    architectures = config.get("architectures") or []
    # Before its 1.2 release the LLaVA codebase's model type was "llava" too, as liuhaotian/llava-v1.5-7b's config
    # says: its architecture, and no text_config (a LlamaConfig with mm_* fields), tell it from Transformers' LLaVA.
    codebase = config.get("model_type") == "llava_llama" or "LlavaLlamaForCausalLM" in architectures
    if codebase and "text_config" not in config:
        return "llava_codebase"
    if config.get("model_type") in ("llava", "hyperllava"):
        return "llava_hf"
    if config.get("model_type") == "llama":  # a stage-1 projector file without its own config
        return "llava_codebase"
    raise ConversionError(
        f"cannot map a checkpoint with model_type={config.get('model_type')!r} and architectures={architectures}; "
        "supported: LLaVA-codebase LlavaLlamaForCausalLM, Transformers LlavaForConditionalGeneration, HyperLLaVA"
    )


def resolve_folder(name_or_path: str, what: str, weights: bool) -> Path:
    """A local folder, or a Hub id resolved through the Hub cache (downloaded unless HF_HUB_OFFLINE=1)."""
    if Path(name_or_path).is_dir():
        return Path(name_or_path)
    patterns = ["*.json", "*.txt", "*.model"] + (["*.safetensors", "pytorch_model*.bin"] if weights else [])
    try:
        return Path(snapshot_download(name_or_path, allow_patterns=patterns))
    except Exception as error:
        raise ConversionError(
            f"{what} {name_or_path!r} is neither a local folder nor a Hub model available here ({error}); "
            "pass a local folder"
        ) from error


def text_config_from(config: dict) -> dict:
    """The Llama fields of a LLaVA-codebase config (itself a LlamaConfig plus `mm_*` fields)."""
    llama_fields = set(LlamaConfig().to_dict()) - {"architectures", "_name_or_path", "transformers_version", "dtype"}
    kwargs = {k: v for k, v in config.items() if k not in ("model_type", "architectures", "auto_map")}
    try:
        llama = LlamaConfig(**kwargs)
    except (ValueError, TypeError, KeyError, StrictDataclassError) as error:
        raise ConversionError(f"cannot read the LLM's settings in the input config: {error}") from error
    return {k: v for k, v in llama.to_dict().items() if k in llama_fields}


def vision_config_from(folder: Path) -> dict:
    try:
        config = AutoConfig.from_pretrained(folder)
    except (OSError, ValueError, TypeError, KeyError, StrictDataclassError) as error:
        raise ConversionError(f"cannot read the vision tower's config in {folder}: {error}") from error
    if config.model_type == "clip":
        config = config.vision_config
    if config.model_type != "clip_vision_model":
        raise ConversionError(f"the vision tower in {folder} is a {config.model_type!r}; the converter maps CLIP only")
    return config.to_dict()


def check_llava_settings(config: dict, source: Path):
    for field, allowed in SUPPORTED_LLAVA_SETTINGS.items():
        if config.get(field) not in allowed:
            raise ConversionError(
                f"{source}: {field}={config.get(field)!r} cannot be converted to HyperLLaVA (LLaVA-1.5 architecture); "
                f"supported values: {[a for a in allowed if a is not None]}"
            )


def expert_settings(source: dict, args=None) -> dict:
    """The expert hyperparameters: the command line (unless `args` is None) over the input config over
    HyperLlavaConfig's defaults."""
    settings = {field: source[field] for field in EXPERT_FIELDS if field in source}
    if args is not None:
        settings.update({field: getattr(args, field) for field in EXPERT_FIELDS if getattr(args, field) is not None})
    for field in ("visual_expert", "language_expert_layers"):
        if settings.get(field) == "none":
            settings[field] = None
    layers = settings.get("language_expert_layers")
    if isinstance(layers, str) and re.fullmatch(r"\d+(,\d+)*", layers):
        settings["language_expert_layers"] = [int(i) for i in layers.split(",")]
    return settings


def round_up(value: int, multiple: int) -> int:
    return -(-value // multiple) * multiple


# ----------------------------------------------------------------------------------------------------------------
# The conversion plan: everything decided and checked before the first byte is written


@dataclass
class Source:
    """One input: its weight files and the key table that maps them."""

    files: list[Path]
    table: str


@dataclass
class Plan:
    """What `prepare` decided: the output config and model skeleton, and where each output tensor comes from."""

    model: HyperLlavaForConditionalGeneration  # on the meta device: names and shapes only
    config: HyperLlavaConfig
    tokenizer: object
    entries: list  # (output key, input file, input key), in input-file order
    fresh_experts: list[str]  # expert modules the input never had, created anew
    card_metadata: dict  # of the input's model card (README.md), for the output's
    expected: dict  # output key -> shape
    dtype: torch.dtype  # of the output's floating-point weights
    source_config: dict
    input_folder: Path
    base_folder: Path | None
    vision_folder: Path | None


def prepare(args):
    """Reads configs, tokenizer and weight headers; returns the plan, or raises ConversionError naming the problem."""
    input_path = Path(args.input)
    if not input_path.exists():
        raise ConversionError(f"--input {input_path} does not exist")
    input_folder = input_path if input_path.is_dir() else input_path.parent
    base_folder = Path(args.base_model) if args.base_model else None
    if base_folder is not None and not (base_folder / "config.json").is_file():
        raise ConversionError(f"--base-model {base_folder} has no config.json")

    if (input_folder / "adapter_config.json").is_file():
        raise ConversionError(
            f"{input_folder} is a PEFT adapter checkpoint (a checkpoint of training with --lora_r): it holds the "
            "adapters and the trained modules only. Convert the run's final folder (saved merged), or merge it first: "
            "PeftModel.from_pretrained(base_model, checkpoint).merge_and_unload().save_pretrained(folder)"
        )
    if (input_folder / "config.json").is_file():
        source_config = read_json(input_folder / "config.json")
        if source_config.get("model_type") == "llama" and not any(key.startswith("mm_") for key in source_config):
            architectures = ", ".join(source_config.get("architectures") or ["LlamaForCausalLM"])
            raise ConversionError(
                f"--input {input_path} is a language model without a projector ({architectures}): pass it as "
                "--base-model, with the stage-1 mm_projector file (mm_projector.bin or .safetensors) as --input"
            )
    elif base_folder is not None:
        # A stage-1 projector file alone: the base LLM's config, and LLaVA-1.5's projector (its weights' names check
        # that it is one).
        source_config = {"mm_projector_type": "mlp2x_gelu", **read_json(base_folder / "config.json")}
    else:
        raise ConversionError(f"no config.json in {input_folder}; a projector-only input needs --base-model")
    layout = input_layout(source_config)
    dtype = output_dtype(args, source_config)  # checked before the tokenizer, which reads the same config

    # The vision tower: its config always, its weights when the checkpoint lacks them.
    vision_folder = None
    if layout == "llava_codebase":
        check_llava_settings(source_config, input_folder)
        vision_name = args.vision_tower or source_config.get("mm_vision_tower")
        if not vision_name:
            raise ConversionError("the input config names no mm_vision_tower; pass --vision-tower (a CLIP folder)")
        vision_folder = resolve_folder(vision_name, "vision tower", weights=True)
    elif args.vision_tower:
        vision_folder = resolve_folder(args.vision_tower, "vision tower", weights=True)

    sources = [Source(find_weight_files(input_path), layout)]
    if not sources[0].files:
        raise ConversionError(f"no weight files in {input_path}")
    if base_folder is not None:
        # A Vicuna/Llama folder (LLaVA's stage 1), or a LLaVA/HyperLLaVA one (this package's stage 1 starts from one).
        sources.append(Source(find_weight_files(base_folder), input_layout(read_json(base_folder / "config.json"))))
    if vision_folder is not None:
        sources.append(Source(find_weight_files(vision_folder), "clip"))

    tokenizer, tokenizer_folder, trained_tokens = load_tokenizer([input_folder, base_folder], layout, args)
    source_vocab = (source_config.get("text_config") or source_config).get("vocab_size")
    config = build_config(source_config, layout, vision_folder, tokenizer, source_vocab, trained_tokens, args)

    with torch.device("meta"):
        model = HyperLlavaForConditionalGeneration(config)
    tied = set(model.all_tied_weights_keys)
    expected = {k: tuple(v.shape) for k, v in model.state_dict().items() if k not in tied}

    entries = map_inputs(sources, expected, tied, args.allow_unused)
    shapes = {target: shape for target, _, _, shape in entries}
    # A fresh expert only where the input never had one: an expert that the input's config declares was trained, so
    # its weights missing is an error (listed below), never a silent reset to the identity.
    declared = input_expert_modules(source_config, config, input_folder)
    fresh_experts = [
        name
        for name in EXPERT_MODULES
        if name not in declared and holds_module(expected, name) and not holds_module(shapes, name)
    ]
    missing = [k for k in expected if k not in shapes and not k.startswith(tuple(f"{n}." for n in fresh_experts))]
    if missing:
        raise ConversionError(f"{len(missing)} weights are missing from the inputs: " + _listing(missing))
    check_shapes(entries, expected, trained_tokens, tokenizer_folder)
    entries = [(target, path, key) for target, path, key, _ in entries]
    return Plan(
        model,
        config,
        tokenizer,
        entries,
        fresh_experts,
        read_card_metadata(input_folder),
        expected,
        dtype,
        source_config,
        input_folder,
        base_folder,
        vision_folder,
    )


def holds_module(keys, module: str) -> bool:
    return any(key.startswith(module + ".") for key in keys)


def input_expert_modules(source: dict, config: HyperLlavaConfig, input_folder: Path) -> set[str]:
    """The expert modules of the input's own config (a HyperLLaVA config, or any carrying the expert fields), whatever
    the command line changes: those of the model that its expert settings build, on the meta device."""
    if source.get("model_type") != "hyperllava" and not any(field in source for field in EXPERT_FIELDS):
        return set()  # a LLaVA input: it has no experts
    # The converted model's settings but the experts', which are the input's or HyperLlavaConfig's defaults.
    fields = {key: value for key, value in config.to_dict().items() if key not in (*NOT_MODEL_FIELDS, *EXPERT_FIELDS)}
    try:
        own = HyperLlavaConfig(**fields, **expert_settings(source))
    except (ValueError, TypeError, StrictDataclassError) as error:  # (one the command line replaced, say)
        raise ConversionError(
            f"the expert settings of the config in {input_folder} are invalid, and they say which experts the input "
            f"holds (the flags do not change that): {error}"
        ) from error
    with torch.device("meta"):
        keys = HyperLlavaForConditionalGeneration(own).state_dict()
    return {name for name in EXPERT_MODULES if holds_module(keys, name)}


def read_card_metadata(folder: Path) -> dict:
    """The metadata of the model card in `folder` (a converted folder converted again), {} without one."""
    readme = folder / "README.md"
    if not readme.is_file():
        return {}
    try:
        return metadata_load(readme) or {}
    except (OSError, ValueError, yaml.YAMLError) as error:  # ValueError: not UTF-8, or not a mapping
        raise ConversionError(f"cannot read the model card metadata in {readme}: {error}") from error


def map_inputs(sources, expected, tied, allow_unused):
    """(output key, file, input key, shape) for every input weight HyperLLaVA takes. The first source that provides an
    output key wins (the input over --base-model over --vision-tower), so a full checkpoint's own vision tower is kept.
    Tied copies (lm_head) are not saved."""
    entries, unexpected, taken = [], [], set()
    for source in sources:
        found_in = {}  # input key -> the file of this source that holds it
        for path in source.files:
            for key, shape in read_shapes(path).items():
                if key in found_in:  # (which copy the checkpoint meant, its index may say, but a stale one is likely)
                    raise ConversionError(f"{key} is in two files of one input: {found_in[key]} and {path}")
                found_in[key] = path
                matched, target = map_key(key, source.table)
                if target in tied:
                    continue
                if not matched or (target is not None and target not in expected):
                    unexpected.append(f"{key} ({path.name})")
                elif target is not None and target not in taken:
                    taken.add(target)
                    entries.append((target, path, key, shape))
    if unexpected and not allow_unused:
        raise ConversionError(
            f"{len(unexpected)} input keys have no place in HyperLLaVA (pass --allow-unused to drop them): "
            + _listing(unexpected)
        )
    return entries


def check_shapes(entries, expected, trained_tokens, tokenizer_folder):
    """Every input weight has the config's shape; the embedding rows may be fewer (padded), but not fewer than the
    tokenizer's trained tokens."""
    mismatched = []
    for target, _, key, shape in entries:
        want = expected[target]
        resizable = target in VOCAB_KEYS and len(shape) == 2 and shape[1] == want[1] and shape[0] <= want[0]
        if shape != want and not resizable:
            mismatched.append(f"{key} -> {target}: expected {list(want)}, found {list(shape)}")
        elif target in VOCAB_KEYS and shape[0] < trained_tokens:
            mismatched.append(
                f"{key} has {shape[0]} rows but the tokenizer in {tokenizer_folder} has {trained_tokens} tokens, so "
                f"ids {shape[0]}..{trained_tokens - 1} have no trained row (is it the tokenizer the model was "
                "trained with? see --tokenizer)"
            )
    if mismatched:
        raise ConversionError(
            f"{len(mismatched)} weights have the wrong shape for this config: " + _listing(mismatched)
        )


def _listing(items, limit=20):
    shown = "\n  ".join(items[:limit])
    more = f"\n  ... and {len(items) - limit} more" if len(items) > limit else ""
    return f"\n  {shown}{more}"


def load_tokenizer(folders, layout, args):
    """(tokenizer, folder, tokens it had): the checkpoint's tokenizer (or the base LLM's), with `<image>` and a pad
    token added when missing."""
    candidates = [Path(args.tokenizer)] if args.tokenizer else [f for f in folders if f is not None]
    folder = next((f for f in candidates if any((f / name).is_file() for name in TOKENIZER_FILES)), None)
    if folder is None and args.tokenizer:
        raise ConversionError(f"--tokenizer {args.tokenizer} holds no tokenizer (none of {list(TOKENIZER_FILES)})")
    if folder is None:
        raise ConversionError(f"no tokenizer in {[str(f) for f in candidates]}; pass --tokenizer")
    # LLaVA-1.5's releases ship Llama's tokenizer as a SentencePiece model only, which Transformers converts to a
    # fast tokenizer (written out as tokenizer.json) with the sentencepiece and protobuf packages.
    if not (folder / "tokenizer.json").is_file() and (folder / "tokenizer.model").is_file():
        absent = [name for name, available in SENTENCEPIECE_PACKAGES.items() if not available()]
        if absent:
            raise ConversionError(
                f"the tokenizer in {folder} is a SentencePiece model (tokenizer.model, no tokenizer.json), which "
                f"needs {' and '.join(absent)} to be read: pip install {' '.join(absent)}"
            )
    # Without a config, AutoTokenizer reads the folder's, and the codebase's model_type `llava_llama` is unknown to
    # Transformers, which then warns that the checkpoint may not fit "a model of type ``". Its tokenizer is Llama's.
    config = LlamaConfig() if layout == "llava_codebase" else None
    try:
        tokenizer = AutoTokenizer.from_pretrained(folder, config=config)
    except Exception as error:  # e.g. a sentencepiece-only tokenizer without the package that reads it
        raise ConversionError(f"cannot load the tokenizer in {folder}: {error}") from error
    # How this machine loaded it (e.g. offline), which `save_pretrained` would otherwise write into the Hub folder.
    for key in ("is_local", "local_files_only"):
        tokenizer.init_kwargs.pop(key, None)
    trained_tokens = len(tokenizer)
    if "<image>" not in tokenizer.get_vocab():
        tokenizer.add_tokens([AddedToken("<image>", special=True, normalized=False)], special_tokens=True)
    if tokenizer.pad_token is None:
        tokenizer.add_special_tokens({"pad_token": "<pad>"})
    # Batched generation pads on the left, so that every prompt ends where its answer starts. (The attribute for this
    # run, the init argument for the saved folder: `save_pretrained` writes the latter.)
    tokenizer.padding_side = tokenizer.init_kwargs["padding_side"] = "left"
    return tokenizer, folder, trained_tokens


def build_config(
    source: dict, layout: str, vision_folder, tokenizer, source_vocab, trained_tokens, args
) -> HyperLlavaConfig:
    experts = expert_settings(source, args)
    if layout == "llava_codebase":
        text = text_config_from(source)
        vision = vision_config_from(vision_folder)
        # CLIP's names end in the image size when it is not 224 ("clip-vit-large-patch14-336"): another tower of the
        # same widths (the 224 px one) would pass every shape check and give another number of visual tokens.
        named = re.search(r"patch\d+(?:-(\d+))?$", str(source.get("mm_vision_tower", "")))
        if named and int(named[1] or 224) != vision["image_size"]:
            raise ConversionError(
                f"the input was trained with mm_vision_tower={source['mm_vision_tower']!r}, {named[1] or 224} px "
                f"images, but the vision tower in {vision_folder} takes {vision['image_size']} px images: pass the "
                "tower it was trained with (--vision-tower)"
            )
        if source.get("mm_hidden_size", vision["hidden_size"]) != vision["hidden_size"]:
            raise ConversionError(
                f"mm_hidden_size={source['mm_hidden_size']} does not match the vision tower's hidden_size "
                f"{vision['hidden_size']} ({vision_folder})"
            )
        llava = {
            "vision_feature_layer": source.get("mm_vision_select_layer", -2),
            "vision_feature_select_strategy": SELECT_FEATURE[source.get("mm_vision_select_feature", "patch")],
            "projector_hidden_act": "gelu",
            "multimodal_projector_bias": True,
            "tie_word_embeddings": text.get("tie_word_embeddings", False),
        }
    else:
        llava = {k: v for k, v in source.items() if k not in (*NOT_CARRIED_OVER, *EXPERT_FIELDS)}
        text, vision = llava.pop("text_config"), llava.pop("vision_config")
        # The parts' dtype too is the output's (`write_output` sets it on each), not the input's.
        text = {k: v for k, v in text.items() if k not in ("dtype", "torch_dtype")}
        vision = {k: v for k, v in vision.items() if k not in ("dtype", "torch_dtype")}
        if vision_folder is not None:
            vision = vision_config_from(vision_folder)
    if layout == "llava_hf" and len(tokenizer) == trained_tokens:
        # A Transformers folder whose tokenizer has every token already: its vocabulary is kept. Rounding it up would
        # add lm_head rows that no token has, which sampling then picks.
        vocab = max(source_vocab or 0, len(tokenizer))
    else:
        vocab = max(source_vocab or 0, round_up(len(tokenizer), args.pad_vocab_to_multiple_of))
    text = {**text, "vocab_size": vocab, "pad_token_id": tokenizer.pad_token_id}
    image_size, patch_size = vision["image_size"], vision["patch_size"]
    llava.update(
        text_config=text,
        vision_config=vision,
        image_token_index=tokenizer.convert_tokens_to_ids("<image>"),
        image_seq_length=(image_size // patch_size) ** 2,
        pad_token_id=tokenizer.pad_token_id,
    )
    try:
        return HyperLlavaConfig(**llava, **experts)
    except (ValueError, TypeError, StrictDataclassError) as error:
        raise ConversionError(f"cannot build a HyperLLaVA config from {args.input}: {error}") from error


def output_dtype(args, source_config: dict) -> torch.dtype:
    if args.dtype != "auto":
        return DTYPES[args.dtype]
    key = next((k for k in ("torch_dtype", "dtype") if source_config.get(k)), None)
    name = source_config[key] if key else "float32"
    dtype = getattr(torch, str(name), None)
    if not isinstance(dtype, torch.dtype):
        raise ConversionError(f"the input config's {key}={name!r} is not a torch dtype; pass --dtype")
    return dtype


# ----------------------------------------------------------------------------------------------------------------
# Writing


def fresh_expert_weights(model, names, seed) -> dict[str, torch.Tensor]:
    """New experts, initialised by the model's own `_init_weights` (W_u parts zero), built one module at a time."""
    weights = {}
    with torch.random.fork_rng(devices=[]), torch.no_grad():
        torch.manual_seed(seed)
        for name in names:
            expert = model.get_submodule(name).to_empty(device="cpu")
            expert.apply(model._init_weights)
            weights.update({f"{name}.{k}": v for k, v in expert.state_dict().items()})
    return weights


def convert_tensor(tensor, target, expected_shape, dtype):
    if target in VOCAB_KEYS and tensor.shape[0] < expected_shape[0]:
        # New tokens (<image>, <pad>, rounding) start as an average token; <image>'s row is never read.
        mean = tensor.mean(dim=0, keepdim=True, dtype=torch.float32).to(tensor.dtype)
        out = torch.cat([tensor, mean.expand(expected_shape[0] - tensor.shape[0], -1)]).to(dtype)
    else:
        out = tensor.to(dtype=dtype, copy=True).contiguous()
    if dtype == torch.float16 != tensor.dtype and not torch.isfinite(out).all() and torch.isfinite(tensor).all():
        raise ConversionError(
            f"{target}: values up to {tensor.abs().max().item():.4g} do not fit float16 (at most 65504): convert to "
            "--dtype bf16 or fp32"
        )
    return out


def write_weights(folder: Path, entries, fresh, expected, dtype, max_shard_size):
    """Streams the input files into safetensors shards: one input file open, one output shard buffered."""
    with torch.device("meta"):  # huggingface_hub plans the shards from names, shapes and dtypes only
        layout = {t: torch.empty(expected[t], dtype=dtype) for t in [t for t, _, _ in entries] + list(fresh)}
    split = split_torch_state_dict_into_shards(
        layout, filename_pattern="model{suffix}.safetensors", max_shard_size=max_shard_size
    )
    pending = {name: set(keys) for name, keys in split.filename_to_tensors.items()}
    buffers = {name: {} for name in pending}

    def add(target, tensor):
        name = split.tensor_to_filename[target]
        buffers[name][target] = tensor
        pending[name].discard(target)
        if not pending[name]:
            save_file(buffers.pop(name), folder / name, metadata={"format": "pt"})
        progress.update(tensor.numel() * tensor.element_size())

    total = sum(t.numel() * t.element_size() for t in layout.values())
    with tqdm(total=total, unit="B", unit_scale=True, desc="Converting weights") as progress:
        by_file = {}
        for target, path, key in entries:
            by_file.setdefault(path, []).append((target, key))
        for path, file_entries in by_file.items():
            with open_weights(path) as weights:
                for target, key in file_entries:
                    try:
                        tensor = weights[key]
                    except Exception as error:
                        raise ConversionError(f"cannot read {key} from {path}: corrupted file ({error})") from error
                    if not tensor.is_floating_point():  # every HyperLLaVA weight is; a quantized one cannot be cast
                        raise ConversionError(
                            f"{key} in {path} has dtype {tensor.dtype}; {target} takes floating-point weights "
                            "(a quantized checkpoint? convert it from its unquantized weights)"
                        )
                    add(target, convert_tensor(tensor, target, expected[target], dtype))
                    del tensor
        for target, tensor in fresh.items():
            add(target, tensor.to(dtype))
    if split.is_sharded:
        index = {"metadata": split.metadata, "weight_map": split.tensor_to_filename}
        (folder / "model.safetensors.index.json").write_text(json.dumps(index, indent=2, sort_keys=True) + "\n")


PROCESSOR_FILES = ("preprocessor_config.json", "processor_config.json")


def build_processor(config, tokenizer, folders, image_aspect_ratio, chat_template=None):
    """LLaVA-1.5's preprocessing: CLIP's resize/crop/normalisation, padded to a square with the mean colour.

    The first of `folders` (input, base model, vision tower) with image processor settings gives them: a stage 1
    output keeps those of the model it started from. `image_aspect_ratio` (a LLaVA-codebase run's setting, None for a
    Transformers folder, whose settings say it themselves) decides the padding. `chat_template` None: vicuna_v1."""
    image_processor = None
    for folder in folders:
        # Transformers 5 keeps them in processor_config.json, earlier releases and CLIP in preprocessor_config.json.
        if folder is not None and any((folder / name).is_file() for name in PROCESSOR_FILES):
            # CLIP's (or LLaVA's) settings read into LLaVA's image processor, whatever class the file names.
            image_processor = LlavaImageProcessorPil.from_pretrained(folder)
            break
    if image_processor is None:  # CLIP's defaults at the tower's resolution, padded as LLaVA-1.5 trained
        size = config.vision_config.image_size
        image_processor = LlavaImageProcessorPil(
            size={"shortest_edge": size}, crop_size={"height": size, "width": size}
        )
        image_aspect_ratio = image_aspect_ratio or "pad"
    if image_aspect_ratio is not None:
        image_processor.do_pad = image_aspect_ratio == "pad"
    return HyperLlavaProcessor(
        image_processor=image_processor,
        tokenizer=tokenizer,
        patch_size=config.vision_config.patch_size,
        vision_feature_select_strategy=config.vision_feature_select_strategy,
        num_additional_image_tokens=1,  # CLIP's CLS token, dropped again by the "default" strategy
        chat_template=chat_template,
    )


def write_model_card(folder: Path, config, counts, args, input_metadata: dict):
    data = ModelCardData(
        library_name="transformers",
        pipeline_tag="image-text-to-text",
        # An input converted before keeps what its card says, unless the command line says otherwise.
        license=args.license or input_metadata.get("license"),
        base_model=args.base_model_id or input_metadata.get("base_model"),
        tags=["hyperllava", "llava", "multimodal", "hypernetwork"],
    )
    text = config.text_config
    layers = config.language_expert_layer_indices
    # Without a Hub id, the folder (loads from its parent); resolved, as `.` has no name.
    repo = args.push_to_hub or Path(args.output).resolve().name
    # The snippets load what this upload wrote: on a branch, from that branch.
    revision = (
        f", revision={json.dumps(args.revision)}" if args.push_to_hub and args.revision not in (None, "main") else ""
    )
    card = f"""---
{data.to_yaml()}
---

# HyperLLaVA

HyperLLaVA ([arXiv 2403.13447](https://arxiv.org/abs/2403.13447)) is LLaVA-1.5 with two hypernetwork experts
whose weights are generated per input: a **visual expert** that shifts the vision-language projector per image, and
a **language expert** beside the FFN of later decoder layers, generated from the prompt's hidden state.

## Architecture

| part | setting |
|---|---|
| vision tower | CLIP ViT, {config.vision_config.image_size}px, patch {config.vision_config.patch_size}, layer {config.vision_feature_layer} |
| projector | Linear - GELU - Linear ({config.vision_config.hidden_size} -> {text.hidden_size}) |
| language model | Llama, {text.num_hidden_layers} layers, hidden size {text.hidden_size}, vocabulary {text.vocab_size} |
| visual expert | {config.visual_expert} |
| language expert | layers {layers[0] if layers else "-"}..{layers[-1] if layers else "-"} ({len(layers)} layers), guidance from the hidden state entering layer {config.language_guidance_layer} |
| expert shapes | embedding m={config.expert_embedding_dim}, hypernetwork hidden {config.hypernetwork_hidden_dim}, bottleneck r={config.expert_bottleneck_dim}, mode {config.expert_mode} |

| parameters | count |
|---|---|
| total | {counts["total"]:,} |
| visual expert | {counts["visual_expert"]:,} |
| language expert | {counts["language_expert"]:,} |
| experts, share of total | {counts["expert"]:,} ({100 * counts["expert"] / counts["total"]:.2f}%) |

## Usage

With the `transformers-hyperllava` package installed:

```python
import transformers_hyperllava  # registers HyperLLaVA with the Auto classes
from transformers import AutoModelForImageTextToText, AutoProcessor

model = AutoModelForImageTextToText.from_pretrained("{repo}"{revision}, dtype="auto", device_map="auto")
processor = AutoProcessor.from_pretrained("{repo}"{revision})
```

Without the package, the model code shipped in this repository is used:

```python
from PIL import Image
from transformers import AutoModelForImageTextToText, AutoProcessor

model = AutoModelForImageTextToText.from_pretrained("{repo}"{revision}, trust_remote_code=True, dtype="auto")
processor = AutoProcessor.from_pretrained("{repo}"{revision}, trust_remote_code=True)

messages = [{{"role": "user", "content": [{{"type": "image"}}, {{"type": "text", "text": "What is shown here?"}}]}}]
prompt = processor.apply_chat_template(messages, add_generation_prompt=True)
image = Image.open("example.jpg")
inputs = processor(images=image, text=prompt, return_tensors="pt").to(model.device)
print(processor.decode(model.generate(**inputs, max_new_tokens=64)[0], skip_special_tokens=True))
```

The prompt format is LLaVA-1.5's `vicuna_v1` ("USER: <image>\\n... ASSISTANT:"); images are padded to a square
with the mean colour before resizing, as LLaVA-1.5 trained.

## Training recipe

As in the paper (§4.1), following LLaVA-1.5:

| | stage 1: align | stage 2: instruct |
|---|---|---|
| trained | projector + visual expert | projector + visual expert + LLM + language expert |
| frozen | vision tower, LLM | vision tower |
| data | LAION-CC-SBU 558K captions | llava_v1_5_mix665k |
| learning rate | 1e-3 | 2e-5 |
| optimiser | AdamW, cosine schedule, 3% warm-up, no weight decay | same |

This folder was produced by `hyperllava-convert` from `{Path(args.input).resolve().name}`.

## Citation

```bibtex
@article{{zhang2024hyperllava,
  title   = {{HyperLLaVA: Dynamic Visual and Language Expert Tuning for Multimodal Large Language Models}},
  author  = {{Zhang, Wenqiao and Lin, Tianwei and Liu, Jiang and Shu, Fangxun and Li, Haoyuan and Zhang, Lei and
             Wanggui, He and Zhou, Hao and Lv, Zheqi and Jiang, Hao and Li, Juncheng and Tang, Siliang and
             Zhuang, Yueting}},
  journal = {{arXiv preprint arXiv:2403.13447}},
  year    = {{2024}}
}}
```
"""
    ModelCard(card).save(folder / "README.md")


def write_output(folder: Path, args, plan: Plan):
    model, config, tokenizer = plan.model, plan.config, plan.tokenizer
    fresh = fresh_expert_weights(model, plan.fresh_experts, args.seed)
    write_weights(folder, plan.entries, fresh, plan.expected, plan.dtype, args.max_shard_size)

    for part in (config, *(getattr(config, key) for key in config.sub_configs)):  # as `save_pretrained` writes it
        part.dtype = plan.dtype
    config.architectures = [HyperLlavaForConditionalGeneration.__name__]
    # Ship the model code with the weights (`trust_remote_code`), as Transformers' own `save_pretrained` does for a
    # custom model (the package registered its classes for that): the model's module and its relative imports are
    # copied, and the config gets the `auto_map`.
    custom_object_save(model, folder, config=config)
    config.save_pretrained(folder)

    # A Transformers folder keeps its generation settings (a republished HyperLLaVA's sampling defaults, several eos
    # ids); a LLaVA-codebase run's (Vicuna's sampling defaults, pad = unk) do not fit the converted tokenizer.
    codebase = input_layout(plan.source_config) == "llava_codebase"
    with_settings = [
        f for f in (plan.input_folder, plan.base_folder) if f and (f / "generation_config.json").is_file()
    ]
    if with_settings and not codebase:
        generation = GenerationConfig.from_pretrained(with_settings[0])
        if generation.pad_token_id is None:  # the converter may have given the tokenizer its pad token
            generation.pad_token_id = tokenizer.pad_token_id
    else:
        generation = GenerationConfig(
            bos_token_id=tokenizer.bos_token_id,
            eos_token_id=tokenizer.eos_token_id,
            pad_token_id=tokenizer.pad_token_id,
        )
    generation.save_pretrained(folder)

    # A LLaVA-codebase run says how it fed its images (LLaVA-1.5's scripts: padded); a Transformers folder's processor
    # says it itself.
    aspect_ratio = plan.source_config.get("image_aspect_ratio", "pad") if codebase else None
    folders = (plan.input_folder, plan.base_folder, plan.vision_folder)
    # A HyperLLaVA folder keeps its chat template (the tokenizer read it); any other input gets LLaVA-1.5's vicuna_v1.
    template = tokenizer.chat_template if plan.source_config.get("model_type") == "hyperllava" else None
    processor = build_processor(config, tokenizer, folders, aspect_ratio, template)
    processor.save_pretrained(folder)

    write_model_card(folder, config, model.parameter_counts(), args, plan.card_metadata)


# The files of the repo that a conversion writes or replaces: weights (either format, sharded or not), their index,
# configs, tokenizer files, model code, chat template. An upload deletes those that it does not hold, so that a
# previous push's files (`model.safetensors` beside new shards, which Transformers would load) do not outlive it.
# Other files (.gitattributes, which huggingface_hub never deletes, a LICENSE, images) are kept; README.md is always
# uploaded.
HUB_DELETE_PATTERNS = ["*.safetensors", "pytorch_model*.bin", "*.json", "*.py", "*.jinja", "tokenizer.model"]


def push_to_hub(folder: Path, repo_id: str, private: bool, revision, commit_message: str):
    api = HfApi()
    api.create_repo(repo_id, private=private, exist_ok=True)
    if revision:
        api.create_branch(repo_id, branch=revision, exist_ok=True)
    return api.upload_folder(
        repo_id=repo_id,
        folder_path=folder,
        revision=revision,
        commit_message=commit_message,
        delete_patterns=HUB_DELETE_PATTERNS,  # (not the files this upload holds: those are replaced)
    )


def shard_size(value: str):
    """Bytes, or a size such as "5GB" (what huggingface_hub's sharding accepts)."""
    size = re.fullmatch(r"\d+|(\d+(?:\.\d+)?)(KB|MB|GB|TB)", value.upper())
    if size is None:
        raise argparse.ArgumentTypeError(f"{value!r} is not a size such as 5GB, 500MB or a number of bytes")
    if float(size[1] or value) == 0:  # huggingface_hub would write every tensor to a shard of its own
        raise argparse.ArgumentTypeError(f"{value!r}: the largest shard must be more than 0 bytes")
    return value.upper() if size[2] else int(value)


def parse_args(argv=None):
    parser = argparse.ArgumentParser(
        description="Convert a LLaVA-1.5 / HyperLLaVA checkpoint to a Hub-ready HyperLLaVA folder (docs/conversion.md)."
    )
    parser.add_argument("--input", required=True, help="checkpoint folder, or a stage-1 mm_projector file")
    parser.add_argument("--output", required=True, help="the folder to write")
    parser.add_argument("--base-model", help="LLM folder whose weights a projector-only (stage-1) input lacks")
    parser.add_argument("--vision-tower", help="CLIP folder or Hub id (default: the config's mm_vision_tower)")
    parser.add_argument("--tokenizer", help="tokenizer folder (default: the input's, else the base model's)")
    parser.add_argument(
        "--dtype", choices=["auto", *DTYPES], default="auto", help="auto (default): the input config's dtype"
    )
    parser.add_argument("--max-shard-size", type=shard_size, default="5GB", help="largest output shard (default 5GB)")
    parser.add_argument(
        "--pad-vocab-to-multiple-of", type=positive_int, default=64, help="round the vocabulary up (default 64)"
    )
    parser.add_argument("--allow-unused", action="store_true", help="drop input keys HyperLLaVA has no place for")
    parser.add_argument("--overwrite", action="store_true", help="replace an existing non-empty --output")
    parser.add_argument("--seed", type=int, default=0, help="seed for new experts (default 0)")
    experts = parser.add_argument_group("experts (default: the input config's, else HyperLlavaConfig's defaults)")
    experts.add_argument("--visual-expert", dest="visual_expert", choices=["first", "second", "both", "none"])
    experts.add_argument(
        "--language-expert-layers", help='"posterior", "anterior", "all", "none" or indices such as "16,17,18"'
    )
    experts.add_argument("--language-guidance-layer", type=int)
    experts.add_argument("--expert-embedding-dim", type=int)
    experts.add_argument("--expert-bottleneck-dim", type=int)
    experts.add_argument("--hypernetwork-hidden-dim", type=int)
    experts.add_argument("--expert-mode", choices=["dynamic", "latent", "static"])
    hub = parser.add_argument_group("publishing")
    hub.add_argument("--push-to-hub", metavar="ORG/NAME", help="upload the output folder to this Hub repository")
    hub.add_argument("--private", action="store_true", help="create the repository as private")
    hub.add_argument("--revision", help="branch to push to (created if missing)")
    hub.add_argument("--commit-message", default="Upload HyperLLaVA converted with hyperllava-convert")
    hub.add_argument("--license", help="license for the model card metadata, e.g. llama2 (default: the input card's)")
    hub.add_argument(
        "--base-model-id", help="Hub id of the base model, for the model card (default: the input card's)"
    )
    return parser.parse_args(argv)


def positive_int(text):
    value = int(text)
    if value < 1:
        raise argparse.ArgumentTypeError(f"must be a positive integer, got {value}")
    return value


def upload_flags(args):
    """The `hf upload` options that repeat this run's push."""
    revision = f" --revision {shlex.quote(args.revision)}" if args.revision else ""
    deletions = "".join(f" --delete {shlex.quote(pattern)}" for pattern in HUB_DELETE_PATTERNS)
    return revision + (" --private" if args.private else "") + deletions


def check_output_holds_no_input(output: Path, args, plan):
    """--overwrite replaces the whole --output folder: refused where that folder holds an input."""
    inputs = {
        "--input": Path(args.input),
        "--base-model": plan.base_folder,
        "--vision-tower": plan.vision_folder,
        "--tokenizer": Path(args.tokenizer) if args.tokenizer else None,
    }
    for flag, path in inputs.items():
        if path is not None and path.exists() and output in path.resolve().parents:
            raise ConversionError(
                f"--output {output} holds {flag} {path}: replacing it would delete that input; write elsewhere"
            )


# A job's time limit (SIGTERM) or a closed terminal (SIGHUP) leaves no partial output either, as Ctrl-C does.
@stop_signals_interrupt()
def main(argv=None) -> int:
    args = parse_args(argv)
    output = Path(args.output).resolve()  # (`.` has no name to stage beside)
    try:
        cwd = Path.cwd().resolve()
        if output == cwd or output in cwd.parents:  # (`--output .`: the shell would be left in a deleted folder)
            raise ConversionError(
                f"--output {args.output} ({output}) is the current directory or holds it: converting would replace "
                "the folder you are in; write elsewhere"
            )
        if output.exists() and (not output.is_dir() or any(output.iterdir())) and not args.overwrite:
            raise ConversionError(f"--output {output} exists and is not empty; pass --overwrite to replace it")
        if args.push_to_hub:
            try:  # (before the conversion, which can take minutes)
                validate_repo_id(args.push_to_hub)
            except HFValidationError as error:
                raise ConversionError(f"--push-to-hub {args.push_to_hub!r} is not a Hub repo id: {error}") from None
        plan = prepare(args)
        check_output_holds_no_input(output, args, plan)
        try:
            with folder_replaced_when_done(output) as staging:
                write_output(staging, args, plan)
                # safetensors writes its files private to the user; the output's get the usual permissions.
                umask = os.umask(0)
                os.umask(umask)
                for path in staging.iterdir():
                    path.chmod(0o666 & ~umask)
        except OSError as error:  # a full disk, say: named as the other errors are (the staging folder is gone)
            raise ConversionError(f"writing {output} failed: {error}") from error
        print(f"Wrote {output}")
        if args.push_to_hub:
            # Whatever stops the upload, the conversion itself is complete and in place.
            kept = (
                f"the converted folder is kept at {output}: retry with "
                f"`hf upload {args.push_to_hub} {shlex.quote(str(output))}{upload_flags(args)}`"
            )
            try:
                commit = push_to_hub(output, args.push_to_hub, args.private, args.revision, args.commit_message)
            except KeyboardInterrupt:
                print(f"interrupted during the upload to {args.push_to_hub}; {kept}", file=sys.stderr)
                return 130
            except Exception as error:  # network, authentication, permissions
                raise ConversionError(f"the upload to {args.push_to_hub} failed ({error}); {kept}") from error
            print(f"Pushed to {commit}")
    except ConversionError as error:
        print(f"error: {error}", file=sys.stderr)
        return 1
    except KeyboardInterrupt:
        print("interrupted; no partial output was left", file=sys.stderr)
        return 130
    return 0


if __name__ == "__main__":
    sys.exit(main())
