"""Saving and loading: round trips, sharding, remote code without the package, a Hub cache on disk, device maps."""

import importlib.util
import json
import os
import shutil
import subprocess
import sys
import textwrap

import pytest
import torch
from huggingface_hub.errors import StrictDataclassFieldValidationError
from transformers import (
    AutoConfig,
    AutoModel,
    AutoModelForImageTextToText,
    AutoModelForMultimodalLM,
    AutoModelForPreTraining,
)

from conftest import images, make_model, prompt_ids
from transformers_hyperllava import HyperLlavaForConditionalGeneration, HyperLlavaModel
from transformers_hyperllava.tiny import tiny_config

# Loaded weights are compared bit for bit, the logits they give to float rounding: safetensors (0.8) maps tensors at
# addresses that are not always 64-byte aligned, and the CPU's matmul then takes other kernels (~1e-6 apart here).
LOGITS_ATOL = 1e-5

REMOTE_CODE_FILES = {"configuration_hyperllava.py", "modeling_hyperllava.py", "fused_expert_hyperllava.py"}


def inputs():
    return {"input_ids": torch.tensor([prompt_ids("img", 10, 11, 12)]), "pixel_values": images(1)}


@pytest.fixture(scope="module")
def saved(tmp_path_factory):
    """A tiny HyperLLaVA with non-zero experts, saved in shards, and its logits."""
    path = tmp_path_factory.mktemp("hyperllava")
    model = make_model(visual_expert="both")
    model.save_pretrained(path, max_shard_size="40KB")
    with torch.no_grad():
        torch.save(model(**inputs()).logits, path.parent / "expected_logits.pt")
    return path, model


def test_save_writes_safetensors_shards_auto_map_and_remote_code(saved):
    path, model = saved
    files = set(os.listdir(path))
    assert REMOTE_CODE_FILES <= files
    index = json.loads((path / "model.safetensors.index.json").read_text())
    assert set(index["weight_map"]) == set(model.state_dict())
    assert len(set(index["weight_map"].values())) > 1 and not any(f.endswith(".bin") for f in files)
    config = json.loads((path / "config.json").read_text())
    assert config["model_type"] == "hyperllava"
    assert config["auto_map"] == {
        "AutoConfig": "configuration_hyperllava.HyperLlavaConfig",
        "AutoModel": "modeling_hyperllava.HyperLlavaModel",
        "AutoModelForImageTextToText": "modeling_hyperllava.HyperLlavaForConditionalGeneration",
        "AutoModelForMultimodalLM": "modeling_hyperllava.HyperLlavaForConditionalGeneration",
        "AutoModelForPreTraining": "modeling_hyperllava.HyperLlavaForConditionalGeneration",
    }


def test_round_trip_with_auto_classes(saved):
    path, model = saved
    expected = torch.load(path.parent / "expected_logits.pt", weights_only=True)
    loaded = AutoModelForImageTextToText.from_pretrained(path)
    assert type(loaded) is HyperLlavaForConditionalGeneration
    # The other Auto classes that give LLaVA's full model give ours.
    for auto_class in (AutoModelForMultimodalLM, AutoModelForPreTraining):
        assert type(auto_class.from_pretrained(path)) is HyperLlavaForConditionalGeneration
    for field in (
        "visual_expert",
        "language_expert_layers",
        "language_guidance_layer",
        "expert_mode",
        "expert_bottleneck_dim",
    ):
        assert getattr(loaded.config, field) == getattr(model.config, field)
    for name, tensor in model.state_dict().items():
        assert torch.equal(loaded.state_dict()[name], tensor), name
    torch.testing.assert_close(loaded(**inputs()).logits, expected, atol=LOGITS_ATOL, rtol=0)
    base = AutoModel.from_pretrained(path)
    assert type(base) is HyperLlavaModel
    torch.testing.assert_close(loaded.lm_head(base(**inputs()).last_hidden_state), expected, atol=LOGITS_ATOL, rtol=0)
    assert type(AutoConfig.from_pretrained(path)).__name__ == "HyperLlavaConfig"


