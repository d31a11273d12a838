"""The built-in demo: the rendered data says what its answers say, and a shortened demo run learns it."""

import json
import os
import re
import signal
from collections import defaultdict, deque
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image
from transformers import AutoModelForImageTextToText, AutoProcessor

from conftest import stop_signals_must_be_caught
from transformers_hyperllava import demo
from transformers_hyperllava.demo_data import CHANCE, COLOURS, COUNTS, make_demo_dataset

BACKGROUND = (235, 235, 235)


def components(mask):
    """Connected 4-neighbour regions of a boolean image: a plain flood fill, independent of the renderer."""
    seen = np.zeros_like(mask)
    regions = []
    for start in zip(*np.nonzero(mask)):
        if seen[start]:
            continue
        seen[start] = True
        queue, pixels = deque([start]), []
        while queue:
            y, x = queue.popleft()
            pixels.append((y, x))
            for ny, nx in ((y + 1, x), (y - 1, x), (y, x + 1), (y, x - 1)):
                if 0 <= ny < mask.shape[0] and 0 <= nx < mask.shape[1] and mask[ny, nx] and not seen[ny, nx]:
                    seen[ny, nx] = True
                    queue.append((ny, nx))
        regions.append(np.array(pixels))
    return regions


def shape_of(region):
    """Tell the four shapes apart by how much of their bounding box they fill and where their widest row is."""
    top, left = region.min(axis=0)
    height, width = region.max(axis=0) - (top, left) + 1
    fill = len(region) / (height * width)
    if fill > 0.95:
        return "square"
    if fill > 0.7:
        return "circle"
    rows = np.bincount(region[:, 0] - top)
    return "triangle" if rows.argmax() > 0.75 * height else "diamond"


@pytest.fixture(scope="module")
def data(tmp_path_factory):
    return make_demo_dataset(tmp_path_factory.mktemp("demo"), num_train_images=40, num_heldout_images=40, seed=3)


def test_answers_match_the_pixels(data):
    heldout = json.loads(data.heldout.read_text())
    assert {q["type"] for q in heldout} == set(CHANCE)
    for q in heldout:
        pixels = np.asarray(Image.open(data.image_folder / q["image"]).convert("RGB"))
        foreground = (pixels != BACKGROUND).any(axis=-1)
        regions = [r for r in components(foreground) if len(r) > 3]
        if q["type"] == "colour":
            colours = {tuple(pixels[y, x]) for y, x in np.argwhere(foreground)}
            assert COLOURS[q["answer"]] in colours
            assert all(pixels[tuple(r[0])].tolist() == list(COLOURS[q["answer"]]) for r in regions)
        elif q["type"] == "count":
            assert COUNTS[len(regions) - 1] == q["answer"]
        elif q["type"] == "shape":
            for region in regions:
                assert shape_of(region) == q["answer"]
        elif q["type"] == "yes/no":  # "Are the shapes large?": a large shape spans more than a quarter of the width
            width = regions[0][:, 1].max() - regions[0][:, 1].min() + 1
            assert q["answer"] == ("yes" if width > pixels.shape[1] / 4 else "no")
        elif q["type"] == "position":
            (y, x), size = regions[0].mean(axis=0), pixels.shape[0]
            assert q["answer"] == f"{'top' if y < size / 2 else 'bottom'} {'left' if x < size / 2 else 'right'}"


def test_deterministic_and_heldout_images_are_new(data, tmp_path):
    again = make_demo_dataset(tmp_path, num_train_images=40, num_heldout_images=40, seed=3)
    for name in ("captions", "instruct", "heldout"):
        assert getattr(again, name).read_text() == getattr(data, name).read_text()
    for path in data.image_folder.iterdir():
        assert (again.image_folder / path.name).read_bytes() == path.read_bytes()
    train = {Image.open(p).tobytes() for p in data.image_folder.glob("train_*.png")}
    heldout = [Image.open(p).tobytes() for p in data.image_folder.glob("heldout_*.png")]
    assert heldout and not any(image in train for image in heldout)


def test_an_interrupted_rewrite_leaves_the_previous_dataset_whole(tmp_path, monkeypatch):
    """Rewritten in place, the images would be the new seed's and the captions the old one's."""
    folder = tmp_path / "data"
    make_demo_dataset(folder, num_train_images=6, num_heldout_images=2, seed=0)
    before = {path.relative_to(folder): path.read_bytes() for path in folder.rglob("*") if path.is_file()}
    saved = []

    def stopped_save(image, path):
        if len(saved) == 3:
            raise KeyboardInterrupt  # Ctrl-C
        saved.append(path)
        image.save(path, format="PNG")

    with monkeypatch.context() as patch:
        patch.setattr("transformers_hyperllava.demo_data._save_image", stopped_save)
        with pytest.raises(KeyboardInterrupt):
            make_demo_dataset(folder, num_train_images=6, num_heldout_images=2, seed=1)
    assert {path.relative_to(folder): path.read_bytes() for path in folder.rglob("*") if path.is_file()} == before
    assert [path.name for path in tmp_path.iterdir()] == ["data"]
    make_demo_dataset(folder, num_train_images=6, num_heldout_images=2, seed=1)
    assert (folder / "captions.json").read_bytes() != before[Path("captions.json")]
    assert [path.name for path in tmp_path.iterdir()] == ["data"]

    (folder / "notes.txt").write_text("mine")
    with pytest.raises(ValueError, match=r"data holds files that are not the demo dataset's \(notes\.txt\)"):
        make_demo_dataset(folder, num_train_images=6, num_heldout_images=2, seed=1)
    assert (folder / "notes.txt").read_text() == "mine"


