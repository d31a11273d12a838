"""`hyperllava-generate` and `pipeline("image-text-to-text")` on a saved tiny HyperLLaVA folder, checked against
`model.generate` called directly."""

import copy
import io
import json
import os
import re
import shutil
import signal
import stat
import struct

import numpy as np
import pytest
import torch
from PIL import Image
from transformers import LlamaConfig, LlavaProcessor, pipeline, set_seed

from conftest import stop_signals_must_be_caught
from transformers_hyperllava import HyperLlavaForConditionalGeneration
from transformers_hyperllava.generate import load_image, main
from transformers_hyperllava.tiny import tiny_config
from transformers_hyperllava.tiny_tokenizer import DEFAULT_TEXTS, tiny_processor, train_tokenizer

MAX_NEW_TOKENS = 6


@pytest.fixture(scope="module")
def saved(tmp_path_factory):
    """A saved model + processor folder, the in-memory pair, and a folder of test images."""
    folder = tmp_path_factory.mktemp("model")
    tokenizer = train_tokenizer(DEFAULT_TEXTS)
    config = tiny_config(vocab_size=len(tokenizer))
    torch.manual_seed(0)
    model = HyperLlavaForConditionalGeneration(config).eval()
    with torch.no_grad():  # non-zero experts, so that the answers depend on them
        for name, param in model.named_parameters():
            if "expert" in name:
                param.normal_(0, 0.2)
    processor = tiny_processor(tokenizer, config)
    model.save_pretrained(folder)
    processor.save_pretrained(folder)

    images = tmp_path_factory.mktemp("images")
    rng = np.random.RandomState(0)
    Image.fromarray(rng.randint(0, 256, (30, 50, 3), dtype=np.uint8)).save(images / "wide.png")
    Image.fromarray(rng.randint(0, 256, (40, 24, 3), dtype=np.uint8)).save(images / "tall.jpg")
    Image.fromarray(rng.randint(0, 256, (32, 32), dtype=np.uint8)).save(images / "gray.png")
    Image.fromarray(rng.randint(0, 256, (20, 36, 4), dtype=np.uint8), mode="RGBA").save(images / "alpha.png")
    (images / "broken.png").write_bytes(b"this is not an image")
    (images / "damaged.png").write_bytes(damaged_png(rng))
    return folder, model, processor, images


def damaged_png(rng):
    """A PNG whose second data chunk has a corrupted type: Pillow opens it, and decoding it raises a SyntaxError."""
    buffer = io.BytesIO()
    Image.fromarray(rng.randint(0, 256, (160, 160, 3), dtype=np.uint8)).save(buffer, "PNG")  # (64 KiB a chunk)
    data = bytearray(buffer.getvalue())
    position, chunks = 8, []
    while position < len(data):
        length, kind = struct.unpack(">I4s", data[position : position + 8])
        if kind == b"IDAT":
            chunks.append(position)
        position += 12 + length
    data[chunks[1] + 4 : chunks[1] + 8] = b"\xd4\xc3\xb4\xb3"
    return bytes(data)


def reference_answer(model, processor, question, image_files, system=None, seed=0, **generate_kwargs):
    """Greedy answer from model.generate, the prompt written out in vicuna_v1 by hand."""
    # LLaVA-1.5 opens every image with Pillow and converts it to RGB.
    images = [Image.open(f).convert("RGB") for f in image_files]
    system = system or (
        "A chat between a curious user and an artificial intelligence assistant. "
        "The assistant gives helpful, detailed, and polite answers to the user's questions."
    )
    placeholders = "<image>\n" * len(images)
    prompt = f"{system} USER: {placeholders}{question} ASSISTANT:"
    inputs = processor(images=images or None, text=prompt, return_tensors="pt")
    if images:  # the pixels in the model's dtype (a bfloat16 model's, say)
        inputs["pixel_values"] = inputs["pixel_values"].to(model.dtype)
    generate_kwargs = {"do_sample": False, **generate_kwargs}
    set_seed(seed)
    with torch.no_grad():
        out = model.generate(
            **inputs, max_new_tokens=MAX_NEW_TOKENS, pad_token_id=processor.tokenizer.pad_token_id, **generate_kwargs
        )
    return processor.decode(out[0, inputs["input_ids"].shape[1] :], skip_special_tokens=True).strip()


def run(argv, capsys):
    code = main([*argv, "--max-new-tokens", str(MAX_NEW_TOKENS), "--device", "cpu"])
    captured = capsys.readouterr()
    return code, captured.out, captured.err


@pytest.mark.parametrize("files", [["wide.png"], ["wide.png", "tall.jpg"], []])
def test_single_question_streams_the_answer(saved, capsys, files):
    folder, model, processor, images = saved
    paths = [images / f for f in files]
    question = "What is in the image?"
    code, out, err = run(
        ["--model", str(folder), "--prompt", question, *[a for p in paths for a in ("--image", str(p))]], capsys
    )
    assert code == 0, err
    expected = reference_answer(model, processor, question, paths)
    assert expected  # a non-empty answer, so the comparison means something
    assert out.strip() == expected


