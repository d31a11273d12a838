"""`hyperllava-demo`: the whole HyperLLaVA recipe on the CPU in minutes, on data the package renders itself.

It renders the demo shapes (`demo_data`), trains a word-level tokenizer on their text, builds a tiny HyperLLaVA,
runs stage 1 (align: captions) and stage 2 (instruct: questions), reports exact-match accuracy per question type
on held-out images beside the chance level, saves the model in Hub format, reloads it with
`AutoModelForImageTextToText` and `AutoProcessor`, and answers a few held-out questions. `--compare` trains LLaVA
(no experts), the `static` adapter and the `dynamic` HyperLLaVA on the same data and budget and prints one table.

The tiny LLM starts from random weights, so the demo's learning rates are far above the paper's (which fine-tune a
pretrained Vicuna); the optimiser, schedule and which parameters each stage trains are the paper's.
"""

import argparse
import json
import math
import random
import tempfile
import time
from pathlib import Path

import torch
from tqdm.auto import tqdm
from transformers import AutoModelForImageTextToText, AutoProcessor
from transformers.utils import logging as hf_logging

from .data import LlavaJsonDataset
from .demo_data import CHANCE, QUESTION_TYPES, make_demo_dataset
from .files import stop_signals_interrupt
from .generate import build_prompt, generate_answers, load_image
from .modeling_hyperllava import HyperLlavaForConditionalGeneration
from .tiny import tiny_config
from .tiny_tokenizer import tiny_processor, train_tokenizer
from .training import HyperLlavaTrainingArguments, build_trainer, staged_save

# Name -> HyperLLaVA config fields of the models `--compare` trains; the default run trains "dynamic" only.
VARIANTS = {
    "llava": {"visual_expert": None, "language_expert_layers": None},
    "static": {"expert_mode": "static"},
    "dynamic": {"expert_mode": "dynamic"},
}


def demo_config(vocab_size: int, **overrides):
    """The demo's model: 64 px images in 16 px patches (16 visual tokens), a 4-layer LLM of width 96."""
    sizes = {
        "hidden_size": 96,
        "num_hidden_layers": 4,
        "vision_hidden_size": 64,
        "image_size": 64,
        "patch_size": 16,
        "expert_embedding_dim": 16,
        "expert_bottleneck_dim": 8,
        "hypernetwork_hidden_dim": 32,
    }
    return tiny_config(vocab_size=vocab_size, **{**sizes, **overrides})


