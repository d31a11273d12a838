"""Training: stage presets, LoRA, two-process DDP against one process, resume, stage chaining, bad input."""

import copy
import json
import os
import re
import shutil
import signal
import socket
import subprocess
import sys
from concurrent.futures import Future
from fnmatch import fnmatch
from pathlib import Path
from types import SimpleNamespace

import numpy as np
import pytest
import torch
import yaml
from safetensors.torch import load_file, save_file
from transformers import (
    AutoModelForImageTextToText,
    AutoProcessor,
    HfArgumentParser,
    LlavaForConditionalGeneration,
)

from conftest import images, prompt_ids, randomize_experts, stop_signals_must_be_caught
from transformers_hyperllava import HyperLlavaForConditionalGeneration, training
from transformers_hyperllava.data import LlavaDataCollator, LlavaJsonDataset
from transformers_hyperllava.demo_data import make_demo_dataset
from transformers_hyperllava.tiny import tiny_config
from transformers_hyperllava.tiny_tokenizer import tiny_processor, train_tokenizer
from transformers_hyperllava.training import (
    PROJECTOR_FILE,
    HyperLlavaTrainingArguments,
    ModelArguments,
    add_lora,
    apply_stage,
    build_trainer,
    check_processor_fits,
    load_model,
    load_trained_weights,
    main,
    parse_arguments,
    trainable_counts,
)


@pytest.fixture(scope="module")
def setup(tmp_path_factory):
    """Demo images (28 px), single-turn question samples, a tokenizer trained on them, and a tiny HyperLLaVA
    checkpoint (float64, both visual experts, random expert weights) with its processor."""
    root = tmp_path_factory.mktemp("training")
    data = make_demo_dataset(root / "data", num_train_images=16, num_heldout_images=0, image_size=28)
    samples = [s for s in json.loads(data.instruct.read_text()) if len(s["conversations"]) == 2][:16]
    (root / "qa.json").write_text(json.dumps(samples))
    tokenizer = train_tokenizer(data.training_texts())
    config = tiny_config(vocab_size=len(tokenizer), visual_expert="both")
    processor = tiny_processor(tokenizer, config)
    torch.manual_seed(0)
    # Trained-looking experts: from their identity start (W_u = 0) the first step reaches only W_u's parts.
    model = randomize_experts(HyperLlavaForConditionalGeneration(config).double(), std=0.05)
    model.save_pretrained(root / "base")
    processor.save_pretrained(root / "base")
    return {
        "root": root,
        "data": data,
        "qa": root / "qa.json",
        "config": config,
        "processor": processor,
        "base": root / "base",
    }


def expected_trainable(name, stage):
    """The stage presets of docs/training.md, written from the weight names."""
    projector = name.startswith("model.multi_modal_projector.")
    language_expert = name.startswith("model.language_model.language_expert.")
    llm = name.startswith(("model.language_model.", "lm_head."))
    return {"align": projector, "instruct": projector or llm, "experts": projector or language_expert}[stage]


def train_args(output_dir, stage, **overrides):
    settings = {
        "output_dir": str(output_dir),
        "stage": stage,
        "max_steps": 1,
        "per_device_train_batch_size": 4,
        "learning_rate": 1e-2,
        "warmup_steps": 0,
        "save_strategy": "no",
        "report_to": "none",
        "use_cpu": True,
        "disable_tqdm": True,
    }
    return HyperLlavaTrainingArguments(**{**settings, **overrides})


def test_stage_defaults_are_the_papers(tmp_path):
    align, instruct, experts = (
        HyperLlavaTrainingArguments(output_dir=str(tmp_path), stage=stage, use_cpu=True)
        for stage in ("align", "instruct", "experts")
    )
    # The paper's (§4.1): 1e-3 for stage 1, 2e-5 for stage 2. The `experts` stage is not in the paper: its 2e-4 is
    # LLaVA's LoRA learning rate, the default docs/training.md's table gives it.
    assert (align.learning_rate, instruct.learning_rate, experts.learning_rate) == (1e-3, 2e-5, 2e-4)
    for args in (align, instruct, experts):
        assert (args.adam_beta1, args.adam_beta2, args.adam_epsilon, args.weight_decay) == (0.9, 0.999, 1e-8, 0.0)
        assert args.lr_scheduler_type == "cosine" and args.warmup_steps == 0.03
    with pytest.raises(ValueError, match="stage='pretrain'"):
        HyperLlavaTrainingArguments(output_dir=str(tmp_path), stage="pretrain", use_cpu=True)


@pytest.mark.parametrize("strategy", ["group_by_length", "batch_rebalance"])
def test_samplers_that_would_measure_samples_by_their_images_are_refused(tmp_path, strategy):
    # (The Trainer measures a sample by the processor's first input: `pixel_values` for LLaVA's processor and ours.)
    with pytest.raises(ValueError, match=f"--train_sampling_strategy {strategy} is not supported"):
        HyperLlavaTrainingArguments(output_dir=str(tmp_path), train_sampling_strategy=strategy, use_cpu=True)


@pytest.mark.parametrize("stage", ["align", "instruct", "experts"])
def test_stage_trains_exactly_its_parameters(setup, tmp_path, stage):
    model = HyperLlavaForConditionalGeneration.from_pretrained(setup["base"])
    dataset = LlavaJsonDataset(setup["qa"], setup["processor"], setup["data"].image_folder)
    trainer = build_trainer(model, setup["processor"], dataset, train_args(tmp_path, stage))
    names = [name for name, _ in model.named_parameters()]
    assert any(name.startswith("model.multi_modal_projector.visual_expert_second.") for name in names)
    expected = {name for name in names if expected_trainable(name, stage)}
    assert {name for name, p in model.named_parameters() if p.requires_grad} == expected

    before = {name: p.detach().clone() for name, p in model.named_parameters()}
    trainer.train()
    changed = {name for name, p in model.named_parameters() if not torch.equal(p, before[name])}
    assert changed == expected


def test_the_guidance_stays_on_the_prompt_when_the_trainer_keeps_the_labels(setup):
    """With label smoothing or a `compute_loss_func` the Trainer calls the model without labels; the collator's
    `language_guidance_mask` gives the guidance the prompt that the labels would have given."""
    model = HyperLlavaForConditionalGeneration.from_pretrained(setup["base"]).eval()
    dataset = LlavaJsonDataset(setup["qa"], setup["processor"], setup["data"].image_folder)
    batch = LlavaDataCollator(setup["processor"].tokenizer.pad_token_id)([dataset[i] for i in range(3)])
    from_labels = model(**{key: value for key, value in batch.items() if key != "language_guidance_mask"}).logits
    without_labels = {key: value for key, value in batch.items() if key != "labels"}
    assert torch.equal(model(**without_labels).logits, from_labels)
    del without_labels["language_guidance_mask"]
    assert not torch.allclose(model(**without_labels).logits, from_labels)  # the answers in the guidance


def test_label_smoothing_scores_each_token_against_the_next(setup, tmp_path):
    """The Trainer's loss with --label_smoothing_factor, against the formula written out: (1 - eps) times the
    cross-entropy of the next token plus eps times the mean of -log p over the vocabulary, over supervised tokens."""
    eps = 0.1
    model = HyperLlavaForConditionalGeneration.from_pretrained(setup["base"]).eval()
    dataset = LlavaJsonDataset(setup["qa"], setup["processor"], setup["data"].image_folder)
    trainer = build_trainer(
        model, setup["processor"], dataset, train_args(tmp_path, "instruct", label_smoothing_factor=eps)
    )
    batch = LlavaDataCollator(setup["processor"].tokenizer.pad_token_id)([dataset[i] for i in range(3)])
    with torch.no_grad():
        loss = trainer.compute_loss(model, dict(batch))
        logits = model(**batch).logits
    log_p = torch.log_softmax(logits[:, :-1], dim=-1)
    targets = batch["labels"][:, 1:]
    supervised = targets != -100
    nll = -log_p[supervised].gather(-1, targets[supervised][:, None]).mean()
    uniform = -log_p[supervised].mean()
    torch.testing.assert_close(loss, (1 - eps) * nll + eps * uniform)