@pytest.mark.parametrize("beams, streamed", [("1", True), ("2", False)])
def test_one_question_streams_its_answer_unless_beam_search(saved, capsys, monkeypatch, beams, streamed):
    """Greedy answers go out through a streamer as they are generated; beam search knows its answer only at the end
    (and Transformers refuses a streamer with it), so it prints the answer whole."""
    from transformers import TextStreamer

    from transformers_hyperllava import generate

    folder, model, processor, images = saved
    texts = []

    class RecordingStreamer(TextStreamer):
        def on_finalized_text(self, text, stream_end=False):
            texts.append(text)
            super().on_finalized_text(text, stream_end)

    monkeypatch.setattr(generate, "TextStreamer", RecordingStreamer)
    question, paths = "What is in the image?", [images / "wide.png"]
    code, out, err = run(
        ["--model", str(folder), "--prompt", question, "--image", str(paths[0]), "--num-beams", beams], capsys
    )
    assert code == 0, err
    assert out.strip() == reference_answer(model, processor, question, paths, num_beams=int(beams))
    assert ("".join(texts).strip() == out.strip()) if streamed else texts == []


def test_answers_are_stripped_like_llavas(saved, monkeypatch):
    """LLaVA-1.5's model_vqa writes `outputs.strip()`: no whitespace the decoder leaves around an answer."""
    from transformers_hyperllava import generate

    folder, model, processor, images = saved
    monkeypatch.setattr(processor, "batch_decode", lambda ids, **kwargs: [" red square \n", "\tblue "])
    prompts = [generate.build_prompt(processor, "What is in the image?", 0)] * 2
    assert generate.generate_answers(model, processor, prompts, [], max_new_tokens=1) == ["red square", "blue"]


def test_system_line_and_placeholders_in_the_prompt(saved, capsys):
    folder, model, processor, images = saved
    paths = [images / "wide.png", images / "tall.jpg"]
    # The prompt places its own placeholders: nothing is added in front.
    code, out, err = run(
        ["--model", str(folder), "--system", "Answer briefly.", "--prompt", "<image>\n<image>\nWhat is in the image?"]
        + ["--image", str(paths[0]), "--image", str(paths[1])],
        capsys,
    )
    assert code == 0, err
    assert out.strip() == reference_answer(model, processor, "What is in the image?", paths, system="Answer briefly.")


@pytest.mark.parametrize(
    "options, seed, generate_kwargs, without",
    [
        (["--num-beams", "3"], 0, {"num_beams": 3}, {"num_beams": 1}),
        (
            ["--temperature", "1.5", "--top-p", "0.5", "--seed", "3"],
            3,
            {"do_sample": True, "temperature": 1.5, "top_p": 0.5},
            {"top_p": 1.0},
        ),
    ],
)
def test_beam_search_and_sampling_options(saved, capsys, options, seed, generate_kwargs, without):
    folder, model, processor, images = saved
    question, paths = "What is in the image?", [images / "wide.png"]
    code, out, err = run(["--model", str(folder), "--prompt", question, "--image", str(paths[0]), *options], capsys)
    assert code == 0, err
    expected = reference_answer(model, processor, question, paths, seed=seed, **generate_kwargs)
    # The option changes the answer here (`without` is its default), so an option left unused would be seen.
    assert expected != reference_answer(model, processor, question, paths, seed=seed, **{**generate_kwargs, **without})
    assert out.strip() == expected


def test_bfloat16_option_generates_in_bfloat16(saved, capsys):
    folder, model, processor, images = saved
    in_bfloat16 = copy.deepcopy(model).to(torch.bfloat16)
    # A question whose answer bfloat16 changes (the random model's answers to most are the same in both dtypes).
    question, paths, expected = next(
        (question, paths, expected)
        for question in ("How many objects are there?", "Describe the picture.", "What is in the image?")
        for paths in ([images / "wide.png"], [images / "tall.jpg"])
        if (expected := reference_answer(in_bfloat16, processor, question, paths))
        != reference_answer(model, processor, question, paths)
    )
    argv = ["--model", str(folder), "--prompt", question, "--image", str(paths[0]), "--dtype", "bfloat16"]
    code, out, err = run(argv, capsys)
    assert code == 0, err
    assert out.strip() == expected


@pytest.mark.parametrize("name", ["gray.png", "alpha.png"])
def test_non_rgb_images_are_converted_like_llava(saved, capsys, name):
    folder, model, processor, images = saved
    code, out, err = run(
        ["--model", str(folder), "--prompt", "Describe the picture.", "--image", str(images / name)], capsys
    )
    assert code == 0, err
    assert out.strip() == reference_answer(model, processor, "Describe the picture.", [images / name])


