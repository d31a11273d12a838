"""The LLaVA-JSON dataset and collator: labels against a hand-written vicuna_v1 rendering, truncation, bad input."""

import json
import logging
import re

import numpy as np
import pytest
import torch
from PIL import Image

from transformers_hyperllava.data import IGNORE_INDEX, LlavaDataCollator, LlavaJsonDataset, to_messages
from transformers_hyperllava.tiny import tiny_config
from transformers_hyperllava.tiny_tokenizer import tiny_processor, train_tokenizer

SYSTEM = (
    "A chat between a curious user and an artificial intelligence assistant. "
    "The assistant gives helpful, detailed, and polite answers to the user's questions."
)
TOKENS_PER_IMAGE = 4  # tiny_config: 28 px images in 14 px patches
WORDS = [
    "what",
    "colour",
    "is",
    "the",
    "square",
    "red",
    "blue",
    "how",
    "many",
    "shapes",
    "are",
    "there",
    "two",
    "a",
    "green",
    "circle",
    "tell",
    "me",
    "joke",
    "no",
]


@pytest.fixture(scope="module")
def processor():
    tokenizer = train_tokenizer([" ".join(WORDS) + " ? ."])
    return tiny_processor(tokenizer, tiny_config(vocab_size=len(tokenizer)))


@pytest.fixture
def image_folder(tmp_path):
    folder = tmp_path / "images"
    folder.mkdir()
    rng = np.random.default_rng(0)
    for name in ("a.png", "b.png"):
        Image.fromarray(rng.integers(0, 255, (28, 28, 3), dtype=np.uint8)).save(folder / name)
    return folder


def write_json(path, samples):
    path.write_text(json.dumps(samples))
    return path


def reference(processor, turns, num_images):
    """vicuna_v1 written out by hand: the system line, "USER: <image>\\n{q} ASSISTANT: {a}</s>" per turn, the
    images first in the first question; labels are the answer tokens and their </s>, everything else -100."""
    tokenizer = processor.tokenizer

    def words(text):
        return tokenizer(text, add_special_tokens=False)["input_ids"]

    ids, labels = [tokenizer.bos_token_id], [IGNORE_INDEX]
    prompt = words(SYSTEM + " USER:")
    for index, (question, answer) in enumerate(turns):
        if index:
            prompt = words("USER:")
        if index == 0:
            prompt += [processor.image_token_id] * (TOKENS_PER_IMAGE * num_images)
        prompt += words(question + " ASSISTANT:")
        target = words(answer) + [tokenizer.eos_token_id]
        ids += prompt + target
        labels += [IGNORE_INDEX] * len(prompt) + target
    return ids, labels


def conversation(turns, image_tag=True):
    out = []
    for index, (q, a) in enumerate(turns):
        out += [
            {"from": "human", "value": f"<image>\n{q}" if index == 0 and image_tag else q},
            {"from": "gpt", "value": a},
        ]
    return out


SINGLE = [("what colour is the square ?", "red")]
MULTI = [("what colour is the square ?", "red"), ("how many shapes are there ?", "two"), ("tell me a joke", "no .")]
GOOD = {"id": "good", "image": "a.png", "conversations": conversation(SINGLE)}
DEEP = "[" * 100_000 + "]" * 100_000  # nested deeper than Python's JSON reader, which recurses per level, reads


@pytest.mark.parametrize("turns", [SINGLE, MULTI], ids=["single-turn", "multi-turn"])
def test_labels_match_handwritten_vicuna_v1(processor, image_folder, tmp_path, turns):
    data = write_json(tmp_path / "d.json", [{"id": "s", "image": "a.png", "conversations": conversation(turns)}])
    item = LlavaJsonDataset(data, processor, image_folder)[0]
    ids, labels = reference(processor, turns, num_images=1)
    assert item["input_ids"].tolist() == ids
    assert item["labels"].tolist() == labels
    # The supervised tokens spell exactly the answers, each closed by </s>.
    supervised = processor.tokenizer.decode(item["labels"][item["labels"] != IGNORE_INDEX])
    assert supervised.split() == " </s> ".join(a for _, a in turns).split() + ["</s>"]
    expected_pixels = processor.image_processor(Image.open(image_folder / "a.png"), return_tensors="pt")[
        "pixel_values"
    ]
    torch.testing.assert_close(item["pixel_values"], expected_pixels)