def test_loaded_expert_weights_are_never_initialised_again(tmp_path):
    """Loading a "static" checkpoint as "dynamic" initialises the new encoder, and keeps the loaded layer biases: part
    of them would otherwise be re-drawn (W_d) and part zeroed (W_u)."""
    static = make_model(expert_mode="static")
    static.save_pretrained(tmp_path)
    dynamic = HyperLlavaForConditionalGeneration.from_pretrained(tmp_path, expert_mode="dynamic")
    assert dynamic.config.expert_mode == "dynamic"
    for name, param in static.named_parameters():
        if name.endswith("layer_bias"):
            torch.testing.assert_close(dynamic.get_parameter(name), param, atol=0, rtol=0)


@pytest.mark.parametrize("mode", ["dynamic", "latent"])
def test_a_new_hypernetwork_width_starts_the_experts_as_the_identity(tiny_llava, tmp_path, mode):
    """Reloaded with another hypernetwork_hidden_dim, only the experts' hyper_in and hyper_out are new: Transformers
    re-initialises those linear layers without their expert (whose own parameters all loaded), and W_u's rows of
    hyper_out must still start at zero, so that the untrained experts leave LLaVA's logits as they are."""
    llava, _ = tiny_llava
    HyperLlavaForConditionalGeneration.from_llava(llava, expert_mode=mode, visual_expert="both").save_pretrained(
        tmp_path
    )
    wider = HyperLlavaForConditionalGeneration.from_pretrained(
        tmp_path, hypernetwork_hidden_dim=16, ignore_mismatched_sizes=True
    )
    assert wider.model.language_model.language_expert.hyper_out.in_features == 16
    batch = inputs()
    torch.testing.assert_close(wider(**batch).logits, llava(**batch).logits, atol=1e-12, rtol=0)


def test_a_language_expert_added_at_load_time_gets_the_default_guidance_layer(tmp_path):
    """A checkpoint saved without a language expert has no guidance layer; loaded with expert layers, the model must
    pool its guidance where a config built with them would, not silently skip the expert."""
    saved = make_model(language_expert_layers=None)
    saved.save_pretrained(tmp_path)
    loaded = HyperLlavaForConditionalGeneration.from_pretrained(tmp_path, language_expert_layers="posterior")
    fresh = tiny_config(language_expert_layers="posterior")
    assert loaded.config.language_guidance_layer == fresh.language_guidance_layer is not None
    out = loaded(**inputs())
    assert out.language_expert_weights.shape[:2] == (1, len(fresh.language_expert_layer_indices))
    # The new expert starts as the identity: the logits are the saved model's.
    torch.testing.assert_close(out.logits, saved(**inputs()).logits, atol=LOGITS_ATOL, rtol=0)


def run_without_package(script, cwd):
    """Runs `script` in a fresh interpreter where `import transformers_hyperllava` fails, and `import triton` too: the
    remote code must load where Triton is not installed (a CPU build of torch, macOS, Windows)."""
    blocker = "import sys; sys.modules['transformers_hyperllava'] = sys.modules['triton'] = None\n"
    env = {**os.environ, "HF_HUB_OFFLINE": "1", "HF_MODULES_CACHE": str(cwd / "modules")}
    result = subprocess.run(
        [sys.executable, "-c", blocker + textwrap.dedent(script)], cwd=cwd, env=env, capture_output=True, text=True
    )
    assert result.returncode == 0, result.stderr[-3000:]
    return result.stdout


@pytest.mark.parametrize(
    "override, message",
    [
        ({"expert_mode": "bogus"}, r"'expert_mode' expected one of \('dynamic', 'latent', 'static'\), got bogus"),
        ({"visual_expert": "bogus"}, r"'visual_expert' expected one of \('first', 'second', 'both'\), got bogus"),
        # The saved checkpoint pools its guidance before layer 2: layers 0 and 1 would never get their weights.
        ({"language_expert_layers": [0, 1]}, r"language_expert_layers \[0, 1\] come before language_guidance_layer=2"),
    ],
)
def test_expert_fields_set_at_load_time_are_checked(saved, override, message):
    """`from_pretrained` sets these on the loaded config after its own checks ran: each field is checked as it is set
    (a strict dataclass, as LlavaConfig), and the model checks how they go together again."""
    path, _ = saved
    with pytest.raises((ValueError, StrictDataclassFieldValidationError), match=message):
        AutoModelForImageTextToText.from_pretrained(path, **override)
    loaded = AutoModelForImageTextToText.from_pretrained(
        path, language_expert_layers=[0, 1], language_guidance_layer=0
    )
    assert loaded.config.language_expert_layer_indices == [0, 1]