def test_32_bit_and_float_grayscale_images_are_taken_only_with_8_bit_values(tmp_path):
    """Their range is not fixed by the mode (Pillow's conversion to RGB clips it to 255): a 32-bit image whose values
    pass 255 is refused by name; a float one with 8-bit values reads as those values."""
    values = np.arange(28 * 28, dtype=np.float64).reshape(28, 28) % 256
    Image.fromarray((values * 4).astype(np.int32), mode="I").save(tmp_path / "wide_range.tif")
    with pytest.raises(ValueError, match=r"wide_range\.tif: a 32-bit integer grayscale image \(mode I\) with values "):
        load_image(tmp_path / "wide_range.tif")
    Image.fromarray(values.astype(np.float32), mode="F").save(tmp_path / "eight_bit_range.tif")
    loaded = np.asarray(load_image(tmp_path / "eight_bit_range.tif"))
    np.testing.assert_array_equal(loaded, np.repeat(values.astype(np.uint8)[..., None], 3, axis=-1))


@pytest.mark.parametrize(
    "argv, message",
    [
        (["--image", "{images}/broken.png", "--prompt", "What?"], "Cannot read image file .*broken.png"),
        (["--image", "{images}/damaged.png", "--prompt", "What?"], "Cannot read image file .*damaged.png: broken"),
        (["--image", "{images}/missing.png", "--prompt", "What?"], "Image file not found: .*missing.png"),
        (["--image", "{images}/wide.png", "--prompt", "  "], "The prompt is empty"),
        (
            ["--image", "{images}/wide.png", "--prompt", "<image> <image> What?"],
            "The prompt has 2 <image> placeholder.* but 1 image",
        ),
        (["--image", "{images}/wide.png", "--prompt", "What?", "--system", "Look: <image>"], "--system holds <image>"),
    ],
)
def test_single_question_errors(saved, capsys, argv, message):
    folder, _, _, images = saved
    code, out, err = run(["--model", str(folder), *[a.format(images=images) for a in argv]], capsys)
    assert code == 1 and out == ""
    assert re.search("hyperllava-generate: error: " + message, err), err


def test_a_processor_without_a_chat_template_is_named(saved, capsys, tmp_path):
    """A LLaVA folder whose processor has no chat template (HyperLLaVA's has vicuna_v1's): the prompts cannot be
    written, which is said before the model is loaded."""
    _, model, processor, images = saved
    llava = LlavaProcessor(image_processor=processor.image_processor, tokenizer=processor.tokenizer)
    llava.save_pretrained(tmp_path)
    model.config.to_llava_config().save_pretrained(tmp_path)
    code, out, err = run(["--model", str(tmp_path), "--image", f"{images}/wide.png", "--prompt", "What?"], capsys)
    assert code == 1 and out == ""
    assert f"hyperllava-generate: error: --model {tmp_path}: its processor has no chat template" in err


@pytest.mark.parametrize(
    "argv, message",
    [
        ([], "give either --prompt"),  # neither mode
        (["--model", "{tmp}/typo", "--prompt", "Hi"], "--model .*/typo: not a folder, and not a Hub repo id"),
        (["--model", "{tmp}", "--prompt", "Hi"], "--model .*: a folder without config.json, not a model$"),
        (
            ["--model", "{tmp}/align", "--prompt", "Hi"],
            "--model .*/align: .* stage 1's projector alone; .* --base-model",
        ),
        (["--prompt", "Hi", "--question-file", "q.jsonl", "--answers-file", "a.jsonl"], "give either --prompt"),
        (["--prompt", "Hi", "--device", "bogus"], "--device bogus: .*device type"),
        (["--question-file", "q.jsonl"], "--question-file needs --answers-file"),
        (["--question-file", "does-not-exist.jsonl", "--answers-file", "a.jsonl"], "question file not found"),
        (["--prompt", "Hi", "--max-new-tokens", "0"], "--max-new-tokens must be at least 1"),
        (["--prompt", "Hi", "--dtype", "float8"], "argument --dtype: invalid choice"),
        (["--prompt", "Hi", "--top-p", "1.5"], "--temperature must be >= 0 and --top-p in"),
        (["--prompt", "Hi", "--top-p", "0.5"], "--top-p applies to sampling: give a --temperature above 0"),
        (["--prompt", "Hi", "--temperature", "nan"], "--temperature must be >= 0 and --top-p in"),
        (["--prompt", "Hi", "--seed", "-1"], r"--seed must be in \[0, 2\*\*32\)"),
        (["--prompt", "Hi", "--seed", str(2**32)], r"--seed must be in \[0, 2\*\*32\)"),
        # An argument that is not UTF-8 (Python keeps its bytes as lone surrogates).
        (["--prompt", "Qu\udce9 hay?"], "--prompt is not valid UTF-8 text"),
        # Batch-mode options that --prompt would ignore.
        (["--prompt", "Hi", "--answers-file", "a.jsonl"], "--answers-file goes with --question-file, not --prompt"),
        (["--prompt", "Hi", "--image-folder", "{tmp}"], "--image-folder goes with --question-file"),
        (["--prompt", "Hi", "--batch-size", "2"], "--batch-size goes with --question-file"),
        # Answers files that cannot be written, or that would overwrite the questions.
        (["--question-file", "{tmp}/q.jsonl", "--answers-file", "{tmp}"], "--answers-file .* is a directory"),
        (
            ["--question-file", "{tmp}/q.jsonl", "--answers-file", "{tmp}/q.jsonl/a.jsonl"],
            "--answers-file .*: .*q.jsonl is not a directory",
        ),
        (
            ["--question-file", "{tmp}/q.jsonl", "--answers-file", "{tmp}/q.jsonl/new/a.jsonl"],
            "--answers-file .*: .*q.jsonl is not a directory",
        ),
        (
            ["--question-file", "{tmp}/q.jsonl", "--answers-file", "{tmp}/./q.jsonl"],
            "--answers-file .* is the question",
        ),
    ],
)
def test_bad_arguments_are_refused(saved, capsys, tmp_path, argv, message):
    (tmp_path / "q.jsonl").write_text("")
    (tmp_path / "align").mkdir()
    (tmp_path / "align" / "mm_projector.safetensors").write_text("")  # what `hyperllava-train --stage align` writes
    with pytest.raises(SystemExit) as exit_info:
        main(["--model", str(saved[0]), *[a.format(tmp=tmp_path) for a in argv]])
    assert exit_info.value.code == 2
    err = capsys.readouterr().err
    assert re.search("hyperllava-generate: error: " + message, err), err