def test_text_only_and_two_image_samples(processor, image_folder, tmp_path):
    samples = [
        {"id": "text", "conversations": conversation(MULTI[:2], image_tag=False)},
        {
            "id": "two",
            "image": ["a.png", "b.png"],
            "conversations": [
                {"from": "human", "value": "<image>\n<image>\nwhat colour is the square ?"},
                {"from": "gpt", "value": "blue"},
            ],
        },
    ]
    dataset = LlavaJsonDataset(write_json(tmp_path / "d.json", samples), processor, image_folder)
    text = dataset[0]
    assert "pixel_values" not in text
    ids, labels = reference(processor, MULTI[:2], num_images=0)
    assert text["input_ids"].tolist() == ids and text["labels"].tolist() == labels
    two = dataset[1]
    ids, labels = reference(processor, [("what colour is the square ?", "blue")], num_images=2)
    assert two["input_ids"].tolist() == ids and two["labels"].tolist() == labels
    assert two["pixel_values"].shape == (2, 3, 28, 28)


def llava_v1_prompt(conversations):
    """LLaVA-1.5's training prompt, written out from its code: `preprocess_multimodal` (llava/train/train.py) moves
    the tag of a turn that has one to the front, `"<image>\\n" + text without the tag, stripped`, then strips again;
    `conv_vicuna_v1.get_prompt()` (llava/conversation.py) joins "ROLE: message" with " " after a question and "</s>"
    after an answer, messages otherwise as they are."""
    prompt = SYSTEM + " "
    for index, turn in enumerate(conversations):
        value = turn["value"]
        if "<image>" in value:
            value = ("<image>\n" + value.replace("<image>", "").strip()).strip()
        prompt += f"USER: {value} " if index % 2 == 0 else f"ASSISTANT: {value}</s>"
    return prompt


@pytest.mark.parametrize(
    "first",
    ["<image>\nwhat is\nthis ?", "what is\nthis ?\n<image>", "what is\n<image>\nthis ?", " what <image> is ? "],
)
def test_conversations_render_as_llavas_training_prompt(processor, first):
    """Tags anywhere in a question; an answer and a later question with spaces around them, which LLaVA keeps."""
    conversations = [
        {"from": "human", "value": first},
        {"from": "gpt", "value": " a red square \n"},
        {"from": "human", "value": "  how many ?"},
        {"from": "gpt", "value": "two"},
    ]
    sample = {"id": "s", "image": "a.png", "conversations": conversations}
    assert processor.apply_chat_template(to_messages(sample)) == llava_v1_prompt(conversations)


@pytest.mark.parametrize("mode", ["RGBA", "P", "LA"])
def test_images_are_converted_to_rgb_as_llava_does(processor, tmp_path, mode):
    """LLaVA-1.5 reads `Image.open(path).convert("RGB")`: an RGBA image's transparent pixels keep their colour (the
    processor's own conversion would put them on white)."""
    rng = np.random.RandomState(0)
    rgba = rng.randint(0, 256, (30, 50, 4), dtype=np.uint8)
    rgba[..., 3] = np.where(rng.rand(30, 50) < 0.5, 0, 255)
    image = Image.fromarray(rgba, mode="RGBA")
    {"RGBA": image, "P": image.convert("RGB").convert("P"), "LA": image.convert("LA")}[mode].save(tmp_path / "x.png")
    sample = {"id": "s", "image": "x.png", "conversations": conversation([("what is it ?", "a square")])}
    item = LlavaJsonDataset(write_json(tmp_path / "d.json", [sample]), processor, tmp_path)[0]
    with Image.open(tmp_path / "x.png") as opened:
        expected = processor.image_processor(opened.convert("RGB"), return_tensors="pt")["pixel_values"]
    torch.testing.assert_close(item["pixel_values"], expected)