def test_predict_gives_the_logits_alone(setup, tmp_path):
    """As for LLaVA: the generated weights, the cache and the images stay out of the predictions."""
    model = HyperLlavaForConditionalGeneration.from_pretrained(setup["base"])
    dataset = LlavaJsonDataset(setup["qa"], setup["processor"], setup["data"].image_folder)
    trainer = build_trainer(model, setup["processor"], dataset, train_args(tmp_path, "experts"))
    subset = torch.utils.data.Subset(dataset, range(4))
    predictions = trainer.predict(subset)
    batch = LlavaDataCollator(setup["processor"].tokenizer.pad_token_id)([dataset[i] for i in range(4)])
    with torch.no_grad():
        logits = model.eval()(**batch).logits
    assert isinstance(predictions.predictions, np.ndarray)
    np.testing.assert_allclose(predictions.predictions, logits.numpy(), rtol=0, atol=1e-10)


def test_an_interrupted_save_keeps_the_previous_model(setup, tmp_path, monkeypatch):
    from transformers_hyperllava.training import save_stage

    model = HyperLlavaForConditionalGeneration.from_pretrained(setup["base"])
    dataset = LlavaJsonDataset(setup["qa"], setup["processor"], setup["data"].image_folder)
    trainer = build_trainer(model, setup["processor"], dataset, train_args(tmp_path, "experts"))
    out = tmp_path / "final"
    # With --push_to_hub, `main` uploads the folder once it is complete: saving must not make the Trainer upload it.
    trainer.args.push_to_hub = True
    monkeypatch.setattr(trainer, "push_to_hub", lambda *args, **kwargs: pytest.fail("uploaded while saving"))
    save_stage(trainer, setup["processor"], out)
    saved = {path.name: path.read_bytes() for path in out.iterdir()}
    with torch.no_grad():
        model.lm_head.weight.add_(1.0)

    def interrupted(*args, **kwargs):  # Ctrl-C once the model's files are written, before the processor's
        raise KeyboardInterrupt

    with monkeypatch.context() as patch:
        patch.setattr(setup["processor"], "save_pretrained", interrupted)
        with pytest.raises(KeyboardInterrupt):
            save_stage(trainer, setup["processor"], out)
    assert {path.name: path.read_bytes() for path in out.iterdir()} == saved

    # A shard an earlier, larger save left is removed: the new index would not name it, a stale one would be read. So is
    # another processor's chat template in the format Transformers reads before the one saved now.
    (out / "model-00002-of-00002.safetensors").write_bytes(b"stale")
    (out / "chat_template.json").write_text(json.dumps({"chat_template": "{{ 'stale' }}"}))
    save_stage(trainer, setup["processor"], out)
    assert sorted(path.name for path in out.iterdir()) == sorted(saved)
    reloaded = AutoModelForImageTextToText.from_pretrained(out, dtype=torch.float64)
    assert torch.equal(reloaded.lm_head.weight, model.lm_head.weight)


@pytest.mark.parametrize("stop", [signal.SIGTERM, signal.SIGHUP], ids=["sigterm", "sighup"])
def test_a_time_limit_or_a_closed_terminal_while_saving_keeps_the_previous_model(setup, tmp_path, monkeypatch, stop):
    """SIGTERM (a job's time limit) and SIGHUP leave what Ctrl-C leaves: the staging folder is taken away."""
    out = tmp_path / "out"
    out.mkdir()
    (out / "config.json").write_text("{}")  # an earlier run's model

    def stopped_save(self, output_dir, _internal_call=False):
        Path(output_dir).mkdir()
        (Path(output_dir) / "model.safetensors").write_bytes(b"half")
        os.kill(os.getpid(), stop)

    monkeypatch.setattr(training.Trainer, "save_model", stopped_save)
    with stop_signals_must_be_caught("hyperllava-train"), pytest.raises(KeyboardInterrupt):
        main(cli_args(setup, out, max_steps=1))
    assert {path.name: path.read_text() for path in out.iterdir()} == {"config.json": "{}"}


def test_a_save_stopped_between_two_moves_leaves_the_previous_save_whole(tmp_path, monkeypatch):
    """Ctrl-C (or SIGTERM) between any two of staged_save's final moves: the folder holds the previous save, not a
    mix; uninterrupted, it holds the new one. The checkpoints beside them are left alone."""
    folder = tmp_path / "out"
    previous = {"config.json": "run 1", "model-00001-of-00002.safetensors": "run 1", "tokenizer.json": "run 1"}
    previous |= {"model-00002-of-00002.safetensors": "run 1", "model.safetensors.index.json": "run 1"}
    saved = {"config.json": "run 2", "model.safetensors": "run 2", "tokenizer.json": "run 2"}

    def save(stop_at):
        moves = []

        def replace(source, target):
            moves.append(target)
            if len(moves) == stop_at:
                raise KeyboardInterrupt
            os.rename(source, target)

        with monkeypatch.context() as patch:
            patch.setattr(training.os, "replace", replace)
            with training.staged_save(folder) as staging:
                staging.mkdir()
                for name, text in saved.items():
                    (staging / name).write_text(text)
        return len(moves)

    (folder / "checkpoint-2").mkdir(parents=True)
    for name, text in previous.items():
        (folder / name).write_text(text)
    for stop_at in range(1, save(stop_at=0) + 1):  # (each move of an uninterrupted save)
        shutil.rmtree(folder)
        (folder / "checkpoint-2").mkdir(parents=True)
        for name, text in previous.items():
            (folder / name).write_text(text)
        with pytest.raises(KeyboardInterrupt):
            save(stop_at)
        assert {path.name: path.read_text() for path in folder.iterdir() if path.is_file()} == previous, stop_at
        assert sorted(path.name for path in folder.iterdir() if path.is_dir()) == ["checkpoint-2"]
    save(stop_at=0)
    assert {path.name: path.read_text() for path in folder.iterdir() if path.is_file()} == saved
    assert sorted(path.name for path in folder.iterdir() if path.is_dir()) == ["checkpoint-2"]


def test_dora_on_all_linear_layers_but_the_hypernetworks_starts_as_the_model():
    """docs/training.md's advice: DoRA divides by each output row's norm, which is zero for the hypernetworks' rows that
    produce W_u on a new model; without them, DoRA starts as the model itself."""
    peft = pytest.importorskip("peft", reason="needs the optional `peft` package")
    torch.manual_seed(0)
    model = HyperLlavaForConditionalGeneration(tiny_config(visual_expert="both")).double().eval()
    inputs = {"input_ids": torch.tensor([prompt_ids("img", 10, 11)]), "pixel_values": images(1)}
    with torch.no_grad():
        expected = model(**inputs).logits
        config = peft.LoraConfig(
            r=4, target_modules="all-linear", use_dora=True, exclude_modules=["hyper_in", "hyper_out"]
        )
        dora = peft.get_peft_model(model, config)
        assert any("lora_magnitude_vector" in name for name, _ in dora.named_parameters())
        torch.testing.assert_close(dora(**inputs).logits, expected, atol=1e-10, rtol=0)


def test_lora_on_the_experts_own_parameters_applies_and_merges():
    """PEFT's `target_parameters` (LoRA on an nn.Parameter) wraps the expert that owns it in a module of its own."""
    peft = pytest.importorskip("peft", reason="needs the optional `peft` package")
    torch.manual_seed(0)
    model = randomize_experts(HyperLlavaForConditionalGeneration(tiny_config(visual_expert="both")).double().eval())
    inputs = {"input_ids": torch.tensor([prompt_ids("img", 10, 11)]), "pixel_values": images(1)}
    targets = ["language_expert.encoder_weight", "visual_expert_first.encoder_weight"]
    with torch.no_grad():
        base = model(**inputs).logits
        # (Random B as well as A, so that the adapters change the weights from the start.)
        config = peft.LoraConfig(r=2, target_modules=[], target_parameters=targets, init_lora_weights=False)
        lora = peft.get_peft_model(model, config)
        adapted = lora(**inputs).logits
        assert not torch.allclose(adapted, base)
        torch.testing.assert_close(lora.merge_and_unload()(**inputs).logits, adapted)