def test_shortened_demo_learns_every_question_type(tmp_path, capsys):
    """The default run with a third of its images and steps (full run: docs/training.md). The targets are the full
    run's (colour and shape >= 80%, every other type >= 2x chance) except yes/no (2x chance would be 100%: here
    >= 90%) and position, which this budget only half learns (>= 1.5x chance). The model the demo saved answers
    every held-out question as the trained model did."""
    threads = torch.get_num_threads()
    try:
        results, answers = demo.run(
            demo.parse_args(
                [
                    "--output_dir",
                    str(tmp_path),
                    "--train_images",
                    "1000",
                    "--heldout_images",
                    "150",
                    "--align_steps",
                    "20",
                    "--instruct_steps",
                    "600",
                ]
            )
        )
        # Reloaded on the demo's thread count, as the trained model answered (another may round differently).
        model = AutoModelForImageTextToText.from_pretrained(tmp_path / "model")
        processor = AutoProcessor.from_pretrained(tmp_path / "model")
        heldout = json.loads((tmp_path / "data" / "heldout.json").read_text())
        reloaded_answers = demo.answer(model, processor, heldout, tmp_path / "data" / "images")
    finally:
        torch.set_num_threads(threads)  # the demo sets it for the whole process
    assert reloaded_answers == answers["dynamic"]
    assert sorted(path.name for path in tmp_path.iterdir()) == ["data", "model"]  # (no checkpoints, as --help says)
    # The demo's own reload answered its sample questions as the trained model did.
    out = capsys.readouterr().out
    assert f"Saved the HyperLLaVA model and processor in Hub format to {tmp_path / 'model'}" in out
    trained_lines = {
        f"  {q['image']}: {q['question']!r} -> {a!r} (expected {q['answer']!r})"
        for q, a in zip(heldout, answers["dynamic"], strict=True)
    }
    printed = [line for line in out.splitlines() if "(expected" in line]
    assert len(printed) == 5 and set(printed) <= trained_lines, printed
    # The reported accuracy is exact match per question type, counted here again from the answers.
    by_type = defaultdict(list)
    for question, answer in zip(heldout, answers["dynamic"], strict=True):
        by_type[question["type"]].append(answer == question["answer"])
    results = results["dynamic"]
    assert results == {kind: sum(hits) / len(hits) for kind, hits in by_type.items()}
    assert results["colour"] >= 0.8 and results["shape"] >= 0.8
    assert results["count"] >= 2 * CHANCE["count"]
    assert results["yes/no"] >= 0.9
    assert results["position"] >= 1.5 * CHANCE["position"]


def test_a_demo_with_fewer_than_five_heldout_questions_shows_them_all(tmp_path, capsys):
    """One held-out image gives 4 questions: the closing sample shows those, rather than fail after the whole run."""
    threads = torch.get_num_threads()
    argv = ["--output_dir", str(tmp_path), "--train_images", "8", "--heldout_images", "1", "--batch_size", "4"]
    try:
        demo.run(demo.parse_args([*argv, "--align_steps", "1", "--instruct_steps", "1"]))
    finally:
        torch.set_num_threads(threads)
    heldout = json.loads((tmp_path / "data" / "heldout.json").read_text())
    printed = [line for line in capsys.readouterr().out.splitlines() if "(expected" in line]
    assert len(heldout) == 4 and len(printed) == 4


@pytest.mark.parametrize("stop", [signal.SIGTERM, signal.SIGHUP], ids=["sigterm", "sighup"])
def test_a_time_limit_or_a_closed_terminal_leaves_no_partial_file(tmp_path, monkeypatch, stop):
    """SIGTERM (a job's time limit) and SIGHUP while the demo writes its data leave what Ctrl-C leaves."""
    written = []
    save = Image.Image.save

    def stopped_save(image, path, *args, **kwargs):
        save(image, path, *args, **kwargs)
        written.append(path)
        if len(written) == 3:
            os.kill(os.getpid(), stop)

    monkeypatch.setattr(Image.Image, "save", stopped_save)
    with stop_signals_must_be_caught("hyperllava-demo"), pytest.raises(KeyboardInterrupt):
        demo.main(["--output_dir", str(tmp_path), "--train_images", "8", "--heldout_images", "1"])
    assert list(tmp_path.iterdir()) == []  # the dataset's temporary folder is gone


@pytest.mark.parametrize(
    "argv, message",
    [
        (["--heldout_images", "0"], "--heldout_images must be at least 1, got 0"),
        (["--batch_size", "0"], "--batch_size must be at least 1, got 0"),
        (["--instruct_steps", "-3"], "--instruct_steps must be at least 1, got -3"),
        (["--threads", "-1"], r"--threads must be 0 \(PyTorch's default\) or more, got -1"),
        (["--seed", "-1"], r"--seed must be between 0 and 2\*\*32 - 1, got -1"),
        (["--seed", str(2**32)], r"--seed must be between 0 and 2\*\*32 - 1, got 4294967296"),
        (["--instruct_lr", "-0.001"], "--instruct_lr must be a finite number >= 0, got -0.001"),
        (["--align_lr", "inf"], "--align_lr must be a finite number >= 0, got inf"),
        (["--align_lr", "nan"], "--align_lr must be a finite number >= 0, got nan"),
    ],
)
def test_bad_demo_arguments_are_refused_before_anything_runs(capsys, argv, message):
    with pytest.raises(SystemExit) as exit_info:
        demo.parse_args(argv)
    assert exit_info.value.code == 2
    assert re.search(message, capsys.readouterr().err)


def test_demo_arguments_at_the_edges_of_their_ranges_are_taken():
    args = demo.parse_args(["--seed", str(2**32 - 1), "--align_lr", "0", "--instruct_lr", "1e-3"])
    assert (args.seed, args.align_lr, args.instruct_lr) == (2**32 - 1, 0.0, 1e-3)
