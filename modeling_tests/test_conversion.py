"""`hyperllava-convert`: tiny checkpoints in every input layout, built here from random weights, against stock
LLaVA and a plain-PyTorch evaluation of the expert equations; loading the output the way users do; errors; publishing."""

import errno
import json
import os
import re
import shlex
import shutil
import signal
import subprocess
import sys
import textwrap
import threading
from pathlib import Path

import numpy as np
import pytest
import sentencepiece
import torch
import torch.nn.functional as F
import transformers
import yaml
from huggingface_hub import HfApi, constants
from huggingface_hub.utils import filter_repo_objects
from PIL import Image
from safetensors import safe_open
from safetensors.torch import load_file, save_file
from tokenizers import Tokenizer, models, pre_tokenizers, trainers
from transformers import (
    AutoProcessor,
    CLIPConfig,
    GenerationConfig,
    LlavaForConditionalGeneration,
    PreTrainedTokenizerFast,
    SiglipVisionConfig,
)
from transformers.testing_utils import CaptureLogger, LoggingLevel
from transformers.utils import logging

from conftest import (
    randomize_experts,
    sentencepiece_vocab_size,
    stop_signals_must_be_caught,
    train_sentencepiece,
    write_sentencepiece_tokenizer,
)
from transformers_hyperllava import HyperLlavaForConditionalGeneration
from transformers_hyperllava.conversion import convert_hyperllava_weights_to_hf as convert
from transformers_hyperllava.modeling_hyperllava import split_weights
from transformers_hyperllava.tiny import tiny_config
from transformers_hyperllava.tiny_tokenizer import DEFAULT_TEXTS, TEMPLATE_TEXT, tiny_processor, train_tokenizer