def test_remote_code_loads_in_a_fresh_process_without_the_package(saved, tmp_path):
    path, _ = saved
    script = f"""
        import torch
        from transformers import AutoModel, AutoModelForImageTextToText
        try:
            import transformers_hyperllava
            raise SystemExit("the package should not be importable here")
        except ImportError:
            pass
        model = AutoModelForImageTextToText.from_pretrained({str(path)!r}, trust_remote_code=True)
        assert type(model).__module__.startswith("transformers_modules"), type(model).__module__
        ids = torch.tensor([{prompt_ids("img", 10, 11, 12)}])
        pixel_values = torch.randn(1, 3, 28, 28, generator=torch.Generator().manual_seed(0))
        expected = torch.load({str(path.parent / "expected_logits.pt")!r}, weights_only=True)
        torch.testing.assert_close(model(input_ids=ids, pixel_values=pixel_values).logits, expected, atol={LOGITS_ATOL}, rtol=0)
        base = AutoModel.from_pretrained({str(path)!r}, trust_remote_code=True)
        assert type(base).__name__ == "HyperLlavaModel"
        # The other Auto classes that the package registers (AutoModelForMultimodalLM: the "any-to-any" pipeline's).
        from transformers import AutoModelForMultimodalLM, AutoModelForPreTraining
        for auto_class in (AutoModelForMultimodalLM, AutoModelForPreTraining):
            loaded = auto_class.from_pretrained({str(path)!r}, trust_remote_code=True)
            assert type(loaded).__name__ == "HyperLlavaForConditionalGeneration", auto_class
        # A base model's folder loads as the full model, as LLaVA's does (its lm_head reported missing).
        base.save_pretrained("base")
        loaded = AutoModelForImageTextToText.from_pretrained("base", trust_remote_code=True)
        assert type(loaded).__name__ == "HyperLlavaForConditionalGeneration"
        print(model.generate(input_ids=ids, pixel_values=pixel_values, max_new_tokens=3, do_sample=False).shape[1])
        """
    assert run_without_package(script, tmp_path).split()[-1] == str(len(prompt_ids("img", 10, 11, 12)) + 3)


def hub_cache(tmp_path, source, repo_id="org/hyperllava-7b", revision="0123456789abcdef0123456789abcdef01234567"):
    """The layout huggingface_hub writes: models--org--name/{refs/main, snapshots/<sha>/...}."""
    repo = tmp_path / "hub" / f"models--{repo_id.replace('/', '--')}"
    shutil.copytree(source, repo / "snapshots" / revision)
    (repo / "refs").mkdir()
    (repo / "refs" / "main").write_text(revision)
    return tmp_path / "hub"


def test_loads_by_repo_id_from_a_hub_cache_offline(saved, tmp_path):
    path, _ = saved
    cache = hub_cache(tmp_path, path)
    expected = torch.load(path.parent / "expected_logits.pt", weights_only=True)
    assert os.environ["HF_HUB_OFFLINE"] == "1"
    model = AutoModelForImageTextToText.from_pretrained("org/hyperllava-7b", cache_dir=cache)
    torch.testing.assert_close(model(**inputs()).logits, expected, atol=LOGITS_ATOL, rtol=0)
    script = """
        from transformers import AutoModelForImageTextToText
        model = AutoModelForImageTextToText.from_pretrained("org/hyperllava-7b", trust_remote_code=True)
        print(type(model).__name__)
        """
    env_cache = {"HF_HUB_CACHE": str(cache)}
    os.environ.update(env_cache)
    try:
        assert run_without_package(script, tmp_path).split()[-1] == "HyperLlavaForConditionalGeneration"
    finally:
        del os.environ["HF_HUB_CACHE"]