def test_collator_pads_right_and_keeps_image_order(processor, image_folder, tmp_path):
    samples = [
        {"id": "long", "image": "a.png", "conversations": conversation(MULTI)},
        {"id": "text", "conversations": conversation(SINGLE, image_tag=False)},
        {"id": "short", "image": "b.png", "conversations": conversation(SINGLE)},
    ]
    dataset = LlavaJsonDataset(write_json(tmp_path / "d.json", samples), processor, image_folder)
    items = [dataset[i] for i in range(3)]
    batch = LlavaDataCollator(pad_token_id=processor.tokenizer.pad_token_id)(items)
    lengths = [len(item["input_ids"]) for item in items]
    assert batch["input_ids"].shape == (3, max(lengths))
    for row, (item, n) in enumerate(zip(items, lengths)):
        assert batch["input_ids"][row, :n].tolist() == item["input_ids"].tolist()
        assert (batch["input_ids"][row, n:] == processor.tokenizer.pad_token_id).all()
        assert batch["attention_mask"][row].tolist() == [1] * n + [0] * (max(lengths) - n)
        assert batch["labels"][row].tolist() == item["labels"].tolist() + [IGNORE_INDEX] * (max(lengths) - n)
        prompt = (
            item["labels"].tolist().index(next(label for label in item["labels"].tolist() if label != IGNORE_INDEX))
        )
        assert batch["language_guidance_mask"][row].tolist() == [True] * prompt + [False] * (max(lengths) - prompt)
    # The model fills image tokens in batch order: sample 0's image, then sample 2's (sample 1 has none).
    torch.testing.assert_close(batch["pixel_values"], torch.cat([items[0]["pixel_values"], items[2]["pixel_values"]]))


def test_a_tokenizer_without_a_pad_token_is_named_before_the_first_batch():
    tokenizer = train_tokenizer(["a b c"])
    tokenizer.pad_token = None  # as a Vicuna tokenizer comes
    with pytest.raises(ValueError, match="the tokenizer has no pad token"):
        LlavaDataCollator(pad_token_id=tokenizer.pad_token_id)


def test_truncation_inside_image_tokens_drops_and_counts(processor, image_folder, tmp_path, caplog):
    samples = [{"id": "s", "image": "a.png", "conversations": conversation(MULTI)}]
    data = write_json(tmp_path / "d.json", samples)
    full = LlavaJsonDataset(data, processor, image_folder)[0]
    image_end = int((full["input_ids"] == processor.image_token_id).nonzero().max()) + 1
    first_answer = int((full["labels"] != IGNORE_INDEX).nonzero().min())

    # A cut after the first answer keeps the sample, truncated.
    kept = LlavaJsonDataset(data, processor, image_folder, max_length=first_answer + 2)
    item = kept[0]
    assert item["input_ids"].tolist() == full["input_ids"][: first_answer + 2].tolist()
    assert item["labels"].tolist() == full["labels"][: first_answer + 2].tolist()
    assert kept.num_dropped == 0
    # A cut inside the image tokens, or one that leaves no answer, drops the sample and counts it (here the only one:
    # nothing can take its place). The warning names the sample, its length, the limit and what the cut would have
    # removed.
    for max_length, reason in ((image_end - 1, "image tokens"), (first_answer, "every answer")):
        dropped = LlavaJsonDataset(data, processor, image_folder, max_length=max_length)
        caplog.clear()
        with caplog.at_level(logging.WARNING, logger="transformers_hyperllava.data"):
            for _ in range(2):  # read again (the next epoch): counted and logged once
                with pytest.raises(
                    ValueError, match=rf"every sample was dropped \(max_length={max_length}; see the warnings\)"
                ):
                    dropped[0]
                assert dropped.num_dropped == 1
        assert [r.getMessage() for r in caplog.records] == [
            f"Dropped sample 's': {len(full['input_ids'])} tokens do not fit max_length={max_length} without cutting "
            f"{reason} (1 dropped so far)"
        ]
    # A negative max_length would cut every sample from its end, 0 would drop them all: refused up front.
    for max_length in (0, -1):
        with pytest.raises(ValueError, match=f"max_length must be at least 1 token, got {max_length}$"):
            LlavaJsonDataset(data, processor, image_folder, max_length=max_length)