def test_peft_prompt_tuning_counts_its_virtual_tokens_as_prompt_and_prefix_tuning_is_refused():
    """PEFT puts its virtual tokens in front of the input after `generate` (or the collator) named the prompt: the
    guidance pools over them too, as over the rest of the prompt. (Only the prefill: in later steps transformers 5.24
    and PEFT prepend them again, for LLaVA too.)"""
    peft = pytest.importorskip("peft", reason="needs the optional `peft` package (pip install peft)")
    # (PEFT finds the word embeddings by the vocabulary size, which must differ from the hypernetwork's width, 64.)
    config = tiny_config(vocab_size=56)
    torch.manual_seed(0)
    model = randomize_experts(HyperLlavaForConditionalGeneration(config).double().eval())
    tuned = peft.get_peft_model(model, peft.PromptTuningConfig(task_type="CAUSAL_LM", num_virtual_tokens=3))
    ids, pixel_values = torch.tensor([prompt_ids("img", 10, 11)]), images(1).double()
    out = tuned.generate(
        input_ids=ids, pixel_values=pixel_values, max_new_tokens=1, output_logits=True, return_dict_in_generate=True
    )
    embeds = torch.cat([tuned.get_prompt(batch_size=1).double(), model.get_input_embeddings()(ids)], dim=1)
    prompt = torch.ones(embeds.shape[:2], dtype=torch.bool)
    with torch.no_grad():
        logits = model(inputs_embeds=embeds, pixel_values=pixel_values, language_guidance_mask=prompt).logits[:, -1]
    torch.testing.assert_close(out.logits[0], logits.float())  # (generate returns float32 logits)

    # Prefix tuning passes its prefix as a filled cache, whose tokens have no hidden states to pool: refused by name.
    prefixed = peft.get_peft_model(
        HyperLlavaForConditionalGeneration(config),
        peft.PrefixTuningConfig(task_type="CAUSAL_LM", num_virtual_tokens=3),
    )
    with pytest.raises(ValueError, match="PEFT's prefix tuning passes its prefix as such a cache"):
        prefixed(input_ids=ids, attention_mask=torch.ones_like(ids), pixel_values=images(1), labels=ids)


def test_trainable_counts_name_the_visual_expert_apart_from_the_projector(setup):
    model = HyperLlavaForConditionalGeneration.from_pretrained(setup["base"])
    projector = model.model.multi_modal_projector
    linears = sum(p.numel() for linear in (projector.linear_1, projector.linear_2) for p in linear.parameters())
    counts = apply_stage(model, "align")
    assert counts == {"projector": linears, "visual_expert": model.parameter_counts()["visual_expert"]}


def test_lora_counts_its_trained_copies_in_their_own_groups(setup):
    """The trainable counts by group under LoRA are those of the stage without it (PEFT's copies of the projector and
    the experts renamed back), plus the adapters."""
    pytest.importorskip("peft", reason="LoRA needs the optional `peft` package (pip install peft)")
    model = HyperLlavaForConditionalGeneration.from_pretrained(setup["base"])
    expected = apply_stage(model, "experts")
    counts = trainable_counts(add_lora(model, "instruct", r=4, alpha=8, dropout=0.0))
    assert counts.pop("lora") > 0 and expected["visual_expert"] > 0
    assert counts == expected


def test_a_model_already_wrapped_by_peft_is_refused_by_the_stages(setup, tmp_path):
    """A stage sets requires_grad by group: applied to a PEFT model it would freeze LoRA's matrices and train the
    weights they wrap, a full fine-tune where LoRA was asked for."""
    peft = pytest.importorskip("peft", reason="LoRA needs the optional `peft` package (pip install peft)")
    model = HyperLlavaForConditionalGeneration.from_pretrained(setup["base"])
    config = peft.LoraConfig(r=4, target_modules=training.LORA_TARGETS, modules_to_save=["language_expert"])
    wrapped = peft.get_peft_model(model, config)
    trainable = {name for name, p in wrapped.named_parameters() if p.requires_grad}
    dataset = LlavaJsonDataset(setup["qa"], setup["processor"], setup["data"].image_folder)
    with pytest.raises(ValueError, match=r"has PEFT adapters \(default\).*lora=\(r, alpha, dropout\)"):
        build_trainer(wrapped, setup["processor"], dataset, train_args(tmp_path, "instruct"))
    assert {name for name, p in wrapped.named_parameters() if p.requires_grad} == trainable  # (nothing half-done)


def test_parameter_counts_count_each_expert_once_under_lora(setup):
    """Under LoRA the experts train as PEFT's `modules_to_save`, a trained copy beside each frozen original: the
    experts' counts stay those of the model without LoRA."""
    pytest.importorskip("peft", reason="LoRA needs the optional `peft` package (pip install peft)")
    model = HyperLlavaForConditionalGeneration.from_pretrained(setup["base"])
    expected = {name: count for name, count in model.parameter_counts().items() if "expert" in name}
    assert expected["language_expert"] > 0 and expected["visual_expert"] > 0
    wrapped = add_lora(model, "instruct", r=4, alpha=8, dropout=0.0).base_model.model
    assert {name: count for name, count in wrapped.parameter_counts().items() if "expert" in name} == expected


def test_lora_trains_adapters_and_merges_on_save(setup, tmp_path):
    pytest.importorskip("peft", reason="LoRA needs the optional `peft` package (pip install peft)")
    from transformers_hyperllava.training import save_stage

    model = HyperLlavaForConditionalGeneration.from_pretrained(setup["base"])
    base = {name: p.detach().clone() for name, p in model.named_parameters()}
    dataset = LlavaJsonDataset(setup["qa"], setup["processor"], setup["data"].image_folder)
    trainer = build_trainer(model, setup["processor"], dataset, train_args(tmp_path, "instruct"), lora=(4, 8, 0.0))
    peft_model = trainer.model
    trainable = {name for name, p in peft_model.named_parameters() if p.requires_grad}
    lora = {name for name in trainable if "lora_" in name}
    assert lora and all(".language_model.layers." in name for name in lora)
    # The projector and the experts train as PEFT's `modules_to_save`: a copy each, saved in PEFT's checkpoints.
    copy = ".modules_to_save.default."
    assert all(copy in name for name in trainable - lora)

    def model_name(name):
        return name.removeprefix("base_model.model.").replace(copy, ".")

    assert {model_name(name) for name in trainable - lora} == {
        name for name in base if expected_trainable(name, "experts")
    }
    trainer.train()
    trained = {model_name(n): p.detach().clone() for n, p in peft_model.named_parameters() if n in trainable - lora}

    q_proj = "model.language_model.layers.0.self_attn.q_proj"
    params = dict(peft_model.named_parameters())
    prefix = f"base_model.model.{q_proj}"
    lora_a = params[f"{prefix}.lora_A.default.weight"].detach().clone()
    lora_b = params[f"{prefix}.lora_B.default.weight"].detach().clone()
    assert lora_b.abs().sum() > 0

    save_stage(trainer, setup["processor"], tmp_path / "final")
    merged = AutoModelForImageTextToText.from_pretrained(tmp_path / "final", dtype=torch.float64)
    expected = base[f"{q_proj}.weight"] + (8 / 4) * lora_b @ lora_a
    torch.testing.assert_close(merged.get_parameter(f"{q_proj}.weight"), expected)
    merged_state = merged.state_dict()
    for name, weight in base.items():  # the frozen parts saved as they were
        if name.startswith("model.vision_tower.") or name == "lm_head.weight":
            torch.testing.assert_close(merged_state[name], weight, rtol=0, atol=0)
    for name, weight in trained.items():  # the trained copies saved in place of the originals
        torch.testing.assert_close(merged_state[name], weight, rtol=0, atol=0)
    assert not torch.equal(
        trained["model.multi_modal_projector.linear_1.weight"], base["model.multi_modal_projector.linear_1.weight"]
    )