@pytest.mark.skipif(torch.cuda.is_available(), reason="needs a machine whose torch sees no CUDA device")
def test_a_cuda_device_without_one_is_refused(saved, capsys):
    with pytest.raises(SystemExit) as exit_info:
        main(["--model", str(saved[0]), "--prompt", "Hi", "--device", "cuda:1"])
    assert exit_info.value.code == 2
    assert (
        "hyperllava-generate: error: --device cuda:1: this machine's torch sees no CUDA device"
        in capsys.readouterr().err
    )


def test_a_hub_id_that_cannot_be_found_is_named(capsys, monkeypatch):
    """A mistyped local path that looks like a Hub id is taken for one; the error names it (offline here)."""
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    code, out, err = run(["--model", "hyperllava-demo/modle", "--prompt", "Hi"], capsys)
    assert code == 1 and out == ""
    assert re.search(r"^hyperllava-generate: error: --model hyperllava-demo/modle: ", err, re.MULTILINE), err
    assert "Traceback" not in err


def write_questions(path, lines):
    path.write_text("".join((line if isinstance(line, str) else json.dumps(line)) + "\n" for line in lines))


def run_batch(model_folder, questions, image_folder, tmp_path, capsys, *options):
    """Batch mode on `questions` (written to tmp_path/questions.jsonl): the exit code, stderr and the answers file."""
    write_questions(tmp_path / "questions.jsonl", questions)
    answers_file = tmp_path / "answers.jsonl"
    code, _, err = run(
        ["--model", str(model_folder), "--question-file", str(tmp_path / "questions.jsonl")]
        + ["--image-folder", str(image_folder), "--answers-file", str(answers_file), *options],
        capsys,
    )
    return code, err, answers_file


# The model given by its path, as `.`, or through a link (whose name the answers carry, as for a Hub cache's snapshot).
@pytest.mark.parametrize("batch_size, given", [(1, "path"), (3, "."), (1, "link")])
def test_batch_mode_answers_like_one_by_one(saved, capsys, tmp_path, monkeypatch, batch_size, given):
    folder, model, processor, images = saved
    monkeypatch.chdir(folder)
    (tmp_path / "linked-model").symlink_to(folder)
    model_arg, model_id = {"path": (folder, folder.name), ".": (".", folder.name)}.get(
        given, (tmp_path / "linked-model", "linked-model")
    )
    questions = [
        {"question_id": "q1", "image": "wide.png", "text": "What is in the image?"},
        {"question_id": 7, "image": "tall.jpg", "text": "Describe the picture in detail."},
        {"question_id": "q3", "image": "gray.png", "text": "How many objects are there?"},
        {"question_id": "q4", "image": "wide.png", "text": "Describe the picture in detail."},
    ]
    write_questions(tmp_path / "questions.jsonl", questions)
    answers_file = tmp_path / "out" / "answers.jsonl"
    code, _, err = run(
        ["--model", str(model_arg), "--question-file", str(tmp_path / "questions.jsonl")]
        + ["--image-folder", str(images), "--answers-file", str(answers_file), "--batch-size", str(batch_size)],
        capsys,
    )
    assert code == 0, err
    assert "questions" in err and "4/4" in err  # the tqdm progress bar
    answers = [json.loads(line) for line in answers_file.read_text().splitlines()]
    assert [a["question_id"] for a in answers] == ["q1", 7, "q3", "q4"]
    for question, answer in zip(questions, answers):
        assert set(answer) == {"question_id", "prompt", "text", "answer_id", "model_id", "metadata"}
        assert answer["prompt"] == question["text"] and answer["model_id"] == model_id
        assert answer["text"] == reference_answer(model, processor, question["text"], [images / question["image"]])
    assert len({a["answer_id"] for a in answers}) == 4
    assert [p.name for p in answers_file.parent.iterdir()] == ["answers.jsonl"]  # no partial file left behind