def test_device_map_auto_with_offload_keeps_layers_whole_and_outputs_equal(saved, tmp_path):
    path, model = saved
    expected = torch.load(path.parent / "expected_logits.pt", weights_only=True)
    # A CPU budget too small for the model: accelerate offloads whole modules to disk and streams them back.
    offloaded = AutoModelForImageTextToText.from_pretrained(
        path, device_map="auto", max_memory={"cpu": "250KB"}, offload_folder=str(tmp_path / "offload")
    )
    placement = offloaded.hf_device_map
    assert "disk" in placement.values() and "cpu" in placement.values()
    for name in placement:  # no decoder layer is split across devices
        assert not name.startswith("model.language_model.layers.") or name.count(".") == 3, name
    torch.testing.assert_close(offloaded(**inputs()).logits, expected, atol=LOGITS_ATOL, rtol=0)


@pytest.mark.parametrize("num_gpus", [2, 3, 4])
def test_device_maps_over_several_gpus_keep_experts_and_projector_whole(saved, num_gpus):
    """Budgets for several GPUs (planned only: accelerate does not allocate) that split the model at various places:
    an expert, and the projector that applies the visual one, stay on one device each."""
    from accelerate import infer_auto_device_map

    from transformers_hyperllava.modeling_hyperllava import (
        HyperExpert,
        HyperLlamaDecoderLayer,
        HyperLlavaMultiModalProjector,
    )

    _, model = saved
    size = sum(p.numel() * p.element_size() for p in model.parameters())
    # Each GPU holds a 1/num_gpus share: the plan spreads the model over num_gpus or num_gpus + 1 of them.
    budgets = {gpu: size // num_gpus + 1 for gpu in range(num_gpus + 2)} | {"cpu": 2 * size}
    placement = infer_auto_device_map(model, max_memory=budgets, no_split_module_classes=model._no_split_modules)
    assert len(set(placement.values())) > 1
    kept_whole = (HyperExpert, HyperLlavaMultiModalProjector, HyperLlamaDecoderLayer)
    whole = [name for name, module in model.named_modules() if isinstance(module, kept_whole)]
    for name in whole:
        devices = {device for key, device in placement.items() if key.startswith(name + ".")}
        assert not devices, f"{name} is split over {devices | {placement.get(name)}}"


def test_the_guidance_is_pooled_on_the_device_of_the_hidden_states():
    """Under a device_map the prompt mask stays where the inputs are while layer k-1 runs elsewhere."""
    from transformers_hyperllava.modeling_hyperllava import mean_pool

    hidden, mask = torch.randn(2, 5, 8, device="meta"), torch.ones(2, 5, dtype=torch.bool)
    assert mean_pool(hidden, mask).device == hidden.device


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a second device: the GPU beside the CPU")
def test_a_model_split_over_gpu_and_cpu_gives_the_same_logits_and_tokens(saved):
    path, model = saved
    layers = model.config.text_config.num_hidden_layers
    # Layers alternate between CPU and GPU: the guidance's layer (k-1 = 1) runs on the GPU while the prompt mask comes
    # with the inputs from the CPU, and the language expert's weights go to expert layers on both devices.
    device_map = {
        "model.vision_tower": "cpu",
        "model.multi_modal_projector": 0,
        "model.language_model.embed_tokens": 0,
    }
    device_map |= {f"model.language_model.layers.{i}": 0 if i % 2 else "cpu" for i in range(layers)}
    device_map |= {name: "cpu" for name in ("model.language_model.norm", "model.language_model.rotary_emb", "lm_head")}
    device_map["model.language_model.language_expert"] = 0
    split = AutoModelForImageTextToText.from_pretrained(path, device_map=device_map).eval()
    expected = torch.load(path.parent / "expected_logits.pt", weights_only=True)
    with torch.no_grad():
        torch.testing.assert_close(split(**inputs()).logits.cpu(), expected, atol=1e-5, rtol=1e-5)
    generate = {"max_new_tokens": 4, "do_sample": False}
    assert torch.equal(split.generate(**inputs(), **generate).cpu(), model.generate(**inputs(), **generate))


# docs/inference.md, Quantization: the list that keeps the experts out of quantization.
EXPERTS_UNQUANTIZED = ["lm_head", "model.multi_modal_projector", "model.language_model.language_expert"]
needs_bitsandbytes = pytest.mark.skipif(
    # (A test extra on Linux, so CI runs these; elsewhere bitsandbytes may not install.)
    importlib.util.find_spec("bitsandbytes") is None,
    reason="needs bitsandbytes, whose 8-bit layers run on the CPU",
)


@needs_bitsandbytes
def test_quantized_loading_keeps_the_experts_in_full_precision_where_the_docs_name_them(saved):
    from bitsandbytes.nn import Linear8bitLt
    from transformers import BitsAndBytesConfig

    path, model = saved

    def load(skip=None):
        config = BitsAndBytesConfig(load_in_8bit=True, llm_int8_skip_modules=skip)
        return AutoModelForImageTextToText.from_pretrained(path, quantization_config=config, dtype=torch.float32)

    def quantized(loaded):
        return {name for name, module in loaded.named_modules() if isinstance(module, Linear8bitLt)}

    hypernetworks = {name for name, _ in model.named_modules() if name.endswith(("hyper_in", "hyper_out"))}
    assert len(hypernetworks) == 6  # visual_expert="both": three experts
    # By default, like LLaVA's every linear layer but lm_head, the hypernetworks are quantized.
    assert hypernetworks <= quantized(load())
    kept = load(EXPERTS_UNQUANTIZED)
    assert not quantized(kept) & hypernetworks
    assert any(".layers." in name and "mlp" in name for name in quantized(kept))  # the LLM itself is quantized
    # ... and the experts generate exactly the unquantized model's weights from the same guidance.
    with torch.no_grad():
        for name in {name.rpartition(".")[0] for name in hypernetworks}:
            expert, reference = kept.get_submodule(name), model.get_submodule(name)
            guidance = torch.randn(2, reference.encoder_weight.shape[-1])
            assert torch.equal(expert(guidance), reference(guidance))


@needs_bitsandbytes
def test_from_llava_refuses_a_quantized_llava_by_name(tiny_llava, tmp_path):
    from transformers import BitsAndBytesConfig, LlavaForConditionalGeneration

    llava, _ = tiny_llava
    llava.float().save_pretrained(tmp_path)
    quantized = LlavaForConditionalGeneration.from_pretrained(
        tmp_path, quantization_config=BitsAndBytesConfig(load_in_8bit=True)
    )
    with pytest.raises(ValueError, match="needs an unquantized LLaVA model, but this one is quantized"):
        HyperLlavaForConditionalGeneration.from_llava(quantized)


def test_from_llava_refuses_a_hyperllava_checkpoint_instead_of_dropping_its_experts(saved):
    """LLaVA's class loads a HyperLLaVA folder with a warning only (the experts reported unexpected), and from_llava
    would then build new experts in place of the trained ones: the same holds for a HyperLLaVA model passed in."""
    path, model = saved
    for source in (path, model):
        with pytest.raises(ValueError, match=r"a 'hyperllava' model: load it with .*from_pretrained"):
            HyperLlavaForConditionalGeneration.from_llava(source)


def test_from_llava_still_upgrades_what_llavas_class_loads_without_a_model_type(tiny_llava, saved, tmp_path):
    """The model_type check refuses HyperLLaVA, not what LLaVA's class loads: a config.json that names no model_type,
    or a folder of weights whose config comes as `config=` in load_kwargs. A HyperLLaVA folder stays refused with a
    LLaVA `config=`, which would load its weights with the experts dropped."""
    llava, _ = tiny_llava
    llava.save_pretrained(tmp_path / "no_model_type")
    config_file = tmp_path / "no_model_type" / "config.json"
    fields = json.loads(config_file.read_text())
    del fields["model_type"]
    config_file.write_text(json.dumps(fields))
    llava.save_pretrained(tmp_path / "weights_only")
    os.remove(tmp_path / "weights_only" / "config.json")
    for path, load_kwargs in (
        (tmp_path / "no_model_type", None),
        (tmp_path / "weights_only", {"config": llava.config}),
        (tmp_path / "weights_only", {"config": str(tmp_path / "no_model_type")}),
    ):
        model = HyperLlavaForConditionalGeneration.from_llava(path, load_kwargs=load_kwargs)
        for name, tensor in llava.state_dict().items():
            assert torch.equal(model.state_dict()[name], tensor), (path, name)
    hyperllava_path, _ = saved
    with pytest.raises(ValueError, match=r"a 'hyperllava' model: load it with .*from_pretrained"):
        HyperLlavaForConditionalGeneration.from_llava(hyperllava_path, load_kwargs={"config": llava.config})