class FakeHub:
    """HfApi's create_repo and upload_folder on a repo kept in memory: its files' paths, as upload_folder leaves them
    (ignore_patterns, path_in_repo, delete_patterns: remote files that match and are not uploaded go)."""

    def __init__(self, monkeypatch):
        from huggingface_hub import HfApi

        self.files, self.uploads = set(), []
        monkeypatch.setattr(HfApi, "create_repo", lambda api, repo_id, **kwargs: SimpleNamespace(repo_id=repo_id))
        monkeypatch.setattr(HfApi, "upload_folder", self.upload_folder)

    def upload_folder(self, *, folder_path, path_in_repo=None, ignore_patterns=(), delete_patterns=(), **kwargs):
        paths = [path.relative_to(folder_path).as_posix() for path in Path(folder_path).rglob("*") if path.is_file()]
        paths = [path for path in paths if not any(fnmatch(path, pattern) for pattern in ignore_patterns or ())]
        paths = {f"{path_in_repo}/{path}" if path_in_repo else path for path in paths}
        self.files = {f for f in self.files if f in paths or not any(fnmatch(f, p) for p in delete_patterns or ())}
        self.files |= paths
        self.uploads.append(paths)
        done = Future()  # (the Trainer uploads as a future and waits on it)
        done.set_result(None)
        return done


@pytest.mark.parametrize("stage, lora", [("instruct", ["--lora_r=4", "--lora_alpha=8"]), ("align", [])])
def test_push_to_hub_leaves_the_stages_product_alone_in_the_folder_and_the_repo(
    setup, tmp_path, monkeypatch, stage, lora
):
    """With --push_to_hub the Trainer pushes every checkpoint: it copies the checkpoint's weights (LoRA's adapter, stage
    align's whole model) into --output_dir and uploads them. The finished folder, and the repo after the last upload,
    hold what the stage saves, which loads as trained: no adapter applied again on top of the merged weights."""
    hub = FakeHub(monkeypatch)
    output = tmp_path / "out"
    settings = {"max_steps": 2, "save_strategy": "steps", "save_steps": 1, "push_to_hub": True, "hub_model_id": "me/x"}
    if stage == "align":
        settings |= {"stage": "align", "data_path": setup["data"].captions}
    main(cli_args(setup, output, **settings) + lora)

    pushed_during_training = set().union(*hub.uploads[:-1])
    expected_leftover = "adapter_config.json" if lora else "model.safetensors"
    assert expected_leftover in pushed_during_training  # what the final save must clear
    top_level = {name for name in hub.files if "/" not in name}
    assert top_level >= {name for name in os.listdir(output) if (output / name).is_file()} - {"training_args.bin"}
    if stage == "align":
        assert PROJECTOR_FILE in top_level and not {"config.json", "model.safetensors"} & top_level
        assert not (output / "config.json").exists() and not (output / "model.safetensors").exists()
    else:
        assert not any(name.startswith("adapter_") for name in top_level | set(os.listdir(output)))
        loaded = AutoModelForImageTextToText.from_pretrained(output)
        assert not getattr(loaded, "_hf_peft_config_loaded", False)


def run_settings(setup, output_dir, **overrides):
    return {
        "model_name_or_path": setup["base"],
        "data_path": setup["qa"],
        "image_folder": setup["data"].image_folder,
        "output_dir": output_dir,
        "stage": "instruct",
        "max_steps": 4,
        "per_device_train_batch_size": 4,
        "learning_rate": 1e-3,
        "warmup_steps": 0,
        "save_strategy": "no",
        "report_to": "none",
        "use_cpu": True,
        "disable_tqdm": True,
        "seed": 0,
        **overrides,
    }


def cli_args(setup, output_dir, **overrides):
    return [f"--{key}={value}" for key, value in run_settings(setup, output_dir, **overrides).items()]


def final_weights(folder):
    return load_file(os.path.join(folder, "model.safetensors"))


def assert_same_weights(a, b, **tolerance):
    assert a.keys() == b.keys()
    for name in a:
        torch.testing.assert_close(a[name], b[name], msg=lambda m, name=name: f"{name}: {m}", **tolerance)


def free_port():
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def run_ranks(command, env, timeout):
    """Runs `torchrun` `command`; its exit status and stderr. On a timeout it fails the test, once torchrun and its
    ranks are killed: the ranks run in sessions of their own, and killing torchrun alone would leave a hung rank
    running for ever."""
    process = subprocess.Popen(command, env=env, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True)
    try:
        _, stderr = process.communicate(timeout=timeout)
    except subprocess.TimeoutExpired:
        ranks = [
            int(pid)
            for path in Path(f"/proc/{process.pid}/task").glob("*/children")
            for pid in path.read_text().split()
        ]
        for pid in [*ranks, process.pid]:
            try:
                os.kill(pid, signal.SIGKILL)
            except ProcessLookupError:
                pass
        _, stderr = process.communicate()
        pytest.fail(f"torchrun did not finish in {timeout} s; its ranks {ranks} were killed. stderr: {stderr[-3000:]}")
    return process.returncode, stderr


@pytest.mark.parametrize("given, text_only, expected", [(None, True, True), (None, False, None), (False, True, False)])
def test_ddp_finds_unused_parameters_only_for_text_only_data_and_never_over_the_users_choice(
    setup, tmp_path, given, text_only, expected
):
    """Text-only samples leave the projector without a gradient on some ranks: DDP must be told, unless the user
    chose; with images everywhere the Trainer's default (None) stays."""

    class Data(torch.utils.data.Dataset):
        text_only_ids = ["s1"] if text_only else []

        def __len__(self):
            return 1

        def __getitem__(self, index):
            raise AssertionError("not read")

    args = train_args(tmp_path, "instruct", ddp_find_unused_parameters=given)
    build_trainer(HyperLlavaForConditionalGeneration(setup["config"]), setup["processor"], Data(), args)
    assert args.ddp_find_unused_parameters is expected


def text_only_every_other(samples):
    """The samples with every other one's image taken out: its question without the image."""
    for i, sample in enumerate(samples):
        if i % 2:
            sample = {key: value for key, value in sample.items() if key != "image"}
            human, *rest = sample["conversations"]
            human = {**human, "value": human["value"].replace("<image>", "").strip()}
            sample["conversations"] = [human, *rest]
        yield sample


@pytest.mark.parametrize("data", ["images", "text-only-rank"])
def test_two_process_ddp_matches_one_process(setup, tmp_path, data):
    """Two gloo processes with batch b each take the same steps as one process with batch 2b (sequential order).
    With text-only samples on one rank (and activation checkpointing, with which the Trainer turns DDP's search for
    unused parameters off), that rank has no gradient for the projector and the visual expert: DDP must not wait for
    them."""
    common, per_device = {"train_sampling_strategy": "sequential", "max_steps": 3}, 2
    if data == "text-only-rank":
        samples = json.loads(setup["qa"].read_text())
        (tmp_path / "mixed.json").write_text(json.dumps(list(text_only_every_other(samples))))
        # Sequential order deals the batches out in turn: with one sample each, rank 0 gets the even samples (with
        # images) and rank 1 the odd ones (text only).
        common.update(data_path=tmp_path / "mixed.json", gradient_checkpointing=True)
        per_device = 1
    main(cli_args(setup, tmp_path / "single", **common, per_device_train_batch_size=2 * per_device))
    env = {**os.environ, "OMP_NUM_THREADS": "1", "HF_HUB_OFFLINE": "1"}
    command = [
        sys.executable,
        "-m",
        "torch.distributed.run",
        "--nproc_per_node=2",
        f"--master_port={free_port()}",
        "-m",
        "transformers_hyperllava.training",
        *cli_args(setup, tmp_path / "ddp", per_device_train_batch_size=per_device, ddp_backend="gloo", **common),
    ]
    returncode, stderr = run_ranks(command, env, timeout=300)
    assert returncode == 0, stderr[-3000:]
    single, ddp = final_weights(tmp_path / "single"), final_weights(tmp_path / "ddp")
    assert_same_weights(single, ddp, rtol=1e-9, atol=1e-9)
    base = final_weights(setup["base"])
    assert not torch.equal(single["lm_head.weight"], base["lm_head.weight"])  # it did train