def test_batch_mode_reports_every_failed_line(saved, capsys, tmp_path):
    folder, model, processor, images = saved
    write_questions(
        tmp_path / "questions.jsonl",
        [
            {"question_id": "ok1", "image": "wide.png", "text": "What is in the image?"},
            {"question_id": "broken", "image": "broken.png", "text": "What is in the image?"},
            {"question_id": "damaged", "image": "damaged.png", "text": "What is in the image?"},
            {"question_id": "missing", "image": "nowhere.png", "text": "What is in the image?"},
            {"question_id": "empty", "image": "wide.png", "text": " "},
            {"question_id": "no-image-key", "text": "What?"},
            "{not json",
            {"image": "wide.png", "text": "no id"},
            "",
            {"question_id": "null-image", "image": None, "text": "What?"},
            {"question_id": "list-image", "image": ["wide.png"], "text": "What?"},
            {"question_id": "number-text", "image": "wide.png", "text": 5},
            "[1, 2]",
            # JSON escapes of half a character (json.dumps writes them as such): no UTF-8 text has them.
            {"question_id": "half\ud83d", "image": "wide.png", "text": "What?"},
            {"question_id": "half-text", "image": "wide.png", "text": "What?\ud83d"},
            "[" * 100_000 + "]" * 100_000,  # deeper than Python's JSON reader, which recurses per level, reads
            {"question_id": "ok2", "image": "tall.jpg", "text": "Describe the picture in detail."},
        ],
    )
    # Saved as Notepad saves UTF-8, with a byte order mark.
    (tmp_path / "questions.jsonl").write_text("\ufeff" + (tmp_path / "questions.jsonl").read_text())
    answers_file = tmp_path / "answers.jsonl"
    code, _, err = run(
        ["--model", str(folder), "--question-file", str(tmp_path / "questions.jsonl"), "--image-folder", str(images)]
        + ["--answers-file", str(answers_file), "--batch-size", "2"],
        capsys,
    )
    assert code == 1
    answers = [json.loads(line) for line in answers_file.read_text().splitlines()]
    assert [a["question_id"] for a in answers] == ["ok1", "ok2"]
    assert answers[1]["text"] == reference_answer(
        model, processor, "Describe the picture in detail.", [images / "tall.jpg"]
    )
    for label, reason in [
        ("'broken'", "Cannot read image file"),
        ("'damaged'", "Cannot read image file .*damaged.png: broken"),
        ("'missing'", "Image file not found"),
        ("'empty'", "The prompt is empty"),
        ("'no-image-key'", "missing key\\(s\\) \\['image'\\]"),
        ("'line 7'", "invalid JSON"),
        ("'line 8'", "missing key 'question_id'"),
        ("'null-image'", "key 'image' must be a string, got null"),
        ("'list-image'", "key 'image' must be a string, got \\[\"wide.png\"\\]"),
        ("'number-text'", "key 'text' must be a string, got 5"),
        ("'line 13'", "expected a JSON object, got \\[1, 2\\]"),
        ("'line 14'", "an unpaired .* escape \\(half a character\\): not text"),
        ("'half-text'", "an unpaired .* escape \\(half a character\\): not text"),
        ("'line 16'", "JSON nested too deeply to read \\(maximum recursion depth"),
    ]:
        assert re.search(f"question {label} failed: {reason}", err), (label, err)
    assert "14 of 16 questions failed" in err


def test_a_batch_whose_generation_fails_reports_each_of_its_questions(saved, capsys, tmp_path, monkeypatch):
    folder, model, _, images = saved

    def out_of_memory(self, **kwargs):
        raise RuntimeError("CUDA out of memory")

    monkeypatch.setattr(type(model), "generate", out_of_memory)
    questions = [{"question_id": f"q{i}", "image": "wide.png", "text": "What is in the image?"} for i in (1, 2, 3)]
    write_questions(tmp_path / "questions.jsonl", questions)
    code, _, err = run(
        ["--model", str(folder), "--question-file", str(tmp_path / "questions.jsonl"), "--image-folder", str(images)]
        + ["--answers-file", str(tmp_path / "answers.jsonl"), "--batch-size", "2"],
        capsys,
    )
    assert code == 1
    for question_id in ("q1", "q2", "q3"):
        assert f"question '{question_id}' failed: CUDA out of memory" in err
    assert "3 of 3 questions failed" in err