IMAGE_SIZE, PATCH = 28, 14
CLIP_MEAN, CLIP_STD = [0.25, 0.5, 0.75], [0.2, 0.3, 0.4]
# The position-ids buffer that CLIP checkpoints saved before Transformers stopped saving it (non-persistent now).
CLIP_POSITION_IDS = torch.arange((IMAGE_SIZE // PATCH) ** 2 + 1)[None]
VOCAB_KEYS = ("model.language_model.embed_tokens.weight", "lm_head.weight")  # grow with the tokens the converter adds
CODEBASE_ONLY_TOKENS = ("<unk>", "<s>", "</s>")  # LLaVA's Llama tokenizer knows neither <image> nor a pad token


# --- building inputs ------------------------------------------------------------------------------------------------


def codebase_tokenizer():
    tokenizer = Tokenizer(models.WordLevel(unk_token="<unk>"))
    tokenizer.pre_tokenizer = pre_tokenizers.Whitespace()
    tokenizer.train_from_iterator(
        [TEMPLATE_TEXT, *DEFAULT_TEXTS], trainers.WordLevelTrainer(special_tokens=list(CODEBASE_ONLY_TOKENS))
    )
    return PreTrainedTokenizerFast(tokenizer_object=tokenizer, unk_token="<unk>", bos_token="<s>", eos_token="</s>")


# The tiny CLIP's name, in LLaVA-1.5's "openai/clip-vit-large-patch14-336" form: its 28 px images at the end.
TOWER = "openai/clip-vit-tiny-patch14-28"


def reference_llava(vocab_size, image_token_id, pad_token_id, seed=0):
    """A stock LLaVA with every weight random (norms too, so that swapped names cannot go unnoticed)."""
    config = tiny_config(
        vocab_size=vocab_size, image_token_id=image_token_id, pad_token_id=pad_token_id
    ).to_llava_config()
    torch.manual_seed(seed)
    model = LlavaForConditionalGeneration(config).eval()
    with torch.no_grad():
        for name, param in model.named_parameters():
            is_norm_scale = "norm" in name and name.endswith("weight") and param.dim() == 1
            param.copy_(torch.randn_like(param) * 0.2 + (1.0 if is_norm_scale else 0.0))
    return model


def new_vocab_size(old, multiple=64):
    return -(-(old + 2) // multiple) * multiple  # + <image> + <pad>, rounded up


def codebase_key(key):
    """Transformers LLaVA name -> LLaVA-codebase name, written out independently of the converter's table."""
    replacements = [
        ("model.language_model.", "model."),
        ("model.multi_modal_projector.linear_1.", "model.mm_projector.0."),
        ("model.multi_modal_projector.linear_2.", "model.mm_projector.2."),
        ("model.vision_tower.", "model.vision_tower.vision_tower.vision_model."),
    ]
    for old, new in replacements:
        if key.startswith(old):
            return new + key[len(old) :]
    return key


def codebase_config(llava, **overrides):
    text = llava.config.text_config.to_dict()
    config = {
        **{k: v for k, v in text.items() if k not in ("model_type", "architectures", "dtype")},
        "architectures": ["LlavaLlamaForCausalLM"],
        "model_type": "llava_llama",
        "mm_vision_tower": TOWER,
        "mm_hidden_size": llava.config.vision_config.hidden_size,
        "mm_projector_type": "mlp2x_gelu",
        "mm_vision_select_layer": -2,
        "mm_vision_select_feature": "patch",
        "mm_patch_merge_type": "flat",
        "mm_use_im_start_end": False,
        "mm_use_im_patch_token": False,
        "image_aspect_ratio": "pad",
        "torch_dtype": "float32",
        **overrides,
    }
    return config


def write_shards(folder, tensors, num_shards, fmt):
    """Writes `tensors` in `num_shards` files with the index the LLaVA codebase (HF Trainer) writes."""
    folder.mkdir(parents=True, exist_ok=True)
    keys = list(tensors)
    weight_map = {}
    for i in range(num_shards):
        chunk = {k: tensors[k].contiguous() for k in keys[i::num_shards]}
        name = (
            f"pytorch_model-{i + 1:05d}-of-{num_shards:05d}.bin"
            if fmt != "safetensors"
            else f"model-{i + 1:05d}-of-{num_shards:05d}.safetensors"
        )
        if fmt == "safetensors":
            save_file(chunk, folder / name, {"format": "pt"})
        else:  # (torch's format before 1.6 for "legacy-bin")
            torch.save(chunk, folder / name, _use_new_zipfile_serialization=fmt == "bin")
        weight_map.update(dict.fromkeys(chunk, name))
    index = "pytorch_model.bin.index.json" if fmt != "safetensors" else "model.safetensors.index.json"
    (folder / index).write_text(json.dumps({"metadata": {}, "weight_map": weight_map}))


def write_clip(folder, llava, layout="CLIPModel", with_weights=True):
    """A CLIP folder (`CLIPModel` or `CLIPVisionModel` layout) holding LLaVA's vision tower."""
    folder.mkdir(parents=True, exist_ok=True)
    vision = llava.config.vision_config
    if layout == "CLIPModel":
        text = {"hidden_size": 16, "intermediate_size": 32, "num_hidden_layers": 1, "num_attention_heads": 2}
        CLIPConfig(text_config=text, vision_config=vision.to_dict(), projection_dim=8).save_pretrained(folder)
    else:
        vision.save_pretrained(folder)
    # CLIP's preprocessing, with a mean and std of its own so that the test can see them carried over.
    preprocessing = {
        "image_processor_type": "CLIPImageProcessor",
        "size": {"shortest_edge": vision.image_size},
        "crop_size": {"height": vision.image_size, "width": vision.image_size},
        "image_mean": CLIP_MEAN,
        "image_std": CLIP_STD,
        "resample": 3,
    }
    (folder / "preprocessor_config.json").write_text(json.dumps(preprocessing))
    if with_weights:
        tower = {f"vision_model.{k}": v for k, v in llava.model.vision_tower.state_dict().items()}
        tower["vision_model.embeddings.position_ids"] = CLIP_POSITION_IDS  # saved by older CLIP checkpoints
        if layout == "CLIPModel":  # the text tower and heads, which the converter must leave out
            tower.update(
                {
                    "text_model.embeddings.token_embedding.weight": torch.randn(10, 16),
                    "text_projection.weight": torch.randn(8, 16),
                    "visual_projection.weight": torch.randn(8, vision.hidden_size),
                    "logit_scale": torch.tensor(2.0),
                }
            )
        save_file({k: v.contiguous() for k, v in tower.items()}, folder / "model.safetensors", {"format": "pt"})
    return folder


def codebase_checkpoint(
    tmp_path, experts=None, fmt="bin", config_overrides=None, sentencepiece_model=None, extra_rows=0
):
    """A LLaVA-codebase stage-2 checkpoint (sharded, vision tower included) whose weights are those of a stock LLaVA
    `reference`, and a CLIP folder with the tower's config and preprocessing. The tokenizer is `codebase_tokenizer()`,
    or, given `sentencepiece_model` (a serialised SentencePiece model), only that model as LLaVA's releases ship it.
    The embedding and lm_head have a row per token, plus `extra_rows` trained rows no token uses yet."""
    tokenizer = codebase_tokenizer()
    old_vocab = len(tokenizer) if sentencepiece_model is None else sentencepiece_vocab_size(sentencepiece_model)
    rows = old_vocab + extra_rows
    vocab = new_vocab_size(old_vocab)
    reference = reference_llava(vocab, image_token_id=old_vocab, pad_token_id=old_vocab + 1)
    state = reference.state_dict()
    tensors = {}
    for key, value in state.items():
        if key in VOCAB_KEYS:
            value = value[:rows].clone()
            with torch.no_grad():
                state[key][rows:] = value.mean(0)  # what the reference expects for the new rows
        tensors[codebase_key(key)] = value
    # Old LLaVA checkpoints also hold the rotary buffers; they are recomputed from the config.
    tensors["model.layers.0.self_attn.rotary_emb.inv_freq"] = torch.ones(4)
    tensors["model.vision_tower.vision_tower.vision_model.embeddings.position_ids"] = CLIP_POSITION_IDS
    tensors.update(experts or {})
    checkpoint = tmp_path / "llava-run"
    write_shards(checkpoint, tensors, 3, fmt)
    overrides = dict(config_overrides or {})
    (checkpoint / "config.json").write_text(json.dumps(codebase_config(reference, **overrides)))
    if sentencepiece_model is None:
        tokenizer.save_pretrained(checkpoint)
    else:
        write_sentencepiece_tokenizer(checkpoint, sentencepiece_model)
    # The CLIP folder holds a tower of its own, as a real one does: the checkpoint's own (fine-tuned or not) must win.
    other = reference_llava(vocab, image_token_id=old_vocab, pad_token_id=old_vocab + 1, seed=1)
    clip = write_clip(tmp_path / "clip", other)
    return checkpoint, clip, reference


def hyperllava_folder(folder, **config_fields):
    """A HyperLLaVA folder as `hyperllava-train` writes it: trained (random) experts, the tokenizer (with <image> and
    <pad>, 56 tokens: not a multiple of 64) and the processor."""
    tokenizer = train_tokenizer(DEFAULT_TEXTS)
    config = tiny_config(vocab_size=len(tokenizer), **config_fields)
    torch.manual_seed(0)
    randomize_experts(HyperLlavaForConditionalGeneration(config)).save_pretrained(folder)
    tiny_processor(tokenizer, config).save_pretrained(folder)
    return folder


def run(*argv):
    return convert.main([str(a) for a in argv])


def inputs(vocab_low, image_token_id, seed=0, batch=2):
    generator = torch.Generator().manual_seed(seed)
    text = torch.randint(5, vocab_low, (batch, 6), generator=generator)
    image = torch.full((batch, (IMAGE_SIZE // PATCH) ** 2), image_token_id)
    input_ids = torch.cat([text[:, :1], image, text[:, 1:]], dim=1)
    pixel_values = torch.randn(batch, 3, IMAGE_SIZE, IMAGE_SIZE, generator=generator)
    return {"input_ids": input_ids, "pixel_values": pixel_values}


def converted_logits(folder, batch, dtype=torch.float32):
    model = HyperLlavaForConditionalGeneration.from_pretrained(folder, dtype=dtype).eval()
    with torch.no_grad():
        return model(**batch).logits, model


def reference_logits(reference, batch):
    with torch.no_grad():
        return reference(**batch).logits


# --- 1. numerics, per input layout ----------------------------------------------------------------------------------


# The LLaVA codebase's model type: "llava" before its 1.2 release (liuhaotian/llava-v1.5-7b), then "llava_llama".
@pytest.mark.parametrize(
    "fmt, model_type",
    [("bin", "llava_llama"), ("safetensors", "llava_llama"), ("bin", "llava"), ("legacy-bin", "llava_llama")],
)
def test_codebase_checkpoint_with_new_experts_equals_stock_llava(tmp_path, fmt, model_type):
    checkpoint, clip, reference = codebase_checkpoint(tmp_path, fmt=fmt, config_overrides={"model_type": model_type})
    out = tmp_path / "out"
    args = ["--visual-expert", "both", "--language-expert-layers", "all", "--language-guidance-layer", "0"]
    with LoggingLevel(logging.WARNING), CaptureLogger(logging.get_logger("transformers")) as log:
        assert run("--input", checkpoint, "--vision-tower", clip, "--output", out, "--dtype", "fp32", *args) == 0
    # Transformers knows no model_type `llava_llama`: nothing may load the codebase's config.json as a model config
    # (it warns that the checkpoint may not fit "a model of type ``").
    assert "llava_llama" not in log.out

    config = json.loads((out / "config.json").read_text())
    assert config["model_type"] == "hyperllava"
    assert (
        config["auto_map"]["AutoModelForImageTextToText"] == "modeling_hyperllava.HyperLlavaForConditionalGeneration"
    )
    old_vocab = len(codebase_tokenizer())
    batch = inputs(old_vocab, image_token_id=old_vocab)
    logits, model = converted_logits(out, batch)
    torch.testing.assert_close(logits, reference_logits(reference, batch), atol=1e-5, rtol=1e-5)
    # The experts are new, and as the model initialises them: W_d random, W_u zero.
    expert = model.model.language_model.language_expert
    w_down, w_up = split_weights(expert(torch.randn(1, 32)), expert.in_dim, expert.rank, expert.out_dim)
    assert torch.count_nonzero(w_up) == 0 and torch.count_nonzero(w_down) > 0

    tokenizer = PreTrainedTokenizerFast.from_pretrained(out)
    assert tokenizer.convert_tokens_to_ids("<image>") == old_vocab == config["image_token_index"]
    assert tokenizer.pad_token == "<pad>" and tokenizer.pad_token_id == config["text_config"]["pad_token_id"]
    assert tokenizer.padding_side == "left"  # saved, not only set: batched generation pads on the left
    # LLaVA-1.5's preprocessing: the CLIP folder's, padded to a square with the mean colour (image_aspect_ratio "pad").
    images = json.loads((out / "processor_config.json").read_text())["image_processor"]
    assert images["do_pad"] is True and images["crop_size"] == {"height": IMAGE_SIZE, "width": IMAGE_SIZE}
    assert images["image_mean"] == CLIP_MEAN and images["image_std"] == CLIP_STD


@pytest.mark.parametrize(
    "clip_layout, stage_config", [("CLIPModel", True), ("CLIPVisionModel", True), ("CLIPModel", False)]
)
def test_stage1_projector_with_base_llm_and_clip_tower_equals_stock_llava(tmp_path, clip_layout, stage_config):
    tokenizer = codebase_tokenizer()
    old_vocab = len(tokenizer)
    reference = reference_llava(new_vocab_size(old_vocab), image_token_id=old_vocab, pad_token_id=old_vocab + 1)
    state = reference.state_dict()
    # Stage 1 saves only the projector, under the codebase's names.
    stage1 = tmp_path / "stage1"
    stage1.mkdir()
    projector = {codebase_key(k): v for k, v in state.items() if k.startswith("model.multi_modal_projector.")}
    torch.save(projector, stage1 / "mm_projector.bin")
    if stage_config:  # (without it: the projector file alone, read with LLaVA-1.5's settings)
        (stage1 / "config.json").write_text(json.dumps(codebase_config(reference)))
    # The base LLM: a plain LlamaForCausalLM folder with its tokenizer.
    base = tmp_path / "vicuna"
    llm = {codebase_key(k): v for k, v in state.items() if "language_model" in k or k == "lm_head.weight"}
    for key in ("model.embed_tokens.weight", "lm_head.weight"):
        llm[key] = llm[key][:old_vocab].clone()
    for key in VOCAB_KEYS:
        with torch.no_grad():
            state[key][old_vocab:] = state[key][:old_vocab].mean(0)
    write_shards(base, llm, 1, "safetensors")
    llama_config = {
        **reference.config.text_config.to_dict(),
        "vocab_size": old_vocab,
        "architectures": ["LlamaForCausalLM"],
    }
    (base / "config.json").write_text(json.dumps(llama_config))
    tokenizer.save_pretrained(base)
    clip = write_clip(tmp_path / "clip", reference, layout=clip_layout)

    out = tmp_path / "out"
    argv = ["--input", stage1 / "mm_projector.bin", "--base-model", base, "--vision-tower", clip, "--output", out]
    assert run(*argv) == 0
    batch = inputs(old_vocab, image_token_id=old_vocab)
    logits, _ = converted_logits(out, batch)
    torch.testing.assert_close(logits, reference_logits(reference, batch), atol=1e-5, rtol=1e-5)


def v4_llava_hf_key(key):
    """The names llava-hf checkpoints on the Hub still use (Transformers 4.x)."""
    if key.startswith("model.language_model."):
        return "language_model.model." + key[len("model.language_model.") :]
    if key == "lm_head.weight":
        return "language_model.lm_head.weight"
    if key.startswith("model.vision_tower."):
        return "vision_tower.vision_model." + key[len("model.vision_tower.") :]
    return key[len("model.") :]


@pytest.mark.parametrize("names", ["v5", "v4"])
def test_llava_hf_checkpoint_upgrades_with_new_experts(tmp_path, names):
    tokenizer = train_tokenizer(DEFAULT_TEXTS)
    reference = reference_llava(64, image_token_id=4, pad_token_id=3)
    source = tmp_path / "llava-1.5-7b-hf"
    reference.save_pretrained(source)
    tiny_processor(tokenizer, tiny_config(vocab_size=64)).save_pretrained(source)
    if names == "v4":
        for path in source.glob("*.safetensors"):
            path.unlink()
        state = {v4_llava_hf_key(k): v for k, v in reference.state_dict().items()}
        state["vision_tower.vision_model.embeddings.position_ids"] = CLIP_POSITION_IDS  # as 4.x saved it
        save_file(state, source / "model.safetensors", {"format": "pt"})

    out = tmp_path / "out"
    assert run("--input", source, "--output", out, "--expert-mode", "latent") == 0
    batch = inputs(len(tokenizer), image_token_id=4)
    logits, model = converted_logits(out, batch)
    assert model.config.expert_mode == "latent"
    torch.testing.assert_close(logits, reference_logits(reference, batch), atol=1e-5, rtol=1e-5)


def test_this_packages_stage1_output_with_the_model_it_started_from(tmp_path):
    """`hyperllava-train --stage align` writes the projector and visual expert only (`mm_projector.safetensors`, the
    model's own names); with the HyperLLaVA folder it started from as --base-model it makes a whole model."""
    from transformers_hyperllava.training import PROJECTOR_FILE, load_trained_weights, save_trained_weights

    tokenizer = train_tokenizer(DEFAULT_TEXTS)
    config = tiny_config(vocab_size=len(tokenizer), visual_expert="both")
    torch.manual_seed(0)
    base = HyperLlavaForConditionalGeneration(config).eval()
    base.save_pretrained(tmp_path / "base")
    processor = tiny_processor(tokenizer, config)
    # Image preprocessing of the base's own (not CLIP's defaults, not padded): the output keeps it.
    processor.image_processor.image_mean, processor.image_processor.do_pad = [0.1, 0.2, 0.3], False
    processor.save_pretrained(tmp_path / "base")
    # Stage 1's result: the projector and the visual experts trained (here: changed), saved as stage 1 saves them.
    trained = HyperLlavaForConditionalGeneration.from_pretrained(tmp_path / "base").eval()
    with torch.no_grad():
        for name, param in trained.named_parameters():
            param.requires_grad_(name.startswith("model.multi_modal_projector."))
            if param.requires_grad:
                param.add_(torch.randn_like(param) * 0.1)
    (tmp_path / "align").mkdir()
    save_trained_weights(trained.state_dict(), trained, tmp_path / "align" / PROJECTOR_FILE)

    out = tmp_path / "out"
    assert run("--input", tmp_path / "align" / PROJECTOR_FILE, "--base-model", tmp_path / "base", "--output", out) == 0
    expected = HyperLlavaForConditionalGeneration.from_pretrained(tmp_path / "base").eval()
    load_trained_weights(expected, tmp_path / "align" / PROJECTOR_FILE)  # as stage 2 loads --pretrained_projector
    batch = inputs(len(tokenizer), image_token_id=config.image_token_id)
    logits, _ = converted_logits(out, batch)
    torch.testing.assert_close(logits, reference_logits(expected, batch), atol=1e-5, rtol=1e-5)
    assert not torch.allclose(logits, reference_logits(base, batch), atol=1e-3)  # (stage 1's weights matter)
    image_processor = AutoProcessor.from_pretrained(out).image_processor
    assert list(image_processor.image_mean) == [0.1, 0.2, 0.3] and image_processor.do_pad is False


def test_a_hyperllava_folder_keeps_its_vocabulary_and_trained_experts_and_gets_the_new_ones_fresh(tmp_path):
    """Converted again (to add an expert here), a HyperLLaVA folder whose tokenizer gains no token keeps its vocabulary
    size: rows added by rounding it up would have no token, and sampling would pick them. Its trained experts are
    carried over; the one the command line adds (it had none) starts as the identity."""
    source = hyperllava_folder(tmp_path / "hyperllava", visual_expert="first")
    out = tmp_path / "out"
    assert run("--input", source, "--output", out, "--visual-expert", "both") == 0
    vocab = len(train_tokenizer(DEFAULT_TEXTS))
    assert json.loads((out / "config.json").read_text())["text_config"]["vocab_size"] == vocab
    assert "model.multi_modal_projector.visual_expert_second" in expert_modules(out)
    batch = inputs(vocab, image_token_id=4)
    logits, _ = converted_logits(out, batch)
    expected = HyperLlavaForConditionalGeneration.from_pretrained(source).eval()
    torch.testing.assert_close(logits, reference_logits(expected, batch), atol=1e-5, rtol=1e-5)


@pytest.mark.parametrize(
    "module", ["model.language_model.language_expert", "model.multi_modal_projector.visual_expert_second"]
)
def test_trained_experts_missing_from_a_hyperllava_folder_are_named_not_replaced(tmp_path, capsys, module):
    """Its config says the folder holds this expert: without its weights, a fresh one would silently stand in for the
    trained one."""
    source = hyperllava_folder(tmp_path / "hyperllava", visual_expert="both")
    weights = load_file(source / "model.safetensors")
    removed = [key for key in weights if key.startswith(module + ".")]
    save_file({k: v for k, v in weights.items() if k not in removed}, source / "model.safetensors", {"format": "pt"})
    err = convert_failing(tmp_path, capsys, "--input", source)
    assert f"{len(removed)} weights are missing from the inputs" in err and all(key in err for key in removed)


# Expert parameters by the shapes docs/model.md gives (L layers, m = embedding, g = guidance, h = hypernetwork hidden,
# P = 2 r d_in + r d_out), under the LLaVA-codebase names the converter documents.
M, H, R = 8, 8, 4


def random_expert(prefix, layers, d_in, d_out, generator):
    params = 2 * R * d_in + R * d_out
    shapes = {
        "encoder_weight": (layers, M, d_in),
        "encoder_bias": (layers, M),
        "hyper_in.weight": (H, M),
        "hyper_in.bias": (H,),
        "hyper_out.weight": (params, H),
        "hyper_out.bias": (params,),
        "layer_bias": (layers, params),
    }
    return {f"{prefix}.{name}": torch.randn(shape, generator=generator) * 0.2 for name, shape in shapes.items()}


def expert_weights(p, guidance, layer):
    """Eqs. 2-3: K(n) = W2 (W1 Enc_n(g) + B1) + B2 + b(n)."""
    embedding = p["encoder_weight"][layer] @ guidance + p["encoder_bias"][layer]
    return (
        p["hyper_out.weight"] @ (p["hyper_in.weight"] @ embedding + p["hyper_in.bias"])
        + p["hyper_out.bias"]
        + p["layer_bias"][layer]
    )


def adapter(x, k, d_in, d_out):
    """Eq. 4: SwiGLU(x W_d) W_u, W_d (d_in x 2r) then W_u (r x d_out) read in order from K."""
    w_down = k[: 2 * R * d_in].reshape(d_in, 2 * R)
    w_up = k[2 * R * d_in :].reshape(R, d_out)
    gate, value = (x @ w_down).split(R, dim=-1)
    return (F.silu(gate) * value) @ w_up


def llava_plus_expert_equations(reference, experts, expert_layers, guidance_layer, batch):
    """Stock LLaVA's modules with the experts' equations added by hooks, one sample at a time."""
    visual_1 = {k.split(".", 2)[2]: v for k, v in experts.items() if k.startswith("model.mm_visual_expert_first.")}
    visual_2 = {k.split(".", 2)[2]: v for k, v in experts.items() if k.startswith("model.mm_visual_expert_second.")}
    language = {k.split(".", 2)[2]: v for k, v in experts.items() if k.startswith("model.language_expert.")}
    projector = reference.model.multi_modal_projector
    text = reference.model.language_model
    d = text.config.hidden_size
    generated = {}

    def shift(params):  # per image, guidance = the mean of the expert's input over the patches
        def hook(module, args, out):
            return out + torch.stack(
                [adapter(f, expert_weights(params, f.mean(0), 0), f.shape[-1], out.shape[-1]) for f in args[0]]
            )

        return hook

    def make_language_weights(module, args):
        hidden = args[0]  # the hidden state after layer k-1: the guidance, pooled over the (unpadded) prompt
        for slot, layer in enumerate(expert_layers):
            generated[layer] = [expert_weights(language, h.mean(0), slot) for h in hidden]

    def language_branch(layer):
        def hook(module, args, out):  # beside the FFN, reading the FFN's normalised input
            return out + torch.stack([adapter(x, k, d, d) for x, k in zip(args[0], generated[layer])])

        return hook

    hooks = [
        projector.linear_1.register_forward_hook(shift(visual_1)),  # "first": inside the GELU
        projector.linear_2.register_forward_hook(shift(visual_2)),  # "second": after linear_2, reading GELU(...)
        text.layers[guidance_layer].register_forward_pre_hook(make_language_weights),
    ]
    hooks += [text.layers[i].mlp.register_forward_hook(language_branch(i)) for i in expert_layers]
    try:
        return reference_logits(reference, batch)
    finally:
        for hook in hooks:
            hook.remove()


def test_trained_expert_weights_equal_the_expert_equations(tmp_path):
    """In float64, where a guidance taken one layer off would show (and k is not the default L // 2 = 2)."""
    generator = torch.Generator().manual_seed(1)
    d_v, d = 24, 32
    expert_layers, k = [2, 3], 1
    experts = {
        **random_expert("model.mm_visual_expert_first", 1, d_v, d, generator),
        **random_expert("model.mm_visual_expert_second", 1, d, d, generator),
        **random_expert("model.language_expert", len(expert_layers), d, d, generator),
    }
    settings = {
        "visual_expert": "both",
        "language_expert_layers": expert_layers,
        "language_guidance_layer": k,
        "expert_embedding_dim": M,
        "expert_bottleneck_dim": R,
        "hypernetwork_hidden_dim": H,
    }
    checkpoint, clip, reference = codebase_checkpoint(tmp_path, experts=experts, config_overrides=settings)
    out = tmp_path / "out"
    assert run("--input", checkpoint, "--vision-tower", clip, "--output", out, "--dtype", "fp32") == 0
    assert json.loads((out / "config.json").read_text())["language_guidance_layer"] == k
    old_vocab = len(codebase_tokenizer())
    batch = inputs(old_vocab, image_token_id=old_vocab)
    batch["pixel_values"] = batch["pixel_values"].double()
    logits, _ = converted_logits(out, batch, dtype=torch.float64)
    reference, experts = reference.double(), {name: value.double() for name, value in experts.items()}
    expected = llava_plus_expert_equations(reference, experts, expert_layers, k, batch)
    assert (expected - reference_logits(reference, batch)).abs().max() > 1e-2  # the experts matter here
    # The guidance one layer later moves the logits by about 6e-5 here: far beyond float64 rounding.
    moved = llava_plus_expert_equations(reference, experts, expert_layers, k + 1, batch)
    assert (moved - expected).abs().max() > 1e-6
    torch.testing.assert_close(logits, expected, atol=1e-10, rtol=0)


def test_new_experts_depend_on_seed_only(tmp_path):
    """`--seed` makes new experts reproducible, whatever the global random state; another seed gives others."""
    checkpoint, clip, _ = codebase_checkpoint(tmp_path)
    experts = {}
    for seed, global_seed in ((1, 123), (1, 456), (2, 123)):
        torch.manual_seed(global_seed)
        out = tmp_path / f"out-{seed}-{global_seed}"
        assert run("--input", checkpoint, "--vision-tower", clip, "--output", out, "--seed", seed) == 0
        experts[seed, global_seed] = HyperLlavaForConditionalGeneration.from_pretrained(out).model.state_dict()
    names = [name for name in experts[1, 123] if "expert" in name]
    assert names
    assert all(torch.equal(experts[1, 123][name], experts[1, 456][name]) for name in names)
    assert not all(torch.equal(experts[1, 123][name], experts[2, 123][name]) for name in names)


def expert_modules(folder):
    """{expert module: number of layers it generates weights for} of a converted folder, read from its shards."""
    modules = {}
    for shard in folder.glob("*.safetensors"):
        with safe_open(shard, "pt") as f:
            for key in f.keys():  # noqa: SIM118 (safe_open is not iterable)
                parts = key.split(".")
                at = next((i for i, part in enumerate(parts) if "expert" in part), None)
                if at is not None:
                    module = ".".join(parts[: at + 1])
                    if parts[at + 1 :] == ["layer_bias"]:  # (layers, P): one row per layer
                        modules[module] = f.get_slice(key).get_shape()[0]
                    else:
                        modules.setdefault(module, None)
    return modules


@pytest.mark.parametrize(
    "settings, cli, expected, experts",
    [
        (
            {"visual_expert": "both", "language_expert_layers": None, "language_guidance_layer": 0},
            ["--visual-expert", "none", "--language-expert-layers", "1,3", "--language-guidance-layer", "1"],
            {"visual_expert": None, "language_expert_layers": [1, 3], "language_guidance_layer": 1},
            {"model.language_model.language_expert": 2},
        ),
        (
            {"visual_expert": None, "language_expert_layers": "all", "language_guidance_layer": 0},
            ["--visual-expert", "first", "--language-expert-layers", "none"],
            # (the guidance layer, not given here, is the input config's)
            {"visual_expert": "first", "language_expert_layers": None, "language_guidance_layer": 0},
            {"model.multi_modal_projector.visual_expert_first": 1},
        ),
    ],
    ids=["no-visual-expert-layer-list", "no-language-expert"],
)
def test_expert_options_none_and_layer_list_override_the_input_config(tmp_path, settings, cli, expected, experts):
    # The input config asks for other experts (`settings`): the command line wins. It removes the input's experts
    # (whose weights are absent: none is left unused) and adds those the input lacks, new.
    checkpoint, clip, reference = codebase_checkpoint(tmp_path, fmt="safetensors", config_overrides=settings)
    out = tmp_path / "out"
    assert run("--input", checkpoint, "--vision-tower", clip, "--output", out, *cli) == 0

    config = json.loads((out / "config.json").read_text())
    assert {field: config[field] for field in expected} == expected
    assert expert_modules(out) == experts

    # The folder loads with those experts only, and (new experts: W_u zero) computes what stock LLaVA computes.
    old_vocab = len(codebase_tokenizer())
    batch = inputs(old_vocab, image_token_id=old_vocab)
    logits, model = converted_logits(out, batch)
    projector, text = model.model.multi_modal_projector, model.model.language_model
    assert {
        name
        for name, module in [
            ("model.multi_modal_projector.visual_expert_first", projector.visual_expert_first),
            ("model.multi_modal_projector.visual_expert_second", projector.visual_expert_second),
            ("model.language_model.language_expert", text.language_expert),
        ]
        if module is not None
    } == set(experts)
    assert model.config.language_expert_layer_indices == (expected["language_expert_layers"] or [])
    torch.testing.assert_close(logits, reference_logits(reference, batch), atol=1e-5, rtol=1e-5)


def test_vision_tower_named_by_mm_vision_tower_comes_from_the_hub_cache(tmp_path, monkeypatch):
    # The usual stage-2 run: the config names the tower (LLaVA-1.5's "openai/clip-vit-large-patch14-336"), the checkpoint
    # holds the weights.
    checkpoint, clip, reference = codebase_checkpoint(tmp_path)
    add_to_hub_cache(tmp_path / "hub", TOWER, clip)
    monkeypatch.setattr(constants, "HF_HUB_CACHE", str(tmp_path / "hub"))
    out = tmp_path / "out"
    assert run("--input", checkpoint, "--output", out) == 0
    old_vocab = len(codebase_tokenizer())
    batch = inputs(old_vocab, image_token_id=old_vocab)
    logits, _ = converted_logits(out, batch)
    torch.testing.assert_close(logits, reference_logits(reference, batch), atol=1e-5, rtol=1e-5)


@pytest.mark.parametrize("extra_rows", [0, 6])
def test_codebase_checkpoint_with_sentencepiece_only_tokenizer(tmp_path, extra_rows):
    # LLaVA-1.5's releases ship Llama's tokenizer as tokenizer.model + tokenizer_config.json, no tokenizer.json; the
    # embedding has a row per SentencePiece piece, or (extra_rows) more rows than pieces, which <image> and <pad> take.
    model = train_sentencepiece()
    rows = sentencepiece_vocab_size(model) + extra_rows
    checkpoint, clip, reference = codebase_checkpoint(
        tmp_path,
        fmt="safetensors",
        sentencepiece_model=model,
        extra_rows=extra_rows,
        config_overrides={"vocab_size": rows},  # as LLaVA's config.json: the embedding's rows
    )
    assert not (checkpoint / "tokenizer.json").exists()
    out = tmp_path / "out"
    assert run("--input", checkpoint, "--vision-tower", clip, "--output", out) == 0

    # A fast tokenizer, with <image> and <pad> after the SentencePiece pieces, that encodes as SentencePiece does.
    assert (out / "tokenizer.json").is_file()
    tokenizer = PreTrainedTokenizerFast.from_pretrained(out)
    old_vocab = sentencepiece_vocab_size(model)
    assert tokenizer.convert_tokens_to_ids(["<image>", "<pad>"]) == [old_vocab, old_vocab + 1]
    assert tokenizer.pad_token == "<pad>"
    pieces = sentencepiece.SentencePieceProcessor(model_proto=model)
    texts = [
        "What is in the image?",
        "USER: describe  the picture,\tin detail!  ASSISTANT:",  # double spaces and a tab are kept, as in Llama
        "A cat next to 12 green boxes",  # digits are split
        "Unseen words: zebra, café, 東京 🙂",  # unseen characters fall back to their bytes
    ]
    # (Texts start with a non-space, as prompts do: Transformers' Llama tokenizer prepends no "▁" to a text that
    # starts with a space, where SentencePiece does; docs/conversion.md notes it.)
    for text in texts:
        assert tokenizer(text).input_ids == [pieces.bos_id(), *pieces.encode(text)], text

    # The processor expands <image> to the tower's patch count; the model then computes what stock LLaVA does.
    processor = convert.HyperLlavaProcessor.from_pretrained(out)
    prompt = "USER: <image>\nWhat is in the image? ASSISTANT:"
    image = Image.fromarray(np.random.default_rng(0).integers(0, 255, (20, 36, 3), dtype=np.uint8))
    batch = processor(images=image, text=prompt, return_tensors="pt")
    unexpanded = tokenizer(prompt).input_ids
    assert unexpanded.count(old_vocab) == 1
    at = unexpanded.index(old_vocab)
    expected_ids = unexpanded[:at] + [old_vocab] * (IMAGE_SIZE // PATCH) ** 2 + unexpanded[at + 1 :]
    assert batch["input_ids"][0].tolist() == expected_ids
    batch = {"input_ids": batch["input_ids"], "pixel_values": batch["pixel_values"]}
    logits, _ = converted_logits(out, batch)
    torch.testing.assert_close(logits, reference_logits(reference, batch), atol=1e-5, rtol=1e-5)


# --- 2. shards, dtype, streaming ------------------------------------------------------------------------------------


def test_output_shards_dtype_and_one_input_file_open_at_a_time(tmp_path, monkeypatch):
    checkpoint, clip, reference = codebase_checkpoint(tmp_path, fmt="safetensors")
    open_now, most_open = [0], [0]
    original = convert.open_weights

    def counting_open(path):
        manager = original(path)

        class Counting:
            def __enter__(self):
                open_now[0] += 1
                most_open[0] = max(most_open[0], open_now[0])
                return manager.__enter__()

            def __exit__(self, *exc):
                open_now[0] -= 1
                return manager.__exit__(*exc)

        return Counting()

    monkeypatch.setattr(convert, "open_weights", counting_open)
    out = tmp_path / "out"
    assert (
        run(
            "--input",
            checkpoint,
            "--vision-tower",
            clip,
            "--output",
            out,
            "--dtype",
            "bf16",
            "--max-shard-size",
            "40KB",
        )
        == 0
    )
    assert most_open[0] == 1

    index = json.loads((out / "model.safetensors.index.json").read_text())
    shards = sorted(set(index["weight_map"].values()))
    assert len(shards) > 3 and shards == sorted(p.name for p in out.glob("model-*.safetensors"))
    expected_state = reference.state_dict()
    seen = set()
    for shard in shards:
        with safe_open(out / shard, "pt") as f:
            keys = f.keys()
            sizes = [f.get_tensor(k).numel() * 2 for k in keys]
            assert sum(sizes) <= 40_000 or len(sizes) == 1
            for key in keys:
                tensor = f.get_tensor(key)
                assert tensor.dtype == torch.bfloat16, key
                if key in expected_state:
                    torch.testing.assert_close(tensor, expected_state[key].to(torch.bfloat16), atol=0, rtol=0)
                seen.add(key)
    assert seen == set(index["weight_map"])


# --- 3. loading the output as users do ------------------------------------------------------------------------------

LOAD_AND_GENERATE = textwrap.dedent(
    """
    import sys, json
    sys.modules["transformers_hyperllava"] = None  # the package is absent: the shipped code must do
    sys.modules["triton"] = None  # and so is Triton, as on a CPU build of torch, macOS or Windows
    import numpy as np, torch
    from PIL import Image
    from transformers import AutoModelForImageTextToText, AutoProcessor

    name = sys.argv[1]
    model = AutoModelForImageTextToText.from_pretrained(name, trust_remote_code=True).eval()
    processor = AutoProcessor.from_pretrained(name, trust_remote_code=True)
    image = Image.fromarray(np.random.default_rng(0).integers(0, 255, (20, 36, 3), dtype=np.uint8))
    messages = [{"role": "user", "content": [{"type": "image"}, {"type": "text", "text": "What is in the image?"}]}]
    prompt = processor.apply_chat_template(messages, add_generation_prompt=True)
    batch = processor(images=image, text=prompt, return_tensors="pt")
    generated = model.generate(**batch, max_new_tokens=5, do_sample=False)
    import transformers
    print(json.dumps({"module": type(model).__module__, "processor": type(processor).__name__,
                      "transformers": transformers.__version__,
                      "input_ids": batch["input_ids"].tolist(), "pixel_values": batch["pixel_values"].tolist(),
                      "generated": generated.tolist()}))
    """
)


def add_to_hub_cache(cache, repo_id, folder):
    """`folder` as huggingface_hub lays out a downloaded `repo_id`: models--org--name/snapshots/<sha>, refs/main."""
    repo = cache / f"models--{repo_id.replace('/', '--')}"
    sha = "0123456789abcdef0123456789abcdef01234567"
    shutil.copytree(folder, repo / "snapshots" / sha)
    (repo / "refs").mkdir()
    (repo / "refs" / "main").write_text(sha)


def test_output_loads_with_remote_code_from_folder_and_offline_hub_cache(tmp_path):
    checkpoint, clip, reference = codebase_checkpoint(tmp_path)
    out = tmp_path / "out"
    assert run("--input", checkpoint, "--vision-tower", clip, "--output", out, "--dtype", "fp32") == 0
    cache = tmp_path / "hub"
    add_to_hub_cache(cache, "org/hyperllava-7b", out)

    env = {
        **os.environ,
        "HF_HUB_OFFLINE": "1",
        "HF_HUB_CACHE": str(cache),
        "HF_MODULES_CACHE": str(tmp_path / "modules"),
    }
    results = []
    for name in (str(out), "org/hyperllava-7b"):
        done = subprocess.run(
            [sys.executable, "-c", LOAD_AND_GENERATE, name],
            env=env,
            capture_output=True,
            text=True,
            cwd=tmp_path,
            check=False,
        )
        assert done.returncode == 0, done.stderr[-3000:]
        results.append(json.loads(done.stdout.strip().splitlines()[-1]))
    for result in results:
        assert result["module"].startswith("transformers_modules.")
        assert result["processor"] == "HyperLlavaProcessor"
        assert result["transformers"] == transformers.__version__  # (the release under test, in CI's 5.17 run too)
    assert results[0]["generated"] == results[1]["generated"]

    # The same prompt through the installed package's model gives the same tokens.
    model = HyperLlavaForConditionalGeneration.from_pretrained(out).eval()
    batch = {
        "input_ids": torch.tensor(results[0]["input_ids"]),
        "pixel_values": torch.tensor(results[0]["pixel_values"]),
    }
    generated = model.generate(**batch, max_new_tokens=5, do_sample=False)
    assert generated.tolist() == results[0]["generated"]
    assert len(generated[0]) == len(results[0]["input_ids"][0]) + 5
    # And, its experts new (the identity), the stock LLaVA the checkpoint holds gives them too.
    assert reference.generate(**batch, max_new_tokens=5, do_sample=False).tolist() == results[0]["generated"]


# --- 4. errors: clear message, non-zero exit, nothing written ------------------------------------------------------


def convert_failing(tmp_path, capsys, *argv):
    out = tmp_path / "out"
    code = run(*argv, "--output", out)
    assert code != 0
    assert not out.exists() and not list(tmp_path.glob(".out.*"))
    return capsys.readouterr().err


def test_missing_unexpected_and_misshapen_keys_are_listed(tmp_path, capsys):
    checkpoint, clip, _ = codebase_checkpoint(tmp_path, fmt="safetensors")
    shard = checkpoint / "model-00002-of-00003.safetensors"
    with safe_open(shard, "pt") as f:
        tensors = {k: f.get_tensor(k) for k in f.keys()}  # noqa: SIM118 (safe_open is not iterable)
    dropped = next(k for k in tensors if k.startswith("model.layers.1.mlp"))
    del tensors[dropped]
    tensors["model.mm_projector.4.weight"] = torch.zeros(2, 2)
    save_file(tensors, shard, {"format": "pt"})
    base = ["--input", checkpoint, "--vision-tower", clip]

    err = convert_failing(tmp_path, capsys, *base)
    assert "model.mm_projector.4.weight" in err and "--allow-unused" in err

    err = convert_failing(tmp_path, capsys, *base, "--allow-unused")
    assert dropped.replace("model.", "model.language_model.", 1) in err and "missing" in err

    # A config whose sizes do not match the weights: every key, with the expected and found shapes.
    config = json.loads((checkpoint / "config.json").read_text())
    (checkpoint / "config.json").write_text(json.dumps({**config, "intermediate_size": 48}))
    tensors[dropped] = torch.zeros(64, 32) if "down" not in dropped else torch.zeros(32, 64)
    save_file(tensors, shard, {"format": "pt"})
    err = convert_failing(tmp_path, capsys, *base, "--allow-unused")
    assert "model.layers.0.mlp.gate_proj.weight -> model.language_model.layers.0.mlp.gate_proj.weight" in err
    assert "expected [48, 32], found [64, 32]" in err


@pytest.mark.parametrize(
    "setting, value",
    [
        ("mm_projector_type", "linear"),
        ("image_aspect_ratio", "anyres"),
        ("mm_vision_select_feature", "cls"),
        ("torch_dtype", "bogus"),
    ],
)
def test_config_the_converter_cannot_map_is_refused(tmp_path, capsys, setting, value):
    checkpoint, clip, _ = codebase_checkpoint(tmp_path, config_overrides={setting: value})
    err = convert_failing(tmp_path, capsys, "--input", checkpoint, "--vision-tower", clip)
    assert setting in err and repr(value) in err


def _projector_width_mismatch(tmp_path, checkpoint, clip):
    # The tower's hidden size is 24: a projector trained on another tower's features.
    return [], ["mm_hidden_size=16 does not match the vision tower's hidden_size 24", str(clip)]


def _unknown_model_type(tmp_path, checkpoint, clip):
    return [], ["model_type='qwen2_vl'", "Qwen2VLForConditionalGeneration"]


def _siglip_vision_tower(tmp_path, checkpoint, clip):
    siglip = tmp_path / "siglip"
    vision = {"hidden_size": 24, "intermediate_size": 48, "num_hidden_layers": 1, "num_attention_heads": 4}
    SiglipVisionConfig(image_size=IMAGE_SIZE, patch_size=PATCH, **vision).save_pretrained(siglip)
    return ["--vision-tower", siglip], [f"the vision tower in {siglip} is a 'siglip_vision_model'", "maps CLIP only"]


def _index_lists_a_missing_shard(tmp_path, checkpoint, clip):
    (checkpoint / "model-00002-of-00003.safetensors").unlink()
    index = checkpoint / "model.safetensors.index.json"
    return [], [f"{index} lists shards that do not exist: ['model-00002-of-00003.safetensors']"]


def _base_model_without_config(tmp_path, checkpoint, clip):
    base = tmp_path / "vicuna"  # an LLM folder whose config.json did not come along
    codebase_tokenizer().save_pretrained(base)
    return ["--base-model", base], [f"--base-model {base} has no config.json"]


def _no_tokenizer(tmp_path, checkpoint, clip):
    for path in checkpoint.iterdir():
        if path.name.startswith(("tokenizer", "special_tokens_map")):
            path.unlink()
    return [], [f"no tokenizer in [{str(checkpoint)!r}]; pass --tokenizer"]


def _tokenizer_folder_without_one(tmp_path, checkpoint, clip):
    images = tmp_path / "images"  # (a wrong folder given)
    images.mkdir()
    names = list(convert.TOKENIZER_FILES)
    return ["--tokenizer", images], [f"--tokenizer {images} holds no tokenizer (none of {names})"]


def _peft_adapter_checkpoint(tmp_path, checkpoint, clip):
    (checkpoint / "adapter_config.json").write_text(json.dumps({"peft_type": "LORA"}))
    return [], [f"{checkpoint} is a PEFT adapter checkpoint", "merge_and_unload()"]


def _plain_llama_folder(tmp_path, checkpoint, clip):
    # The LLM that stage 1 trains on, given as --input: its config has no mm_* field.
    config = json.loads((checkpoint / "config.json").read_text())
    config = {k: v for k, v in config.items() if not k.startswith("mm_") and k != "image_aspect_ratio"}
    (checkpoint / "config.json").write_text(json.dumps({**config, "model_type": "llama"}))
    return [], [
        f"--input {checkpoint} is a language model without a projector (LlamaForCausalLM): pass it as --base-model",
        "stage-1 mm_projector file",
    ]


def _declared_expert_without_weights(tmp_path, checkpoint, clip):
    # A HyperLLaVA-codebase config (the expert fields) says the run trained a second visual expert; none is saved.
    keys = [f"model.multi_modal_projector.visual_expert_second.{name}" for name in ("encoder_weight", "hyper_in.bias")]
    return [], ["7 weights are missing from the inputs", *keys]


def _bad_expert_field_replaced_by_a_flag(tmp_path, checkpoint, clip):
    # The flag makes the converted model's settings valid, but the input's own say which experts it holds.
    return ["--language-guidance-layer", "1"], [
        f"the expert settings of the config in {checkpoint} are invalid",
        "language_guidance_layer must be an integer in 0..3, got 9",
    ]


def _bad_expert_field(tmp_path, checkpoint, clip):
    # A field the input's config carries (a HyperLLaVA-codebase checkpoint): refused by HyperLlavaConfig's own check.
    return [], [f"cannot build a HyperLLaVA config from {checkpoint}", "'expert_bottleneck_dim'", "got 0"]


@pytest.mark.parametrize(
    "config_overrides, problem",
    [
        pytest.param(overrides, problem, id=problem.__name__.strip("_"))
        for overrides, problem in [
            ({"mm_hidden_size": 16}, _projector_width_mismatch),
            ({"model_type": "qwen2_vl", "architectures": ["Qwen2VLForConditionalGeneration"]}, _unknown_model_type),
            ({}, _siglip_vision_tower),
            ({}, _index_lists_a_missing_shard),
            ({}, _base_model_without_config),
            ({}, _no_tokenizer),
            ({}, _tokenizer_folder_without_one),
            ({}, _peft_adapter_checkpoint),
            ({"architectures": ["LlamaForCausalLM"]}, _plain_llama_folder),
            ({"visual_expert": "second", "language_expert_layers": None}, _declared_expert_without_weights),
            ({"expert_bottleneck_dim": 0}, _bad_expert_field),
            ({"language_guidance_layer": 9}, _bad_expert_field_replaced_by_a_flag),
        ]
    ],
)
def test_inputs_the_converter_cannot_use_are_named(tmp_path, capsys, config_overrides, problem):
    checkpoint, clip, _ = codebase_checkpoint(tmp_path, fmt="safetensors", config_overrides=config_overrides)
    argv, messages = problem(tmp_path, checkpoint, clip)
    err = convert_failing(tmp_path, capsys, "--input", checkpoint, "--vision-tower", clip, *argv)
    for message in messages:
        assert message in err


def test_sentencepiece_tokenizer_problems_are_named(tmp_path, capsys, monkeypatch):
    model = train_sentencepiece()
    checkpoint, clip, _ = codebase_checkpoint(tmp_path, fmt="safetensors", sentencepiece_model=model)
    base = ["--input", checkpoint, "--vision-tower", clip]
    with monkeypatch.context() as patch:  # an installation without the package that reads tokenizer.model
        patch.setitem(convert.SENTENCEPIECE_PACKAGES, "sentencepiece", lambda: False)
        err = convert_failing(tmp_path, capsys, *base)
    assert "tokenizer.model" in err and "pip install sentencepiece" in err

    # Another tokenizer with more tokens than the embedding has rows: ids without a trained row are refused.
    other = tmp_path / "other-tokenizer"
    other.mkdir()
    write_sentencepiece_tokenizer(other, train_sentencepiece(vocab_size=340))
    err = convert_failing(tmp_path, capsys, *base, "--tokenizer", other)
    rows = sentencepiece_vocab_size(model)
    assert f"model.embed_tokens.weight has {rows} rows" in err and "has 340 tokens" in err


@pytest.mark.parametrize("fmt", ["bin", "safetensors"])
def test_truncated_shard_is_named(tmp_path, capsys, fmt):
    checkpoint, clip, _ = codebase_checkpoint(tmp_path, fmt=fmt)
    shard = sorted(checkpoint.glob(f"*.{fmt}"))[1]
    shard.write_bytes(shard.read_bytes()[: shard.stat().st_size // 2])
    err = convert_failing(tmp_path, capsys, "--input", checkpoint, "--vision-tower", clip)
    assert shard.name in err and "truncated or corrupted" in err


def test_integer_weights_are_refused_and_nothing_is_written(tmp_path, capsys):
    """A quantized (integer) tensor with the right shape would otherwise be stored as integers, and loaded cast to
    float as if it were the weight."""
    checkpoint, clip, _ = codebase_checkpoint(tmp_path, fmt="safetensors")
    shard = sorted(checkpoint.glob("*.safetensors"))[1]
    with safe_open(shard, "pt") as f:
        tensors = {k: f.get_tensor(k) for k in f.keys()}  # noqa: SIM118 (safe_open is not iterable)
    key = next(iter(tensors))
    tensors[key] = tensors[key].to(torch.int8)
    save_file(tensors, shard, {"format": "pt"})
    err = convert_failing(tmp_path, capsys, "--input", checkpoint, "--vision-tower", clip)
    assert f"{key} in {shard}" in err and "torch.int8" in err and "floating-point" in err


class Payload:
    def __reduce__(self):
        return (os.system, ("echo pwned > payload-ran",))


@pytest.mark.parametrize("zip_format", [True, False], ids=["zip", "legacy"])
def test_bin_files_are_never_unpickled_beyond_tensors(tmp_path, capsys, monkeypatch, zip_format):
    checkpoint, clip, _ = codebase_checkpoint(tmp_path)
    shard = min(checkpoint.glob("*.bin"))
    state = torch.load(shard, weights_only=True)
    torch.save({**state, "payload": Payload()}, shard, _use_new_zipfile_serialization=zip_format)
    monkeypatch.chdir(tmp_path)
    err = convert_failing(tmp_path, capsys, "--input", checkpoint, "--vision-tower", clip)
    assert shard.name in err and "never unpickled" in err and re.search("unsupported.* GLOBAL posix.system", err, re.I)
    assert "weights_only" not in err  # (torch's advice to unpickle it all the same is left out)
    assert not (tmp_path / "payload-ran").exists()


@pytest.mark.parametrize(
    "name, size", [("openai/clip-vit-large-patch14-336", 336), ("openai/clip-vit-large-patch14", 224)]
)
def test_a_vision_tower_of_another_resolution_than_the_trained_one_is_refused(tmp_path, capsys, name, size):
    """Same widths, so no shape check would notice; another number of visual tokens per image."""
    checkpoint, clip, _ = codebase_checkpoint(tmp_path, config_overrides={"mm_vision_tower": name})
    err = convert_failing(tmp_path, capsys, "--input", checkpoint, "--vision-tower", clip)
    assert (
        f"trained with mm_vision_tower={name!r}, {size} px images, but the vision tower in {clip} takes 28 px" in err
    )


def test_an_output_folder_that_holds_an_input_is_refused_even_with_overwrite(tmp_path, capsys):
    checkpoint, clip, _ = codebase_checkpoint(tmp_path)
    before = sorted(p.name for p in tmp_path.iterdir())
    assert run("--input", checkpoint, "--vision-tower", clip, "--output", tmp_path, "--overwrite") == 1
    assert (
        f"--output {tmp_path} holds --input {checkpoint}: replacing it would delete that input"
        in capsys.readouterr().err
    )
    assert sorted(p.name for p in tmp_path.iterdir()) == before


def test_an_output_that_holds_the_current_directory_is_refused_and_dot_is_named_by_its_folder(
    tmp_path, capsys, monkeypatch
):
    """`--output .` (or a folder above) would replace the folder the shell is in; `--input .` is named by its folder in
    the model card."""
    source = hyperllava_folder(tmp_path / "hyperllava")
    here = tmp_path / "here"
    here.mkdir()
    monkeypatch.chdir(here)
    for output in (".", ".."):  # (`.` is empty: no --overwrite would be needed)
        assert run("--input", source, "--output", output, "--overwrite") == 1
        err = capsys.readouterr().err
        assert f"--output {output} ({Path(output).resolve()}) is the current directory or holds it" in err
    assert {p.name for p in tmp_path.iterdir()} == {"hyperllava", "here"} and not any(here.iterdir())

    monkeypatch.chdir(source)
    assert run("--input", ".", "--output", "../out") == 0
    card = (tmp_path / "out" / "README.md").read_text()
    assert "by `hyperllava-convert` from `hyperllava`." in card and card.count('from_pretrained("out"') == 4


def test_weights_that_overflow_float16_are_named(tmp_path, capsys):
    checkpoint, clip, _ = codebase_checkpoint(tmp_path, fmt="safetensors")
    shard = sorted(checkpoint.glob("*.safetensors"))[1]
    with safe_open(shard, "pt") as f:
        tensors = {k: f.get_tensor(k) for k in f.keys()}  # noqa: SIM118 (safe_open is not iterable)
    key = next(k for k in tensors if k.endswith("norm.weight"))
    tensors[key][0] = 1e5
    save_file(tensors, shard, {"format": "pt"})
    err = convert_failing(tmp_path, capsys, "--input", checkpoint, "--vision-tower", clip, "--dtype", "fp16")
    assert "values up to 1e+05 do not fit float16" in err and key.split(".")[-2] in err


def test_a_key_in_two_files_of_one_input_is_named(tmp_path, capsys):
    checkpoint, clip, _ = codebase_checkpoint(tmp_path, fmt="safetensors")
    first, second = sorted(checkpoint.glob("*.safetensors"))[:2]
    with safe_open(first, "pt") as f:
        key = next(iter(f.keys()))
        stale = torch.zeros_like(f.get_tensor(key))
    with safe_open(second, "pt") as f:
        tensors = {k: f.get_tensor(k) for k in f.keys()}  # noqa: SIM118 (safe_open is not iterable)
    save_file({**tensors, key: stale}, second, {"format": "pt"})
    err = convert_failing(tmp_path, capsys, "--input", checkpoint, "--vision-tower", clip)
    assert f"{key} is in two files of one input: {first} and {second}" in err


def test_an_llm_config_that_transformers_refuses_is_named(tmp_path, capsys):
    checkpoint, clip, _ = codebase_checkpoint(tmp_path, config_overrides={"num_attention_heads": 5})
    err = convert_failing(tmp_path, capsys, "--input", checkpoint, "--vision-tower", clip)
    assert err.startswith("error: cannot read the LLM's settings in the input config: ") and "Traceback" not in err


def test_a_config_nested_too_deeply_to_read_is_named(tmp_path, capsys):
    """A damaged or hostile config.json: Python's JSON reader recurses per level, and gives up."""
    checkpoint, clip, _ = codebase_checkpoint(tmp_path)
    (checkpoint / "config.json").write_text('{"a": ' + "[" * 100_000 + "]" * 100_000 + "}")
    err = convert_failing(tmp_path, capsys, "--input", checkpoint, "--vision-tower", clip)
    assert err.startswith(
        f"error: cannot read {checkpoint / 'config.json'}: JSON nested too deeply (maximum recursion"
    )


def test_republishing_keeps_the_folders_preprocessing_template_generation_settings_and_card_metadata(tmp_path):
    """A HyperLLaVA folder converted again (re-shard, change the dtype) keeps its image processor's settings, which
    Transformers 5 saves in processor_config.json (here the CLIP folder's normalisation, unpadded: "square"), its
    chat template, its generation settings and its model card's license and base model (unless the command line
    gives others); every level of its config names the new dtype."""
    checkpoint, clip, _ = codebase_checkpoint(tmp_path, config_overrides={"image_aspect_ratio": "square"})
    first, again = tmp_path / "first", tmp_path / "again"
    card = ["--license", "llama2", "--base-model-id", "org/base"]
    assert run("--input", checkpoint, "--vision-tower", clip, "--output", first, *card) == 0
    template = "{% for message in messages %}{{ message['content'] }}{% endfor %}"
    (first / "chat_template.jinja").write_text(template)
    generation = GenerationConfig.from_pretrained(first)
    generation.update(eos_token_id=[2, 7], do_sample=True, temperature=0.2, max_new_tokens=512)
    generation.save_pretrained(first)
    assert run("--input", first, "--output", again, "--dtype", "bf16", "--license", "apache-2.0") == 0
    for folder in (first, again):
        images = json.loads((folder / "processor_config.json").read_text())["image_processor"]
        assert (images["image_mean"], images["image_std"], images["do_pad"]) == (CLIP_MEAN, CLIP_STD, False)
    assert AutoProcessor.from_pretrained(again).chat_template == template
    assert GenerationConfig.from_pretrained(again).to_diff_dict() == generation.to_diff_dict()
    config = json.loads((again / "config.json").read_text())
    assert [config["dtype"], config["text_config"]["dtype"], config["vision_config"]["dtype"]] == ["bfloat16"] * 3
    metadata = yaml.safe_load((again / "README.md").read_text().split("---")[1])
    assert (metadata["license"], metadata["base_model"]) == ("apache-2.0", "org/base")


def test_a_broken_shard_index_and_zero_sizes_are_named(tmp_path, capsys):
    checkpoint, clip, _ = codebase_checkpoint(tmp_path, fmt="safetensors")
    out = tmp_path / "out"
    for option, message in [
        ("--pad-vocab-to-multiple-of", "must be a positive integer, got 0"),
        ("--max-shard-size", "'0': the largest shard must be more than 0 bytes"),
    ]:
        with pytest.raises(SystemExit):  # argparse's own error
            run("--input", checkpoint, "--vision-tower", clip, "--output", out, option, "0")
        assert f"{option}: {message}" in capsys.readouterr().err
    (index,) = checkpoint.glob("*.index.json")
    index.write_text("{}")
    assert run("--input", checkpoint, "--vision-tower", clip, "--output", out) != 0
    assert f"{index} has no weight_map" in capsys.readouterr().err
    for weight_map, value in [({"a": 5}, "5"), ({"a": ["x.safetensors"], "b": None}, '["x.safetensors"]')]:
        index.write_text(json.dumps({"weight_map": weight_map}))
        assert run("--input", checkpoint, "--vision-tower", clip, "--output", out) == 1
        message = f"{index}: weight_map maps tensor names to shard file names; 'a' maps to {value} ("
        assert message in capsys.readouterr().err
    for content, message in [(b"\xff{}", "can't decode byte 0xff"), (b"[]", "a JSON object was expected, got a list")]:
        index.write_bytes(content)
        assert run("--input", checkpoint, "--vision-tower", clip, "--output", out) != 0
        assert f"cannot read {index}: " in (err := capsys.readouterr().err) and message in err
    assert not out.exists()


def test_existing_output_is_kept_unless_overwrite(tmp_path, capsys, monkeypatch):
    checkpoint, clip, _ = codebase_checkpoint(tmp_path)
    out = tmp_path / "out"
    out.mkdir()
    (out / "keep.txt").write_text("precious")
    assert run("--input", checkpoint, "--vision-tower", clip, "--output", out) != 0
    assert "--overwrite" in capsys.readouterr().err and (out / "keep.txt").read_text() == "precious"
    assert run("--input", checkpoint, "--vision-tower", clip, "--output", out, "--overwrite") == 0
    assert not (out / "keep.txt").exists() and (out / "config.json").is_file()
    assert [p.name for p in tmp_path.iterdir() if p.name.startswith(".out")] == []

    # Ctrl-C after the previous output was moved aside, as the new one is moved in: the previous one comes back.
    previous = {p.name: p.read_bytes() for p in out.iterdir()}
    replace = os.replace

    def interrupted_replace(source, target):
        if Path(source).name.startswith(".out.") and Path(source).name.endswith(".partial"):  # (the staging folder)
            raise KeyboardInterrupt
        replace(source, target)

    monkeypatch.setattr(os, "replace", interrupted_replace)
    args = ["--input", checkpoint, "--vision-tower", clip, "--output", out, "--overwrite", "--seed", "1"]
    assert run(*args) == 130
    assert {p.name: p.read_bytes() for p in out.iterdir()} == previous
    assert [p.name for p in tmp_path.iterdir() if p.name.startswith(".out")] == []


def disk_full():
    raise OSError(errno.ENOSPC, os.strerror(errno.ENOSPC))


@pytest.mark.parametrize(
    "stop, code, message",
    [
        (lambda: os.kill(os.getpid(), signal.SIGINT), 130, "interrupted; no partial output was left"),  # Ctrl-C
        (lambda: os.kill(os.getpid(), signal.SIGTERM), 130, "interrupted; no partial output was left"),  # a time limit
        (
            lambda: os.kill(os.getpid(), signal.SIGHUP),
            130,
            "interrupted; no partial output was left",
        ),  # terminal closed
        (disk_full, 1, r"error: writing .*/out failed: \[Errno 28\] No space left on device"),
    ],
    ids=["ctrl-c", "sigterm", "sighup", "disk-full"],
)
def test_a_stop_while_writing_leaves_nothing_and_is_named(tmp_path, monkeypatch, capsys, stop, code, message):
    checkpoint, clip, _ = codebase_checkpoint(tmp_path)
    written = []

    def stopped_save(tensors, path, metadata=None):
        written.append(path)
        save_file(tensors, path, metadata)
        if len(written) == 2:
            stop()

    monkeypatch.setattr(convert, "save_file", stopped_save)
    out = tmp_path / "out"
    with stop_signals_must_be_caught("the converter"):
        assert run("--input", checkpoint, "--vision-tower", clip, "--output", out, "--max-shard-size", "40KB") == code
    assert len(written) == 2 and re.search(message, capsys.readouterr().err)
    assert not out.exists() and [p for p in tmp_path.iterdir() if p.name.startswith(".out")] == []


# --- 5. publishing ---------------------------------------------------------------------------------------------------


def test_the_converter_runs_outside_the_main_thread(tmp_path, capsys):
    """Where it cannot set its SIGTERM handler (only the main thread may) it runs without."""
    result = {}
    argv = ["--input", str(tmp_path / "missing"), "--output", str(tmp_path / "out")]
    thread = threading.Thread(target=lambda: result.update(code=convert.main(argv)))
    thread.start()
    thread.join()
    assert result == {"code": 1} and "missing" in capsys.readouterr().err


@pytest.mark.parametrize(
    "config, layout",
    [
        ({"model_type": "llava", "architectures": ["LlavaLlamaForCausalLM"]}, "llava_codebase"),  # LLaVA-1.5's release
        ({"model_type": "llava_llama"}, "llava_codebase"),
        ({"model_type": "llava", "text_config": {}, "architectures": ["LlavaForConditionalGeneration"]}, "llava_hf"),
        ({"model_type": "llava", "text_config": {}, "architectures": ["LlavaLlamaForCausalLM"]}, "llava_hf"),
    ],
)
def test_the_layout_is_read_from_the_config(config, layout):
    assert convert.input_layout(config) == layout


def test_push_to_hub_uploads_the_folder_in_one_commit(tmp_path, monkeypatch):
    checkpoint, clip, _ = codebase_checkpoint(tmp_path)
    calls = {}

    def create_repo(self, repo_id, **kwargs):
        calls["create_repo"] = (repo_id, kwargs)

    def create_branch(self, repo_id, **kwargs):
        calls["create_branch"] = (repo_id, kwargs)

    def upload_folder(self, repo_id, folder_path, **kwargs):
        # What would be uploaded: the folder as it is at call time (the test's temp dirs outlive the call).
        files = sorted(str(p.relative_to(folder_path)) for p in Path(folder_path).rglob("*") if p.is_file())
        calls["upload_folder"] = (repo_id, Path(folder_path), files, kwargs)
        return "https://huggingface.co/org/hyperllava-7b/commit/1234"

    monkeypatch.setattr(HfApi, "create_repo", create_repo)
    monkeypatch.setattr(HfApi, "create_branch", create_branch)
    monkeypatch.setattr(HfApi, "upload_folder", upload_folder)
    out = tmp_path / "out"
    argv = ["--push-to-hub", "org/hyperllava-7b", "--private", "--revision", "v1", "--commit-message", "HyperLLaVA 7B"]
    assert run("--input", checkpoint, "--vision-tower", clip, "--output", out, *argv) == 0

    assert calls["create_repo"] == ("org/hyperllava-7b", {"private": True, "exist_ok": True})
    assert calls["create_branch"] == ("org/hyperllava-7b", {"branch": "v1", "exist_ok": True})
    repo_id, folder, files, kwargs = calls["upload_folder"]
    assert repo_id == "org/hyperllava-7b" and folder == out
    assert kwargs == {
        "commit_message": "HyperLLaVA 7B",
        "revision": "v1",
        "delete_patterns": convert.HUB_DELETE_PATTERNS,  # (what they delete: the next test)
    }
    expected = [
        "README.md",
        "chat_template.jinja",
        "config.json",
        "configuration_hyperllava.py",
        "fused_expert_hyperllava.py",
        "generation_config.json",
        "model.safetensors",
        "modeling_hyperllava.py",
        "processing_hyperllava.py",
        "processor_config.json",
        "tokenizer.json",
        "tokenizer_config.json",
    ]
    assert files == expected
    metadata = yaml.safe_load((out / "README.md").read_text().split("---")[1])
    assert metadata["library_name"] == "transformers" and metadata["pipeline_tag"] == "image-text-to-text"
    card = (out / "README.md").read_text()
    for needle in ("trust_remote_code=True", "import transformers_hyperllava", "arXiv:2403.13447", "Training recipe"):
        assert needle in card
    # The usage snippets (model and processor, with and without the package) load the branch pushed to.
    assert card.count('from_pretrained("org/hyperllava-7b", revision="v1"') == 4
    k = json.loads((out / "config.json").read_text())["language_guidance_layer"]  # (the input of layer k: after k-1)
    assert f"guidance from the hidden state entering layer {k} |" in card


def test_republishing_deletes_what_the_previous_push_left(tmp_path, monkeypatch):
    """A repo pushed with one model.safetensors, then sharded: the old file would stay beside the new shards (and be
    what Transformers loads). The push deletes the files of the repo that a conversion writes and that it does not
    upload; the repo's other files stay."""
    source = hyperllava_folder(tmp_path / "hyperllava")
    # The repo's files: some of its own, and those of an older upload (a processor file of Transformers 4, weights in
    # torch's format, a SentencePiece tokenizer).
    repo = {".gitattributes", "LICENSE", "preprocessor_config.json", "pytorch_model.bin", "tokenizer.model"}

    def upload_folder(self, repo_id, folder_path, delete_patterns=None, **kwargs):
        # One commit, as huggingface_hub makes it: the repo's files that match delete_patterns are deleted, but for
        # .gitattributes and those that the upload holds, which are replaced.
        uploaded = {p.name for p in Path(folder_path).iterdir()}
        if delete_patterns is not None:
            repo.difference_update(set(filter_repo_objects(repo, allow_patterns=delete_patterns)) - {".gitattributes"})
        repo.update(uploaded)
        return f"https://huggingface.co/{repo_id}/commit/1234"

    monkeypatch.setattr(HfApi, "create_repo", lambda self, repo_id, **kwargs: None)
    monkeypatch.setattr(HfApi, "upload_folder", upload_folder)
    assert run("--input", source, "--output", tmp_path / "single", "--push-to-hub", "org/x") == 0
    sharded = tmp_path / "sharded"
    assert run("--input", source, "--output", sharded, "--push-to-hub", "org/x", "--max-shard-size", "100KB") == 0
    assert (sharded / "model.safetensors.index.json").is_file() and not (sharded / "model.safetensors").exists()
    assert repo == {p.name for p in sharded.iterdir()} | {".gitattributes", "LICENSE"}
    assert "revision=" not in (sharded / "README.md").read_text()  # (pushed to main)


def test_a_malformed_hub_id_is_refused_before_converting(tmp_path, capsys):
    checkpoint, clip, _ = codebase_checkpoint(tmp_path)
    err = convert_failing(tmp_path, capsys, "--input", checkpoint, "--vision-tower", clip, "--push-to-hub", "bad id!")
    assert "--push-to-hub 'bad id!' is not a Hub repo id" in err


@pytest.mark.parametrize(
    "stop, code, message",
    [
        (ConnectionError("no route to the Hub"), 1, "error: the upload to org/x failed (no route to the Hub)"),
        (KeyboardInterrupt(), 130, "interrupted during the upload to org/x"),  # Ctrl-C
    ],
    ids=["network", "ctrl-c"],
)
def test_a_stopped_upload_keeps_the_converted_folder_and_says_how_to_retry(
    tmp_path, monkeypatch, capsys, stop, code, message
):
    checkpoint, clip, _ = codebase_checkpoint(tmp_path)

    def upload_folder(self, repo_id, folder_path, **kwargs):
        raise stop

    monkeypatch.setattr(HfApi, "create_repo", lambda self, repo_id, **kwargs: None)
    monkeypatch.setattr(HfApi, "upload_folder", upload_folder)
    out = tmp_path / "converted model's folder"  # a path that a shell needs quoted
    assert run("--input", checkpoint, "--vision-tower", clip, "--output", out, "--push-to-hub", "org/x") == code
    err = capsys.readouterr().err
    assert message in err and f"the converted folder is kept at {out}" in err
    command = shlex.split(err.split("retry with `", 1)[1].split("`", 1)[0])
    assert command[:4] == ["hf", "upload", "org/x", str(out)]
    # (The retry deletes what the converter's upload would have deleted.)
    assert [value for flag, value in zip(command, command[1:]) if flag == "--delete"] == convert.HUB_DELETE_PATTERNS
    assert (out / "config.json").is_file()