def test_resume_from_checkpoint_matches_uninterrupted(setup, tmp_path):
    saving = {"save_strategy": "steps", "save_steps": 2}
    main(cli_args(setup, tmp_path / "full", **saving))
    # Resume from a different starting model: the result can only match if the checkpoint's weights, optimiser and
    # schedule replaced it. The arguments come as a YAML file this time.
    other = HyperLlavaForConditionalGeneration.from_pretrained(setup["base"])
    with torch.no_grad():
        for param in other.parameters():
            param.add_(0.1)
    other.save_pretrained(tmp_path / "other")
    setup["processor"].save_pretrained(tmp_path / "other")
    resumed = run_settings(
        setup,
        tmp_path / "resumed",
        **saving,
        model_name_or_path=tmp_path / "other",
        resume_from_checkpoint=tmp_path / "full" / "checkpoint-2",
    )
    config = tmp_path / "resume.yaml"
    config.write_text(yaml.safe_dump({key: str(v) if isinstance(v, Path) else v for key, v in resumed.items()}))
    main([str(config)])
    assert_same_weights(final_weights(tmp_path / "full"), final_weights(tmp_path / "resumed"), rtol=0, atol=1e-12)

    # "true": the last checkpoint in --output_dir, here the last step's. Nothing is left to train, and the final
    # weights are that checkpoint's, not the other starting model's.
    expected = final_weights(tmp_path / "full")
    other_start = {"model_name_or_path": tmp_path / "other", "resume_from_checkpoint": "true"}
    main(cli_args(setup, tmp_path / "full", **saving, **other_start))
    assert_same_weights(expected, final_weights(tmp_path / "full"), rtol=0, atol=0)
    pytest.importorskip("peft", reason="LoRA needs the optional `peft` package (pip install peft)")
    with pytest.raises(ValueError, match="was saved without LoRA: resume it as it was trained, not with --lora_r"):
        main(cli_args(setup, tmp_path / "full", **saving, **other_start, lora_r=4, lora_alpha=8))


def test_lora_resume_restores_the_trained_projector_and_experts(setup, tmp_path):
    """With LoRA the projector and the experts train beside the adapters; a run resumed from a checkpoint must get
    them back from it, not from the starting model."""
    pytest.importorskip("peft", reason="LoRA needs the optional `peft` package (pip install peft)")
    lora = {"lora_r": 4, "lora_alpha": 8, "lora_dropout": 0.0, "save_strategy": "steps", "save_steps": 2}
    main(cli_args(setup, tmp_path / "full", **lora))
    main(cli_args(setup, tmp_path / "resumed", **lora, resume_from_checkpoint=tmp_path / "full" / "checkpoint-2"))
    # Resumed otherwise than it was trained: named before anything loads.
    checkpoint = tmp_path / "full" / "checkpoint-2"
    for other, message in (
        ({"lora_r": 0}, "was saved with LoRA .*not without --lora_r"),
        ({"lora_r": 8}, "was saved with --lora_r 4 --lora_alpha 8; this run has --lora_r 8 --lora_alpha 8"),
    ):
        with pytest.raises(ValueError, match=message):
            main(cli_args(setup, tmp_path / "other", **{**lora, **other}, resume_from_checkpoint=checkpoint))
    full = final_weights(tmp_path / "full")
    assert_same_weights(full, final_weights(tmp_path / "resumed"), rtol=0, atol=1e-12)
    base = final_weights(setup["base"])
    for name in ("model.multi_modal_projector.linear_1.weight", "model.language_model.language_expert.layer_bias"):
        assert not torch.equal(full[name], base[name])  # they did train


def test_evaluation_reports_the_mean_loss_over_the_eval_samples(setup, tmp_path):
    settings = {"eval_strategy": "steps", "eval_steps": 4, "save_strategy": "steps", "save_steps": 4}
    main(cli_args(setup, tmp_path, eval_data_path=setup["qa"], per_device_eval_batch_size=4, **settings))
    state = json.loads((tmp_path / "checkpoint-4" / "trainer_state.json").read_text())
    (eval_loss,) = [entry["eval_loss"] for entry in state["log_history"] if "eval_loss" in entry]
    # It evaluated at the last step: with the final weights, on batches of 4 from the 16 samples.
    model = HyperLlavaForConditionalGeneration.from_pretrained(tmp_path).eval()
    dataset = LlavaJsonDataset(setup["qa"], setup["processor"], setup["data"].image_folder)
    collate = LlavaDataCollator(setup["processor"].tokenizer.pad_token_id)
    with torch.no_grad():
        losses = [model(**collate([dataset[i + j] for j in range(4)])).loss for i in range(0, len(dataset), 4)]
    assert eval_loss == pytest.approx(torch.stack(losses).mean().item(), rel=1e-9)


def test_llava_checkpoint_through_both_stages(setup, tmp_path):
    """A stock LLaVA checkpoint: stage 1 writes only the projector + visual expert, stage 2 starts from them (and
    trains the LLM, not the vision tower), and the final folder reloads with the Auto classes and generates."""
    torch.manual_seed(1)
    llava = LlavaForConditionalGeneration(setup["config"].to_llava_config()).double()
    llava.save_pretrained(tmp_path / "llava")
    setup["processor"].save_pretrained(tmp_path / "llava")
    stage1, stage2 = tmp_path / "stage1", tmp_path / "stage2"
    expert = json.dumps({"visual_expert": "first"})
    main(
        cli_args(
            setup,
            stage1,
            model_name_or_path=tmp_path / "llava",
            stage="align",
            data_path=setup["data"].captions,
            hyperllava_config=expert,
        )
    )

    projector = load_file(stage1 / PROJECTOR_FILE)
    assert projector and all(name.startswith("model.multi_modal_projector.") for name in projector)
    assert any("visual_expert_first" in name for name in projector)
    assert not torch.equal(
        projector["model.multi_modal_projector.linear_1.weight"],
        llava.get_parameter("model.multi_modal_projector.linear_1.weight"),
    )
    start = load_model(
        ModelArguments(
            str(tmp_path / "llava"), pretrained_projector=str(stage1 / PROJECTOR_FILE), hyperllava_config=expert
        )
    )
    for name, tensor in projector.items():
        torch.testing.assert_close(start.get_parameter(name), tensor, rtol=0, atol=0)
    # Stage 1's folder is no model: the mistake of starting stage 2 from it is named with the way to do it. So is a
    # mistyped folder, which Transformers would take for a malformed Hub id.
    with pytest.raises(ValueError, match=rf"holds stage 1's {PROJECTOR_FILE} only: pass it as --pretrained_projector"):
        main(cli_args(setup, stage2, model_name_or_path=stage1))
    with pytest.raises(ValueError, match=r"--model_name_or_path .*/stage-1: not a folder, and not a Hub repo id"):
        main(cli_args(setup, stage2, model_name_or_path=tmp_path / "stage-1"))

    main(
        cli_args(
            setup,
            stage2,
            model_name_or_path=tmp_path / "llava",
            hyperllava_config=expert,
            pretrained_projector=stage1 / PROJECTOR_FILE,
        )
    )
    # Adam (no weight decay) moves a weight by at most about lr per step (|m_hat / sqrt(v_hat)| <= 1.007 in the first 4
    # steps, by Cauchy-Schwarz): stage 2's 4 steps at lr <= 1e-3 move none by more than `reach`. Its projector and
    # visual expert are within that of stage 1's file, and further than that from LLaVA's projector (which stage 1
    # moved as well): stage 2 started from stage 1's weights, not LLaVA's.
    final, start_llava = load_file(stage2 / "model.safetensors"), llava.state_dict()
    reach = 4 * 1e-3 * 1.01
    for name, tensor in projector.items():
        assert (final[name] - tensor).abs().max() <= reach, name
    assert max((final[name] - start_llava[name]).abs().max() for name in projector if name in start_llava) > reach
    # Stage 2 trained every LLM weight; the vision tower stayed LLaVA's, bit for bit.
    llm = [name for name in start_llava if name.startswith(("model.language_model.", "lm_head."))]
    vision = [name for name in start_llava if name.startswith("model.vision_tower.")]
    assert llm and vision and len(llm) + len(vision) + 4 == len(start_llava)  # + the projector's two linear layers
    for name in llm:
        assert not torch.equal(final[name], start_llava[name]), name
    for name in vision:
        assert torch.equal(final[name], start_llava[name]), name

    model = AutoModelForImageTextToText.from_pretrained(stage2).eval()
    processor = AutoProcessor.from_pretrained(stage2)
    assert isinstance(model, HyperLlavaForConditionalGeneration)
    sample = json.loads(setup["qa"].read_text())[0]
    from PIL import Image

    image = Image.open(setup["data"].image_folder / sample["image"])
    prompt = processor.apply_chat_template(
        [{"role": "user", "content": [{"type": "image"}, {"type": "text", "text": "What shape is in the image?"}]}],
        add_generation_prompt=True,
    )
    inputs = processor(images=image, text=prompt, return_tensors="pt")
    # This model (4 steps from random weights) says the end-of-sequence token first: min_new_tokens keeps it going, so
    # that the steps after the prefill (with the cache and the prompt's language-expert weights) are checked too.
    eos, length = processor.tokenizer.eos_token_id, inputs["input_ids"].shape[1]
    kwargs = {"output_logits": True, "return_dict_in_generate": True}
    output = model.generate(**inputs, max_new_tokens=3, min_new_tokens=3, do_sample=False, **kwargs)
    assert output.sequences.shape[1] == length + 3
    # Each step's logits as full forward passes (no cache) over the tokens so far give them, the guidance on the prompt
    # alone; each token is their argmax, the end-of-sequence token excluded.
    for step in range(3):
        guidance = torch.arange(length + step) < length
        with torch.no_grad():
            logits = model(
                input_ids=output.sequences[:, : length + step],
                pixel_values=inputs["pixel_values"],
                language_guidance_mask=guidance[None],
            ).logits[0, -1]
        torch.testing.assert_close(output.logits[step][0], logits.float())  # (generate gives float32 logits)
        logits[eos] = -torch.inf
        assert output.sequences[0, length + step] == logits.argmax()