def test_a_sample_that_supervises_no_token_is_dropped(processor, image_folder, tmp_path, monkeypatch, caplog):
    """Trained, it would add nothing but its place in the batch. (Transformers 5.17 gives an empty assistant mask to an
    answer that starts with a character no token covers; here the mask is emptied by hand.)"""
    samples = [{"id": "empty", "image": "b.png", "conversations": conversation(MULTI[1:2])}, GOOD]
    dataset = LlavaJsonDataset(write_json(tmp_path / "d.json", samples), processor, image_folder)
    expected = dataset[1]
    render = processor.apply_chat_template

    def without_answers_for_the_first(messages, **kwargs):
        out = render(messages, **kwargs)
        if messages[1]["content"][0]["text"] == MULTI[1][1]:
            out["assistant_masks"] = [[0] * len(out["input_ids"][0])]
        return out

    monkeypatch.setattr(processor, "apply_chat_template", without_answers_for_the_first)
    with caplog.at_level(logging.WARNING, logger="transformers_hyperllava.data"):
        item = dataset[0]
    assert dataset.num_dropped == 1 and torch.equal(item["input_ids"], expected["input_ids"])
    assert [r.getMessage() for r in caplog.records] == [
        "Dropped sample 'empty': none of its tokens is an answer's (the tokenizer's assistant mask is empty) "
        "(1 dropped so far)"
    ]


def test_a_dropped_sample_gives_its_place_to_another_that_fits(processor, image_folder, tmp_path):
    """So that no batch comes out empty: with one sample per batch, an empty one would stop the run. The replacement
    is drawn at random, the same in every epoch, so that a run of over-long samples does not give all its places to
    one sample, and a sample known to be dropped is not read again."""
    long = {"id": "long", "image": "a.png", "conversations": conversation([("what " * 40 + "is it ?", "red")])}
    fitting = [
        {"id": "a", "image": "a.png", "conversations": conversation(SINGLE)},
        {"id": "b", "image": "b.png", "conversations": conversation(MULTI[1:2])},
        {"id": "c", "image": "a.png", "conversations": conversation(MULTI[2:3])},
    ]
    alone = [
        LlavaJsonDataset(write_json(tmp_path / f"{s['id']}.json", [s]), processor, image_folder)[0] for s in fitting
    ]
    max_length = max(len(item["input_ids"]) for item in alone)
    full_long = LlavaJsonDataset(write_json(tmp_path / "long.json", [long]), processor, image_folder)[0]
    assert int((full_long["labels"] != IGNORE_INDEX).nonzero().min()) >= max_length  # (the test's premise)

    def which(item):  # the fitting sample an item is
        matches = [i for i, a in enumerate(alone) if all(torch.equal(item[k], a[k]) for k in a)]
        assert len(matches) == 1 and item.keys() == alone[matches[0]].keys()
        return matches[0]

    samples = [long] * 8 + fitting  # (LLaVA's mix keeps its long conversations together too)
    dataset = LlavaJsonDataset(
        write_json(tmp_path / "d.json", samples), processor, image_folder, max_length=max_length
    )
    first = [which(dataset[i]) for i in range(len(dataset))]
    assert first[8:] == [0, 1, 2] and dataset.num_dropped == 8
    assert len(set(first[:8])) > 1  # spread over the fitting samples
    reads = []
    read = dataset._read
    dataset._read = lambda index: reads.append(index) or read(index)
    assert [which(item) for item in dataset] == first  # the next epoch: the same places; iteration ends at the end
    assert all(index >= 8 for index in reads)  # the dropped samples were not read again
    assert which(dataset[-1]) == 2
    with pytest.raises(IndexError):
        dataset[len(dataset)]