def test_batch_mode_replaces_the_answers_file_only_at_the_end(saved, capsys, tmp_path, monkeypatch):
    folder, _, _, images = saved
    write_questions(tmp_path / "questions.jsonl", [{"question_id": "q1", "image": "wide.png", "text": "What?"}])
    answers_file = tmp_path / "answers.jsonl"
    answers_file.write_text("old answers\n")
    # The partial file of another run writing the same answers file (under the name partial files once had).
    other_partial = tmp_path / ".answers.jsonl.partial"
    other_partial.write_text("another run's answers\n")
    files = sorted(p.name for p in tmp_path.iterdir())
    # --image-folder and --batch-size left out: the images are looked up in the current folder, one at a time.
    monkeypatch.chdir(images)
    argv = ["--model", str(folder), "--question-file", str(tmp_path / "questions.jsonl")]
    argv += ["--answers-file", str(answers_file)]

    def interrupted(*args, **kwargs):
        raise KeyboardInterrupt

    with monkeypatch.context() as patch:
        patch.setattr("transformers_hyperllava.generate.generate_answers", interrupted)
        with pytest.raises(KeyboardInterrupt):
            run(argv, capsys)
    assert answers_file.read_text() == "old answers\n"
    assert other_partial.read_text() == "another run's answers\n"
    assert sorted(p.name for p in tmp_path.iterdir()) == files  # nothing left behind

    # The permissions are those open(..., "w") leaves: an existing file's own, a new one's by the umask.
    answers_file.chmod(0o600)
    umask = os.umask(0o002)
    try:
        code, _, err = run(argv, capsys)
        assert code == 0, err
        assert [json.loads(line)["question_id"] for line in answers_file.read_text().splitlines()] == ["q1"]
        assert stat.S_IMODE(answers_file.stat().st_mode) == 0o600
        answers_file.unlink()
        assert run(argv, capsys)[0] == 0
        assert stat.S_IMODE(answers_file.stat().st_mode) == 0o664
    finally:
        os.umask(umask)
    assert other_partial.read_text() == "another run's answers\n"
    assert sorted(p.name for p in tmp_path.iterdir()) == files


@pytest.mark.parametrize("stop", [signal.SIGTERM, signal.SIGHUP], ids=["sigterm", "sighup"])
def test_a_time_limit_or_a_closed_terminal_leaves_what_ctrl_c_leaves(saved, capsys, tmp_path, monkeypatch, stop):
    """SIGTERM (a job's time limit) and SIGHUP mid-run: the previous answers file is kept, and neither the partial
    file nor the folders made for a new one are left."""
    folder, _, _, images = saved
    write_questions(tmp_path / "questions.jsonl", [{"question_id": "q1", "image": "wide.png", "text": "What?"}])
    (tmp_path / "out").mkdir()
    (tmp_path / "out" / "answers.jsonl").write_text("old answers\n")

    def stopped(*args, **kwargs):
        os.kill(os.getpid(), stop)

    monkeypatch.setattr("transformers_hyperllava.generate.generate_answers", stopped)
    with stop_signals_must_be_caught("hyperllava-generate"):
        for answers_file in (tmp_path / "out" / "answers.jsonl", tmp_path / "new" / "sub" / "answers.jsonl"):
            argv = ["--model", str(folder), "--question-file", str(tmp_path / "questions.jsonl")]
            with pytest.raises(KeyboardInterrupt):
                run([*argv, "--image-folder", str(images), "--answers-file", str(answers_file)], capsys)
    assert [p.name for p in (tmp_path / "out").iterdir()] == ["answers.jsonl"]
    assert (tmp_path / "out" / "answers.jsonl").read_text() == "old answers\n"
    assert not (tmp_path / "new").exists()


def test_an_answers_file_behind_a_link_or_a_pipe_is_written_through_it(saved, capsys, tmp_path):
    """As `open(..., "w")` writes: through a link (which stays a link), and into a pipe (/dev/stdout, say), which
    cannot be replaced."""
    folder, _, _, images = saved
    write_questions(tmp_path / "questions.jsonl", [{"question_id": "q1", "image": "wide.png", "text": "What?"}])
    argv = [
        "--model",
        str(folder),
        "--question-file",
        str(tmp_path / "questions.jsonl"),
        "--image-folder",
        str(images),
    ]
    (tmp_path / "runs").mkdir()
    target = tmp_path / "runs" / "answers.jsonl"
    target.write_text("old answers\n")
    link = tmp_path / "latest.jsonl"
    link.symlink_to(target)
    assert run([*argv, "--answers-file", str(link)], capsys)[0] == 0
    assert link.is_symlink() and json.loads(target.read_text())["question_id"] == "q1"
    assert sorted(p.name for p in tmp_path.rglob("*")) == ["answers.jsonl", "latest.jsonl", "questions.jsonl", "runs"]

    pipe = tmp_path / "pipe"
    os.mkfifo(pipe)
    reader = os.open(pipe, os.O_RDONLY | os.O_NONBLOCK)  # (open at once: the answers wait in the pipe's buffer)
    try:
        assert run([*argv, "--answers-file", str(pipe)], capsys)[0] == 0
        assert stat.S_ISFIFO(pipe.stat().st_mode)
        assert json.loads(os.read(reader, 1 << 16))["question_id"] == "q1"
    finally:
        os.close(reader)