def training_args(output_dir, stage, steps, batch_size, learning_rate, seed):
    return HyperLlavaTrainingArguments(
        output_dir=str(output_dir),
        stage=stage,
        max_steps=steps,
        per_device_train_batch_size=batch_size,
        learning_rate=learning_rate,
        save_strategy="no",
        logging_steps=max(1, steps // 10),
        report_to="none",
        seed=seed,
        use_cpu=not torch.cuda.is_available(),
    )


def answer(model, processor, questions, image_folder, batch_size=64, progress=None):
    """Greedy answers to `questions` (dicts with "image" and "question"), batched with left padding, as
    `hyperllava-generate` answers a question file."""
    model.eval()
    answers = []
    for start in tqdm(range(0, len(questions), batch_size), desc=progress, disable=progress is None):
        batch = questions[start : start + batch_size]
        images = [load_image(Path(image_folder) / q["image"]) for q in batch]
        prompts = [build_prompt(processor, q["question"], num_images=1) for q in batch]
        answers += generate_answers(model, processor, prompts, images, max_new_tokens=4, do_sample=False)
    return answers


def accuracy_by_type(questions, answers) -> dict[str, float]:
    correct, total = {}, {}
    for q, a in zip(questions, answers, strict=True):
        total[q["type"]] = total.get(q["type"], 0) + 1
        correct[q["type"]] = correct.get(q["type"], 0) + (a == q["answer"])
    return {kind: correct[kind] / total[kind] for kind in QUESTION_TYPES if kind in total}


def train_variant(name, config, processor, data, args, workdir):
    torch.manual_seed(args.seed)
    model = HyperLlavaForConditionalGeneration(config)
    max_length = 128
    captions = LlavaJsonDataset(data.captions, processor, data.image_folder, max_length)
    instruct = LlavaJsonDataset(data.instruct, processor, data.image_folder, max_length)
    stages = (
        ("align", captions, args.align_steps, args.align_lr),
        ("instruct", instruct, args.instruct_steps, args.instruct_lr),
    )
    for stage, dataset, steps, lr in stages:
        print(f"\n[{name}] stage {stage}: {steps} steps of {args.batch_size} samples")
        stage_args = training_args(workdir / name / stage, stage, steps, args.batch_size, lr, args.seed)
        build_trainer(model, processor, dataset, stage_args).train()
    return model


def print_table(results: dict[str, dict[str, float]]):
    names = list(results)
    print("\nHeld-out exact-match accuracy (chance = a uniform guess among the possible answers)")
    print(f"{'question type':<14}{'chance':>8}" + "".join(f"{n:>10}" for n in names))
    for kind in QUESTION_TYPES:
        print(
            f"{kind:<14}{CHANCE[kind]:>8.1%}" + "".join(f"{results[n].get(kind, float('nan')):>10.1%}" for n in names)
        )


def parse_args(argv=None):
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument(
        "--output_dir",
        default="hyperllava-demo",
        help="The data (data/) and the final model (model/) go here; no checkpoints are saved",
    )
    parser.add_argument("--compare", action="store_true", help="Also train LLaVA and the static adapter; one table")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--train_images", type=int, default=3000)
    parser.add_argument("--heldout_images", type=int, default=300)
    parser.add_argument("--align_steps", type=int, default=60)
    parser.add_argument("--instruct_steps", type=int, default=1600)
    parser.add_argument("--batch_size", type=int, default=32)
    parser.add_argument("--align_lr", type=float, default=1e-3)
    parser.add_argument("--instruct_lr", type=float, default=1e-3)
    # The demo's matrices are too small to gain from a second thread, and on a busy machine two threads that wait
    # on each other were ten times slower than one.
    parser.add_argument("--threads", type=int, default=1, help="torch threads (0: PyTorch's default)")
    args = parser.parse_args(argv)
    for name in ("train_images", "heldout_images", "align_steps", "instruct_steps", "batch_size"):
        if getattr(args, name) < 1:  # (found here, not after a training run)
            parser.error(f"--{name} must be at least 1, got {getattr(args, name)}")
    if args.threads < 0:
        parser.error(f"--threads must be 0 (PyTorch's default) or more, got {args.threads}")
    # Checked here too: NumPy (seeded by the Trainer) takes no seed outside [0, 2**32), and the optimiser refuses a
    # negative or NaN learning rate only when its stage starts (stage 2's after stage 1 has trained) and trains an
    # infinite one into NaN weights, which the demo would evaluate and save.
    if not 0 <= args.seed < 2**32:
        parser.error(f"--seed must be between 0 and 2**32 - 1, got {args.seed}")
    for name in ("align_lr", "instruct_lr"):
        if not (math.isfinite(getattr(args, name)) and getattr(args, name) >= 0):
            parser.error(f"--{name} must be a finite number >= 0, got {getattr(args, name)}")
    return args


def run(args) -> tuple[dict[str, dict[str, float]], dict[str, list[str]]]:
    """The demo with parsed `args`; returns the held-out accuracy by model and question type, and each trained
    model's answers to the held-out questions (in the held-out file's order)."""
    if args.threads:
        torch.set_num_threads(args.threads)
    hf_logging.set_verbosity_warning()
    start = time.time()
    workdir = Path(args.output_dir)
    data = make_demo_dataset(workdir / "data", args.train_images, args.heldout_images, seed=args.seed)
    tokenizer = train_tokenizer(data.training_texts())
    processor = tiny_processor(tokenizer, demo_config(len(tokenizer)))
    heldout = json.loads(data.heldout.read_text())

    results, models, answers = {}, {}, {}
    # The Trainer makes its output folder even when it saves nothing: a scratch one, so that the demo leaves data/
    # and model/ only.
    with tempfile.TemporaryDirectory() as scratch:
        for name in VARIANTS if args.compare else ("dynamic",):
            config = demo_config(len(tokenizer), **VARIANTS[name])
            models[name] = train_variant(name, config, processor, data, args, Path(scratch))
            answers[name] = answer(
                models[name], processor, heldout, data.image_folder, progress=f"[{name}] evaluating"
            )
            results[name] = accuracy_by_type(heldout, answers[name])
    print_table(results)

    model_dir = workdir / "model"
    with staged_save(model_dir) as staging:
        models["dynamic"].save_pretrained(staging)
        processor.save_pretrained(staging)
    print(f"\nSaved the HyperLLaVA model and processor in Hub format to {model_dir}")
    model = AutoModelForImageTextToText.from_pretrained(model_dir)
    reloaded = AutoProcessor.from_pretrained(model_dir)
    samples = random.Random(args.seed).sample(heldout, min(5, len(heldout)))
    for q, a in zip(samples, answer(model, reloaded, samples, data.image_folder), strict=True):
        print(f"  {q['image']}: {q['question']!r} -> {a!r} (expected {q['answer']!r})")
    print(f"\nDone in {time.time() - start:.0f} s")
    return results, answers


# A job's time limit (SIGTERM) or a closed terminal (SIGHUP) leaves no partial output either, as Ctrl-C does.
@stop_signals_interrupt()
def main(argv=None):
    run(parse_args(argv))


if __name__ == "__main__":
    main()