def test_the_record_of_dropped_samples_is_shared_with_the_dataloaders_workers(processor, image_folder, tmp_path):
    """Workers read the samples in processes of their own, new ones every epoch: what they drop counts in the main
    process (the run's summary) and is known to the next epoch's workers, which do not read it (nor log it) again."""
    long = {"id": "long", "image": "a.png", "conversations": conversation([("what " * 40 + "is it ?", "red")])}
    fitting = {"id": "a", "image": "a.png", "conversations": conversation(SINGLE)}
    max_length = len(
        LlavaJsonDataset(write_json(tmp_path / "a.json", [fitting]), processor, image_folder)[0]["input_ids"]
    )
    samples = [long, fitting, long, fitting]
    dataset = LlavaJsonDataset(
        write_json(tmp_path / "d.json", samples), processor, image_folder, max_length=max_length
    )
    loader = torch.utils.data.DataLoader(
        dataset, batch_size=2, num_workers=2, collate_fn=LlavaDataCollator(processor.tokenizer.pad_token_id)
    )
    epochs = [[batch["input_ids"] for batch in loader] for _ in range(2)]
    assert dataset.num_dropped == 2 and dataset.dropped.tolist() == [True, False, True, False]
    assert all(torch.equal(a, b) for a, b in zip(*epochs))  # the same replacements in both epochs


@pytest.mark.parametrize(
    "sample, message",
    [
        pytest.param(sample, message, id=sample["id"])
        for sample, message in [
            (
                {
                    "id": "bad-role",
                    "image": "a.png",
                    "conversations": [{"from": "gpt", "value": "<image>\nhi"}, {"from": "human", "value": "red"}],
                },
                r"turn 0 must be \{'from': 'human', 'value': <text>\} \(turns alternate human, gpt\), got from='gpt'",
            ),
            (
                {"id": "bad-end", "conversations": [{"from": "human", "value": "hi"}]},
                r"the last turn must be an answer \(from 'gpt'\), got 'human'",
            ),
            (
                {"id": "no-tag", "image": "a.png", "conversations": conversation(SINGLE, image_tag=False)},
                "0 <image> tag",
            ),
            (
                {
                    "id": "two-tags",
                    "image": "a.png",
                    "conversations": [
                        {"from": "human", "value": "<image>\n<image>\nq"},
                        {"from": "gpt", "value": "a"},
                    ],
                },
                "2 <image> tag",
            ),
            ({"id": "missing", "image": "nope.png", "conversations": conversation(SINGLE)}, "nope.png"),
            ({"id": "no-turns", "conversations": []}, "'conversations' must be a non-empty list of turns"),
            (
                {
                    "id": "gpt-tag",
                    "image": ["a.png", "b.png"],
                    "conversations": [
                        {"from": "human", "value": "<image>\nq"},
                        {"from": "gpt", "value": "<image>\na"},
                    ],
                },
                r"turn 1 \(gpt\) contains <image>",
            ),
            # x.png exists (the test writes random bytes to it) but is no image: found when the sample is read.
            (
                {"id": "corrupt", "image": "x.png", "conversations": conversation(SINGLE)},
                r"Cannot read image file .*x\.png: ",
            ),
            (
                {
                    "id": "null-answer",
                    "conversations": [{"from": "human", "value": "q"}, {"from": "gpt", "value": None}],
                },
                r"turn 1 \(gpt\): 'value' must be a string, got None",
            ),
            (
                {
                    "id": "blank-answer",
                    "conversations": [{"from": "human", "value": "q"}, {"from": "gpt", "value": " "}],
                },
                r"turn 1 \(gpt\) is an empty answer",
            ),
            (
                {"id": "chat-format", "conversations": [{"role": "user", "content": "q"}]},
                r"got from=None \(LLaVA's format: 'from' and 'value', not 'role' and 'content'\)",
            ),
            (
                {"id": "folder-image", "image": "", "conversations": conversation(SINGLE)},
                r"image '' \(.*images\) names a folder, not an image file",
            ),
            (
                {"id": "int-image", "image": 5, "conversations": conversation(SINGLE)},
                "'image' must be a file name or a list of file names, got 5",
            ),
            (
                {"id": "int-in-images", "image": [5], "conversations": conversation(SINGLE)},
                r"'image' must be .*, got \[5\]",
            ),
        ]
    ],
)
def test_bad_samples_name_the_sample(processor, image_folder, tmp_path, sample, message):
    (image_folder / "x.png").write_bytes(np.random.default_rng(0).bytes(256))
    data = write_json(tmp_path / "d.json", [GOOD, sample])
    with pytest.raises((ValueError, FileNotFoundError), match=message) as error:
        LlavaJsonDataset(data, processor, image_folder)[1]
    assert repr(sample["id"]) in str(error.value)