def test_an_image_up_to_twice_the_pixel_limit_is_refused_before_it_is_decoded(saved, capsys, monkeypatch):
    """Pillow only warns below twice its limit: wide.png (50 x 30 = 1500 px) over a limit of 1000 is refused all the
    same, naming the file and the limit; tall.jpg (24 x 40 = 960 px) at a limit of 960 is read."""
    folder, _, _, images = saved
    monkeypatch.setattr(Image, "MAX_IMAGE_PIXELS", 1000)
    monkeypatch.setattr(Image.Image, "load", lambda image: pytest.fail("decoded"))
    message = r"Cannot read image file .*wide\.png: 50x30 = 1500 pixels, over Pillow's pixel limit .*= 1000\)"
    with pytest.raises(ValueError, match=message):
        load_image(images / "wide.png")
    monkeypatch.undo()
    monkeypatch.setattr(Image, "MAX_IMAGE_PIXELS", 960)
    assert load_image(images / "tall.jpg").size == (24, 40)
    code, out, err = run(["--model", str(folder), "--image", str(images / "wide.png"), "--prompt", "What?"], capsys)
    assert code == 1 and out == "" and "wide.png: 50x30 = 1500 pixels, over Pillow's pixel limit" in err


def test_an_image_over_pillows_pixel_limit_is_reported_and_the_others_answered(saved, capsys, tmp_path, monkeypatch):
    """Pillow refuses an image over twice its pixel limit (a possible decompression bomb) with an error that is not an
    OSError; lowered here so that wide.png (1500 px) is one and alpha.png (720 px) is not."""
    folder, model, processor, images = saved
    monkeypatch.setattr(Image, "MAX_IMAGE_PIXELS", 720)
    code, out, err = run(["--model", str(folder), "--image", str(images / "wide.png"), "--prompt", "What?"], capsys)
    assert code == 1 and out == ""
    assert re.search(r"hyperllava-generate: error: Cannot read image file .*wide\.png: .*exceeds limit", err), err

    questions = [
        {"question_id": "bomb", "image": "wide.png", "text": "What?"},
        {"question_id": "fine", "image": "alpha.png", "text": "What?"},
    ]
    code, err, answers_file = run_batch(folder, questions, images, tmp_path, capsys)
    assert code == 1 and "question 'bomb' failed: Cannot read image file" in err
    assert [json.loads(line)["question_id"] for line in answers_file.read_text().splitlines()] == ["fine"]


def test_a_run_that_answers_nothing_keeps_the_previous_answers(saved, capsys, tmp_path):
    folder, _, _, images = saved
    (tmp_path / "answers.jsonl").write_text("old answers\n")
    (tmp_path / "questions.jsonl").write_text("")
    files = sorted(p.name for p in tmp_path.iterdir())
    questions = [{"question_id": "q1", "image": "wide.png", "text": "What?"}]
    code, err, answers_file = run_batch(folder, questions, tmp_path / "typo", tmp_path, capsys)
    assert code == 1 and f"no question was answered: {answers_file} is left as it was" in err
    assert answers_file.read_text() == "old answers\n"
    assert sorted(p.name for p in tmp_path.iterdir()) == files  # no partial file left behind


def test_a_run_that_answers_nothing_leaves_no_folder_it_made_for_the_answers(saved, capsys, tmp_path, monkeypatch):
    """The answers file's missing folders are made for it; a run that writes no answers file (every question failed,
    or Ctrl-C) takes them away again, but not a folder that was there before (also one a `..` in the path steps
    into), nor one that something else wrote to."""
    folder, _, _, images = saved
    write_questions(tmp_path / "questions.jsonl", [{"question_id": "q1", "image": "wide.png", "text": "What?"}])
    (tmp_path / "there" / "empty").mkdir(parents=True)
    argv = ["--model", str(folder), "--question-file", str(tmp_path / "questions.jsonl")]
    for answers_file in (
        tmp_path / "there" / "new" / "deeper" / "answers.jsonl",
        tmp_path / "there" / "new" / ".." / "empty" / "answers.jsonl",
    ):
        code, _, err = run(
            [*argv, "--image-folder", str(tmp_path / "typo"), "--answers-file", str(answers_file)], capsys
        )
        assert code == 1 and "no question was answered" in err
        assert [p.name for p in (tmp_path / "there").iterdir()] == ["empty"]
    answers_file = tmp_path / "there" / "new" / "deeper" / "answers.jsonl"

    def interrupted(*args, **kwargs):
        (tmp_path / "there" / "new" / "another run's file").write_text("")
        raise KeyboardInterrupt

    monkeypatch.setattr("transformers_hyperllava.generate.generate_answers", interrupted)
    with pytest.raises(KeyboardInterrupt):
        run([*argv, "--image-folder", str(images), "--answers-file", str(answers_file)], capsys)
    assert sorted(p.name for p in (tmp_path / "there").rglob("*")) == ["another run's file", "empty", "new"]