def test_the_same_arguments_and_seed_give_the_same_weights(setup, tmp_path):
    """The experts that `from_llava` adds to a LLaVA checkpoint and LoRA's matrices are drawn before the Trainer
    seeds anything: `main` seeds first. The global generator is set apart before each run, as a new process's is."""
    pytest.importorskip("peft", reason="LoRA needs the optional `peft` package (pip install peft)")
    torch.manual_seed(1)
    llava = LlavaForConditionalGeneration(setup["config"].to_llava_config()).double()
    llava.save_pretrained(tmp_path / "llava")
    setup["processor"].save_pretrained(tmp_path / "llava")

    def run(name, seed):
        torch.manual_seed(len(name) * 7919)
        settings = {"model_name_or_path": tmp_path / "llava", "max_steps": 1, "seed": seed}
        main(cli_args(setup, tmp_path / name, **settings, lora_r=4, lora_alpha=8, lora_dropout=0.0))
        return final_weights(tmp_path / name)

    first, again, other_seed = run("a", 0), run("bb", 0), run("ccc", 1)
    assert_same_weights(first, again, rtol=0, atol=0)
    changed = [name for name in first if not torch.equal(first[name], other_seed[name])]
    assert any("expert" in name for name in changed) and any(".layers.0.self_attn" in name for name in changed)


def test_a_yaml_file_gives_numbers_in_exponent_notation_as_numbers(tmp_path):
    """PyYAML reads `2e-5` (no dot) as a string; the command line, and YAML 1.2, as a number. A string argument
    stays a string, whatever it looks like."""
    settings = "output_dir: out\nlearning_rate: 2e-5\nweight_decay: 1.5E+0\nhub_model_id: 1e5\n"
    (tmp_path / "args.yaml").write_text(settings + "data_path: d.json\nmodel_name_or_path: m\n")
    _, _, args = parse_arguments([str(tmp_path / "args.yaml")])
    _, _, given = parse_arguments(
        ["--output_dir", "out", "--learning_rate", "2e-5", "--weight_decay", "1.5E+0", "--hub_model_id", "1e5"]
        + ["--data_path", "d.json", "--model_name_or_path", "m"]
    )
    assert (args.learning_rate, args.weight_decay, args.hub_model_id) == (2e-5, 1.5, "1e5")
    assert (given.learning_rate, given.weight_decay, given.hub_model_id) == (2e-5, 1.5, "1e5")
    (tmp_path / "bad.yaml").write_text(settings.replace("2e-5", "fast") + "data_path: d.json\nmodel_name_or_path: m\n")
    with pytest.raises(ValueError, match="bad.yaml: learning_rate must be a number, got 'fast'"):
        parse_arguments([str(tmp_path / "bad.yaml")])


def test_an_arguments_file_gives_whole_numbers_as_ints_and_is_refused_by_name_when_it_is_no_mapping(tmp_path):
    required = "output_dir: out\ndata_path: d.json\nmodel_name_or_path: m\n"
    (tmp_path / "args.yaml").write_text(required + "max_steps: 2e3\nmax_length: 64.0\n")
    _, data_args, args = parse_arguments([str(tmp_path / "args.yaml")])
    assert (args.max_steps, data_args.max_length) == (2000, 64)
    assert isinstance(args.max_steps, int) and isinstance(data_args.max_length, int)
    (tmp_path / "half.yaml").write_text(required + "max_length: 1.5\n")
    with pytest.raises(ValueError, match=r"half\.yaml: max_length must be a whole number, got 1\.5"):
        parse_arguments([str(tmp_path / "half.yaml")])
    for name, text, holds in [
        ("data.json", json.dumps([{"id": "a"}]), r"a list \(a data file\? pass it as --data_path\)"),
        ("empty.yaml", "", "nothing"),
        ("scalar.yml", "align", "a str"),
    ]:
        (tmp_path / name).write_text(text)
        with pytest.raises(ValueError, match=rf"{re.escape(name)}: an arguments file maps argument names to values; "
                           rf"this one holds {holds}"):  # fmt: skip
            parse_arguments([str(tmp_path / name)])
    (tmp_path / "broken.yaml").write_text(required + "stage: [align\n")
    with pytest.raises(yaml.YAMLError, match=r'in "\S*broken\.yaml", line'):
        parse_arguments([str(tmp_path / "broken.yaml")])
    deep = "[" * 100_000 + "]" * 100_000  # deeper than the JSON and YAML readers, which recurse per level, read
    for name, content, message in [
        (
            "broken.json",
            b'{"stage": "align",\n "output_dir": }\n',
            r"broken\.json: invalid JSON: Expecting value: line 2",
        ),
        ("latin1.yaml", required.encode() + b"stage: \xe9\n", r"latin1\.yaml: not UTF-8 text \(byte 63\)"),
        ("deep.json", deep.encode(), r"deep\.json: nested too deeply to read \(maximum recursion depth"),
        ("deep.yaml", deep.encode(), r"deep\.yaml: nested too deeply to read \(maximum recursion depth"),
    ]:
        (tmp_path / name).write_bytes(content)
        with pytest.raises(ValueError, match=message):
            parse_arguments([str(tmp_path / name)])


def test_a_damaged_adapter_config_in_the_checkpoint_to_resume_is_named(tmp_path):
    checkpoint = tmp_path / "out" / "checkpoint-5"
    checkpoint.mkdir(parents=True)
    adapter = checkpoint / "adapter_config.json"
    lora = (8, 16, 0.05)
    adapter.write_text('{"r": 8, "lora_alpha": ')  # truncated (a full disk, say)
    with pytest.raises(ValueError, match=rf"{re.escape(str(adapter))}: Expecting value"):
        training.check_resume("true", tmp_path / "out", lora)
    adapter.write_text("[8, 16]")
    with pytest.raises(ValueError, match=rf"{re.escape(str(adapter))} must hold a JSON object, got list"):
        training.check_resume(str(checkpoint), tmp_path / "out", lora)
    adapter.write_text(json.dumps({"r": 8, "lora_alpha": 16}))
    training.check_resume(str(checkpoint), tmp_path / "out", lora)