def test_an_image_over_pillows_pixel_limit_names_the_sample(processor, image_folder, tmp_path, monkeypatch):
    """Pillow refuses an image over twice its pixel limit (a possible decompression bomb) with an error that is not an
    OSError; the limit is lowered here so that the 28 x 28 test image is one."""
    monkeypatch.setattr(Image, "MAX_IMAGE_PIXELS", 300)
    data = write_json(tmp_path / "d.json", [GOOD])
    with pytest.raises(ValueError, match=r"sample 'good': Cannot read image file .*a\.png: .*exceeds limit"):
        LlavaJsonDataset(data, processor, image_folder)[0]


def test_an_image_up_to_twice_the_pixel_limit_names_the_sample(processor, image_folder, tmp_path, monkeypatch):
    """Pillow only warns below twice its limit: the 28 x 28 test image (784 px) over a limit of 500 is refused."""
    monkeypatch.setattr(Image, "MAX_IMAGE_PIXELS", 500)
    data = write_json(tmp_path / "d.json", [GOOD])
    with pytest.raises(ValueError, match=r"sample 'good': Cannot read image file .*a\.png: 28x28 = 784 pixels, over"):
        LlavaJsonDataset(data, processor, image_folder)[0]


def test_image_without_image_folder_names_the_sample(processor, tmp_path):
    text_only = {"id": "text", "conversations": conversation(SINGLE, image_tag=False)}
    # Text-only samples need no image folder...
    assert "pixel_values" not in LlavaJsonDataset(write_json(tmp_path / "t.json", [text_only]), processor)[0]
    # ...a sample with an image does.
    data = write_json(tmp_path / "d.json", [text_only, GOOD])
    with pytest.raises(ValueError, match=re.escape("sample 'good' has an image but no image folder was given")):
        LlavaJsonDataset(data, processor)


@pytest.mark.parametrize(
    "name, text, message",
    [
        ("d.jsonl", f"{json.dumps(GOOD)}\n{{bad\n", r"d\.jsonl, line 2, column 2: invalid JSON: Expecting property"),
        # Line numbers count blank lines, and only "\n" ends a line: JSON strings may hold a raw U+2028.
        (
            "d.jsonl",
            '{"id": "a\u2028b"}\n\n[1, 2]\n',
            r"d\.jsonl, line 3: a sample must be a JSON object, got list",
        ),
        (
            "d.json",
            f"{json.dumps(GOOD)}\n{json.dumps(GOOD)}\n",
            r"d\.json: invalid JSON: Extra data: line 2 .* d\.jsonl",
        ),
        ("d.json", "", r"d\.json: the file is empty"),
        ("d.json", json.dumps([GOOD, [1, 2]]), r"d\.json: sample 1 must be a JSON object, got list"),
        ("d.json", '["abc"]', r"d\.json: sample 0 must be a JSON object, got str"),
        ("d.json", json.dumps(GOOD), r"d\.json: expected a JSON list of samples, got dict"),
        ("d.json", DEEP, r"d\.json: JSON nested too deeply to read \(maximum recursion depth"),
        ("d.jsonl", f"{json.dumps(GOOD)}\n{DEEP}\n", r"d\.jsonl, line 2: JSON nested too deeply to read"),
    ],
    ids=[
        "jsonl-syntax",
        "jsonl-list",
        "jsonl-as-json",
        "empty",
        "list-sample",
        "str-sample",
        "object-not-list",
        "deep-json",
        "deep-jsonl",
    ],
)
def test_bad_files_name_the_file(processor, image_folder, tmp_path, name, text, message):
    (tmp_path / name).write_text(text, encoding="utf-8")
    with pytest.raises((ValueError, TypeError), match=message) as error:
        LlavaJsonDataset(tmp_path / name, processor, image_folder)
    assert str(tmp_path / name) in str(error.value)