def test_batch_mode_refuses_a_question_file_that_is_not_text(saved, capsys, tmp_path, monkeypatch):
    folder, _, _, images = saved
    monkeypatch.setattr("transformers_hyperllava.generate.load_model", lambda args: pytest.fail("the model loaded"))
    answers_file = tmp_path / "answers.jsonl"
    code, out, err = run(
        ["--model", str(folder), "--question-file", str(images / "wide.png"), "--answers-file", str(answers_file)],
        capsys,
    )
    assert code == 1 and out == ""
    assert re.search("error: question file .*wide.png is not UTF-8 text: 'utf-8' codec can't decode", err), err
    assert not answers_file.exists()


def test_a_question_file_without_questions_is_refused_and_the_answers_kept(saved, capsys, tmp_path, monkeypatch):
    """Answered, it would replace the previous answers with none."""
    folder = saved[0]
    monkeypatch.setattr("transformers_hyperllava.generate.load_model", lambda args: pytest.fail("the model loaded"))
    (tmp_path / "questions.jsonl").write_text("\n  \n")
    (tmp_path / "answers.jsonl").write_text("old answers\n")
    code, out, err = run(
        ["--model", str(folder), "--question-file", str(tmp_path / "questions.jsonl")]
        + ["--answers-file", str(tmp_path / "answers.jsonl")],
        capsys,
    )
    assert code == 1 and out == ""
    assert re.search("error: question file .*questions.jsonl holds no question", err), err
    assert (tmp_path / "answers.jsonl").read_text() == "old answers\n"


def test_a_folder_that_holds_no_image_text_model_is_named(saved, capsys, tmp_path):
    """A processor beside no weights, and a text model's folder (a tokenizer, no image processor): a message naming
    the folder, not a traceback."""
    folder, _, processor, images = saved
    no_weights = tmp_path / "no-weights"
    shutil.copytree(folder, no_weights, ignore=shutil.ignore_patterns("*.safetensors*"))
    text_model = tmp_path / "text-model"
    tokenizer = train_tokenizer(DEFAULT_TEXTS)
    tokenizer.chat_template = processor.chat_template  # (without one, AutoProcessor refuses the folder itself)
    tokenizer.save_pretrained(text_model)
    LlamaConfig(vocab_size=len(tokenizer)).save_pretrained(text_model)
    for model_folder, message in [(no_weights, "no file named model.safetensors"), (text_model, "no image processor")]:
        code, out, err = run(
            ["--model", str(model_folder), "--image", f"{images}/wide.png", "--prompt", "What?"], capsys
        )
        assert code == 1 and out == "" and "Traceback" not in err
        assert re.search(f"^hyperllava-generate: error: --model {model_folder}: .*{message}", err, re.MULTILINE), err


def test_pipeline_on_a_saved_folder(saved):
    folder, model, processor, images = saved
    pipe = pipeline("image-text-to-text", model=str(folder), device="cpu")
    image = Image.open(images / "wide.png").convert("RGB")
    messages = [
        {
            "role": "user",
            "content": [{"type": "image", "image": image}, {"type": "text", "text": "What is in the image?"}],
        }
    ]
    result = pipe(text=messages, max_new_tokens=MAX_NEW_TOKENS, generate_kwargs={"do_sample": False})
    answer = result[0]["generated_text"][-1]
    assert answer["role"] == "assistant"
    assert answer["content"].strip() == reference_answer(
        model, processor, "What is in the image?", [images / "wide.png"]
    )


def test_batch_mode_pads_left_even_if_the_saved_tokenizer_pads_right(saved, capsys, tmp_path):
    folder, model, processor, images = saved
    right = tmp_path / folder.name
    shutil.copytree(folder, right)
    tokenizer_config = json.loads((right / "tokenizer_config.json").read_text())
    (right / "tokenizer_config.json").write_text(json.dumps({**tokenizer_config, "padding_side": "right"}))
    questions = [
        {"question_id": "short", "image": "wide.png", "text": "What?"},
        {"question_id": "long", "image": "tall.jpg", "text": "Describe the picture in detail."},
    ]
    code, err, answers_file = run_batch(right, questions, images, tmp_path, capsys, "--batch-size", "2")
    assert code == 0, err
    for question, line in zip(questions, answers_file.read_text().splitlines()):
        expected = reference_answer(model, processor, question["text"], [images / question["image"]])
        assert json.loads(line)["text"] == expected