@pytest.mark.parametrize("which", ["data_path", "eval_data_path"])
def test_bad_sample_stops_before_the_model_loads(setup, tmp_path, monkeypatch, which):
    samples = json.loads(setup["qa"].read_text())
    samples[3]["conversations"][0]["value"] = samples[3]["conversations"][0]["value"].replace("<image>\n", "")
    bad = tmp_path / "bad.json"
    bad.write_text(json.dumps(samples))

    def load_model(_):
        raise AssertionError("the model loads before the data is checked")

    monkeypatch.setattr(training, "load_model", load_model)
    eval_args = {"eval_strategy": "steps", "eval_steps": 1} if which == "eval_data_path" else {}
    with pytest.raises(ValueError, match=repr(samples[3]["id"])):
        main(cli_args(setup, tmp_path / "out", **{which: bad}, **eval_args))
    assert not (tmp_path / "out").exists() or not any((tmp_path / "out").iterdir())


def test_an_interrupted_save_of_the_trained_weights_keeps_the_previous_file(tmp_path, monkeypatch):
    from transformers_hyperllava.training import save_trained_weights

    model = HyperLlavaForConditionalGeneration(tiny_config())
    apply_stage(model, "align")
    path = tmp_path / PROJECTOR_FILE
    path.write_bytes(b"the previous run's weights")

    def half_written(tensors, filename, metadata=None):
        Path(filename).write_bytes(b"half")
        raise KeyboardInterrupt

    monkeypatch.setattr("transformers_hyperllava.training.save_file", half_written)
    with pytest.raises(KeyboardInterrupt):
        save_trained_weights(model.state_dict(), model, path)
    assert path.read_bytes() == b"the previous run's weights"
    assert list(tmp_path.iterdir()) == [path]  # and no partial file left beside it
    monkeypatch.undo()
    save_trained_weights(model.state_dict(), model, path)
    trained = {name for name, param in model.named_parameters() if param.requires_grad}
    assert load_file(path).keys() == trained and list(tmp_path.iterdir()) == [path]


def test_a_compiled_stage_1_saves_its_trained_weights_under_their_names(setup, tmp_path):
    """With --torch_compile the Trainer's wrapped model is the compiled module, whose state dict names every weight
    `_orig_mod.<name>`: stage 1's file must still hold the trained weights, under the model's own names."""
    from transformers_hyperllava.training import save_stage

    model = HyperLlavaForConditionalGeneration.from_pretrained(setup["base"])
    dataset = LlavaJsonDataset(setup["qa"], setup["processor"], setup["data"].image_folder)
    args = train_args(tmp_path / "run", "align", torch_compile=True, torch_compile_backend="aot_eager")
    trainer = build_trainer(model, setup["processor"], dataset, args)
    trainer.train()
    assert isinstance(trainer.model_wrapped, torch._dynamo.eval_frame.OptimizedModule)  # what the test is about
    save_stage(trainer, setup["processor"], tmp_path / "stage1")
    saved = load_file(tmp_path / "stage1" / PROJECTOR_FILE)
    trained = {name: p for name, p in model.named_parameters() if p.requires_grad}
    assert saved.keys() == trained.keys()
    assert all(torch.equal(saved[name], trained[name].detach()) for name in trained)


def test_trained_weights_missing_from_the_state_dict_are_refused(tmp_path):
    from transformers_hyperllava.training import save_trained_weights

    model = HyperLlavaForConditionalGeneration(tiny_config())
    apply_stage(model, "align")
    state = {f"_orig_mod.{name}": tensor for name, tensor in model.state_dict().items()}
    with pytest.raises(ValueError, match=r"model\.multi_modal_projector\.linear_1\.weight"):
        save_trained_weights(state, model, tmp_path / PROJECTOR_FILE)
    assert not any(tmp_path.iterdir())


def test_projector_file_must_fit(setup, tmp_path):
    model = HyperLlavaForConditionalGeneration(tiny_config(visual_expert="second"))
    from transformers_hyperllava.training import save_trained_weights

    apply_stage(model, "align")
    save_trained_weights(model.state_dict(), model, tmp_path / PROJECTOR_FILE)
    # Stage 1 trained a "second" expert; a "both" model would start with an untrained "first" one.
    with pytest.raises(ValueError, match="visual_expert_first"):
        load_model(ModelArguments(str(setup["base"]), pretrained_projector=str(tmp_path / PROJECTOR_FILE)))
    # Stage 1 ran with another bottleneck r: every misshapen weight is named with both shapes. The first visual
    # expert's layer bias holds its P = 2 r d_in + r d_out generated weights (d_in: the vision width, d_out: the LLM's).
    config = setup["config"]
    other = HyperLlavaForConditionalGeneration(tiny_config(visual_expert="both", expert_bottleneck_dim=2))
    apply_stage(other, "align")
    save_trained_weights(other.state_dict(), other, tmp_path / "other.safetensors")
    d_in, d_out = config.vision_config.hidden_size, config.text_config.hidden_size
    file_p, model_p = (2 * r * d_in + r * d_out for r in (2, config.expert_bottleneck_dim))
    with pytest.raises(
        ValueError,
        match=rf"(?s)--pretrained_projector .*other\.safetensors does not fit the model .*"
        rf"visual_expert_first\.layer_bias: copying a param with shape torch\.Size\(\[1, {file_p}\]\) from checkpoint, "
        rf"the shape in current model is torch\.Size\(\[1, {model_p}\]\)",
    ):
        load_model(ModelArguments(str(setup["base"]), pretrained_projector=str(tmp_path / "other.safetensors")))
    # LLaVA's own stage 1 writes a pickle, mm_projector.bin: named as the wrong kind of file, not a header error.
    torch.save(model.state_dict(), tmp_path / "mm_projector.bin")
    with pytest.raises(ValueError, match=r"--pretrained_projector .*mm_projector\.bin: cannot read it as safetensors"):
        load_model(ModelArguments(str(setup["base"]), pretrained_projector=str(tmp_path / "mm_projector.bin")))


SHARDED = r"--lora_r is not supported with --fsdp or --deepspeed"


@pytest.mark.parametrize(
    "overrides, flags, parsed, message",
    [
        ({"lora_r": -1}, [], {}, r"--lora_r must be 0 \(no LoRA\) or a positive rank, got -1"),
        ({"lora_r": 4, "lora_alpha": 0}, [], {}, r"--lora_alpha must be positive, got 0"),
        # LoRA's weights are merged on one process when saved: sharded parameters would save partial.
        ({"lora_r": 4}, ["--fsdp"], {}, SHARDED),
        # (TrainingArguments checks a --deepspeed config with the deepspeed package, not installed here: it is set on
        # the parsed arguments instead.)
        ({"lora_r": 4}, [], {"deepspeed": "zero2.json"}, SHARDED),
    ],
    ids=["negative-rank", "zero-alpha", "fsdp", "deepspeed"],
)
def test_lora_settings_are_checked_before_anything_loads(
    setup, tmp_path, monkeypatch, overrides, flags, parsed, message
):
    class Parser(HfArgumentParser):
        def parse_args_into_dataclasses(self, *args, **kwargs):
            model_args, data_args, training_args = super().parse_args_into_dataclasses(*args, **kwargs)
            for key, value in parsed.items():
                setattr(training_args, key, value)
            return model_args, data_args, training_args

    def loads(*args, **kwargs):
        pytest.fail("the model or processor was read before the LoRA settings were checked")

    monkeypatch.setattr("transformers_hyperllava.training.HfArgumentParser", Parser)
    for name in ("check_model_folder", "load_processor", "load_model"):
        monkeypatch.setattr(f"transformers_hyperllava.training.{name}", loads)
    with pytest.raises(ValueError, match=message):
        main(cli_args(setup, tmp_path / "out", **overrides) + flags)
    assert not (tmp_path / "out").exists()