def test_samples_without_an_id_are_named_by_their_place(processor, image_folder, tmp_path):
    no_id = {"image": "a.png", "conversations": conversation(SINGLE, image_tag=False)}
    with pytest.raises(ValueError, match=re.escape("sample '#1': 0 <image> tag(s)")):
        LlavaJsonDataset(write_json(tmp_path / "d.json", [GOOD, no_id]), processor, image_folder)
    missing = {"image": "nope.png", "conversations": conversation(SINGLE)}
    with pytest.raises(FileNotFoundError, match=re.escape("sample '#2': image 'nope.png'")):
        LlavaJsonDataset(write_json(tmp_path / "d.json", [GOOD, GOOD, missing]), processor, image_folder)


def test_a_missing_image_folder_is_named(processor, tmp_path):
    with pytest.raises(
        FileNotFoundError, match=f"^the image folder {re.escape(str(tmp_path / 'nope'))} does not exist"
    ):
        LlavaJsonDataset(write_json(tmp_path / "d.json", [GOOD]), processor, tmp_path / "nope")


def test_data_files_must_be_utf8_and_may_start_with_a_byte_order_mark(processor, image_folder, tmp_path):
    text = json.dumps([{**GOOD, "id": "café"}], ensure_ascii=False)
    (tmp_path / "bom.json").write_bytes(b"\xef\xbb\xbf" + text.encode("utf-8"))
    assert LlavaJsonDataset(tmp_path / "bom.json", processor, image_folder).samples[0]["id"] == "café"
    (tmp_path / "latin1.json").write_bytes(text.encode("latin-1"))
    position = text.encode("latin-1").index("é".encode("latin-1"))
    with pytest.raises(ValueError, match=re.escape(f"latin1.json: not UTF-8 text (byte {position})")):
        LlavaJsonDataset(tmp_path / "latin1.json", processor, image_folder)


def test_a_16_bit_grayscale_image_is_scaled_to_8_bits(processor, tmp_path):
    """Pillow's own conversion to RGB clips a 16-bit image's values to 255 (it comes out almost white)."""
    ramp = np.linspace(0, 65535, 28 * 28).reshape(28, 28).astype(np.uint16)
    Image.fromarray(ramp).save(tmp_path / "deep.png")
    with Image.open(tmp_path / "deep.png") as opened:
        assert opened.mode == "I;16"  # (what the test is about)
    sample = {"id": "s", "image": "deep.png", "conversations": conversation([("what is it ?", "a square")])}
    item = LlavaJsonDataset(write_json(tmp_path / "d.json", [sample]), processor, tmp_path)[0]
    eight_bits = Image.fromarray((ramp.astype(np.float64) * 255 / 65535).round().astype(np.uint8)).convert("RGB")
    expected = processor.image_processor(eight_bits, return_tensors="pt")["pixel_values"]
    torch.testing.assert_close(item["pixel_values"], expected)


@pytest.mark.parametrize("name, text", [("d.json", "[]"), ("d.jsonl", "\n\n")], ids=["json", "jsonl"])
def test_empty_dataset(processor, image_folder, tmp_path, name, text):
    # Valid but sampleless files (an empty list, a JSON Lines file of blank lines), unlike a file with no text.
    (tmp_path / name).write_text(text, encoding="utf-8")
    with pytest.raises(ValueError, match=f"^{re.escape(str(tmp_path / name))}: the dataset is empty$"):
        LlavaJsonDataset(tmp_path / name, processor, image_folder)