def projector_weights(model):
    apply_stage(model, "align")
    return {name: param.detach().clone() for name, param in model.named_parameters() if param.requires_grad}


def mistake(case, setup, tmp_path):
    """A call that makes mistake `case`, and the part of its error message that names the problem."""
    if case == "hyperllava_config-for-hyperllava":
        overrides = '{"visual_expert": "first"}'
        message = r"--hyperllava_config applies to LLaVA checkpoints; this one is already HyperLLaVA"
        return lambda: load_model(ModelArguments(str(setup["base"]), hyperllava_config=overrides)), message
    if case == "neither-llava-nor-hyperllava":
        folder = tmp_path / "llama"
        setup["config"].text_config.save_pretrained(folder)  # a Llama config.json
        message = rf"{re.escape(str(folder))}: model_type 'llama' is neither hyperllava nor llava"
        return lambda: load_model(ModelArguments(str(folder))), message
    if case in (
        "projector-file-with-llm-weights",
        "projector-file-with-weights-the-model-lacks",
        "empty-projector-file",
    ):
        model = HyperLlavaForConditionalGeneration(tiny_config(visual_expert="second"))
        if case == "empty-projector-file":
            weights, message = {}, rf"{re.escape(str(tmp_path / PROJECTOR_FILE))} holds no tensors"
        elif case == "projector-file-with-llm-weights":
            llm_weight = "model.language_model.norm.weight"
            weights = {**projector_weights(model), llm_weight: model.get_parameter(llm_weight).detach().clone()}
            message = rf"expected only projector and visual-expert weights, found \['{re.escape(llm_weight)}'\]"
        else:  # stage 1 trained both visual experts, stage 2's model has the second only
            weights = projector_weights(HyperLlavaForConditionalGeneration(tiny_config(visual_expert="both")))
            message = r"weights the model does not have: \['model\.multi_modal_projector\.visual_expert_first\."
        save_file(weights, tmp_path / PROJECTOR_FILE)
        return lambda: load_trained_weights(model, tmp_path / PROJECTOR_FILE), message
    if case == "lora-in-align":
        model = HyperLlavaForConditionalGeneration(tiny_config())
        message = r"LoRA adapts the LLM, which the align stage does not train: use --stage instruct or experts"
        return lambda: add_lora(model, "align", r=4, alpha=8, dropout=0.0), message
    if case == "processor-image-token":
        # A model whose <image> placeholder is another token than the processor's (the tokenizer fits its vocabulary).
        config = copy.deepcopy(setup["config"])
        processor_id = setup["processor"].tokenizer.convert_tokens_to_ids("<image>")
        assert (
            processor_id == config.image_token_id
            and len(setup["processor"].tokenizer) <= config.text_config.vocab_size
        )
        config.image_token_id = processor_id + 1
        args = ModelArguments(str(setup["base"]))
        message = rf"<image> = {processor_id}; the model has .* image_token_id = {processor_id + 1}"
        return lambda: check_processor_fits(setup["processor"], config, args), message
    if case == "text-only-samples-in-align":
        samples = json.loads(setup["qa"].read_text())[:4]
        (tmp_path / "mixed.json").write_text(json.dumps(list(text_only_every_other(samples))))
        dataset = LlavaJsonDataset(tmp_path / "mixed.json", setup["processor"], setup["data"].image_folder)
        model = HyperLlavaForConditionalGeneration.from_pretrained(setup["base"])
        ids = [samples[1]["id"], samples[3]["id"]]
        message = rf"stage align trains only what the images reach .* 2 sample\(s\) have no image, e.g. {re.escape(repr(ids))}"
        return lambda: build_trainer(model, setup["processor"], dataset, train_args(tmp_path, "align")), message
    raise AssertionError(case)


@pytest.mark.parametrize(
    "case",
    [
        "text-only-samples-in-align",
        "hyperllava_config-for-hyperllava",
        "neither-llava-nor-hyperllava",
        "projector-file-with-llm-weights",
        "projector-file-with-weights-the-model-lacks",
        "empty-projector-file",
        "lora-in-align",
        "processor-image-token",
    ],
)
def test_mistakes_are_named(setup, tmp_path, case):
    call, message = mistake(case, setup, tmp_path)
    with pytest.raises(ValueError, match=message):
        call()


@pytest.mark.parametrize("stage", ["align", "instruct"])
def test_an_output_dir_with_an_earlier_runs_checkpoints_or_a_model_for_stage_align_is_refused(setup, tmp_path, stage):
    """The Trainer would save this run's checkpoints into the earlier run's folders, beside their files; and beside
    stage align's projector file a model would be loaded instead of it."""
    (tmp_path / "out" / "checkpoint-2").mkdir(parents=True)
    with pytest.raises(ValueError, match=r"out holds checkpoints of an earlier run \(checkpoint-2\): resume it"):
        main(cli_args(setup, tmp_path / "out", stage=stage))
    (tmp_path / "out" / "checkpoint-2").rmdir()
    (tmp_path / "out" / "config.json").write_text("{}")
    if stage == "align":
        with pytest.raises(ValueError, match=r"out holds a model \(config.json\): stage align saves only"):
            main(cli_args(setup, tmp_path / "out", stage=stage, max_steps=1))
    else:  # the model the stage saves replaces it
        main(cli_args(setup, tmp_path / "out", stage=stage, max_steps=1))
        assert json.loads((tmp_path / "out" / "config.json").read_text())["model_type"] == "hyperllava"


def test_a_processor_of_another_model_is_refused(setup, tmp_path):
    processor = copy.deepcopy(setup["processor"])
    processor.tokenizer.add_tokens(["<new>"])  # one token more than the model has embeddings for
    processor.save_pretrained(tmp_path / "bigger")
    vocab_size = setup["config"].text_config.vocab_size
    message = rf"its tokenizer has {vocab_size + 1} tokens .* the model has {vocab_size} token embeddings"
    with pytest.raises(ValueError, match=message):
        main(cli_args(setup, tmp_path / "out", processor_name_or_path=tmp_path / "bigger"))
    assert not (tmp_path / "out").exists()


@pytest.mark.parametrize(
    "value, message",
    [
        ('{"visual_expert": "second",}', r"--hyperllava_config is not valid JSON"),
        ('["second"]', r"--hyperllava_config must be a JSON object"),
        ('{"expert_mod": "static"}', r"\['expert_mod'\] are not HyperLlavaConfig fields"),  # a misspelt field
    ],
)
def test_hyperllava_config_mistakes_are_named(tmp_path, value, message):
    LlavaForConditionalGeneration(tiny_config().to_llava_config()).save_pretrained(tmp_path)
    with pytest.raises(ValueError, match=message):
        load_model(ModelArguments(str(tmp_path), hyperllava_config=value))
    # A mapping, as a YAML arguments file gives it, works like its JSON text.
    model = load_model(ModelArguments(str(tmp_path), hyperllava_config={"expert_mode": "static"}))
    assert model.config.expert_mode == "static"


@pytest.mark.parametrize("kind", ["llava", "hyperllava"])
def test_models_load_for_training_in_float32_from_half_precision_checkpoints(tmp_path, kind):
    # Optimiser updates at lr 2e-5 round away in float16 weights: training keeps float32 masters.
    config = tiny_config()
    torch.manual_seed(0)
    if kind == "llava":
        saved = LlavaForConditionalGeneration(config.to_llava_config())
    else:
        saved = randomize_experts(HyperLlavaForConditionalGeneration(config))
    saved.half().save_pretrained(tmp_path)
    model = load_model(ModelArguments(str(tmp_path)))
    assert {p.dtype for p in model.parameters()} == {torch.float32}
    for name, tensor in saved.state_dict().items():
        torch.testing.assert_close(model.state_dict()[name], tensor.float(), atol=0, rtol=0, msg=name)
