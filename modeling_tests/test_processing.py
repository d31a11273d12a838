"""HyperLlavaProcessor: LLaVA-1.5's preprocessing and vicuna_v1 prompt format, against independent references."""

import json
import os
import re
import subprocess
import sys

import numpy as np
import pytest
import torch
from jinja2 import TemplateError
from PIL import Image
from tokenizers import AddedToken
from transformers import AutoProcessor, AutoTokenizer, LlavaImageProcessorPil, LlavaProcessor

from conftest import train_sentencepiece, write_sentencepiece_tokenizer
from transformers_hyperllava import HyperLlavaForConditionalGeneration
from transformers_hyperllava.processing_hyperllava import HyperLlavaProcessor
from transformers_hyperllava.tiny import tiny_config
from transformers_hyperllava.tiny_tokenizer import DEFAULT_TEXTS, tiny_processor, train_tokenizer

CLIP_MEAN = np.array([0.48145466, 0.4578275, 0.40821073])
CLIP_STD = np.array([0.26862954, 0.26130258, 0.27577711])
SYSTEM = (
    "A chat between a curious user and an artificial intelligence assistant. "
    "The assistant gives helpful, detailed, and polite answers to the user's questions."
)


def vicuna_v1_prompt(turns, system=SYSTEM):
    """LLaVA-1.5's `Conversation.get_prompt()` for `conv_vicuna_v1` (SeparatorStyle.TWO, sep=" ", sep2="</s>");
    `turns` alternate USER and ASSISTANT messages, None for the open assistant turn of a generation prompt."""
    seps = [" ", "</s>"]
    prompt = system + seps[0]
    for i, message in enumerate(turns):
        role = ("USER", "ASSISTANT")[i % 2]
        prompt += f"{role}: {message}{seps[i % 2]}" if message is not None else f"{role}:"
    return prompt


def llava_expand2square_preprocess(image, size):
    """LLaVA-1.5's `expand2square` with the CLIP mean colour, then CLIPImageProcessor (bicubic resize of the
    shortest edge, centre crop, rescale, normalise), written with Pillow and NumPy."""
    width, height = image.size
    if width != height:
        side = max(width, height)
        square = Image.new(image.mode, (side, side), tuple(int(x * 255) for x in CLIP_MEAN))
        square.paste(image, ((side - width) // 2, (side - height) // 2))
        image = square
    image = image.resize((size, size), Image.BICUBIC)
    array = np.asarray(image, dtype=np.float64) / 255.0
    return ((array - CLIP_MEAN) / CLIP_STD).transpose(2, 0, 1)


def random_image(height, width, seed=0):
    return Image.fromarray(np.random.RandomState(seed).randint(0, 256, (height, width, 3), dtype=np.uint8))


def user(text, num_images=0):
    return {"role": "user", "content": [{"type": "image"}] * num_images + [{"type": "text", "text": text}]}


def assistant(text):
    return {"role": "assistant", "content": [{"type": "text", "text": text}]}


@pytest.fixture(scope="module")
def tokenizer():
    return train_tokenizer(DEFAULT_TEXTS)


@pytest.fixture(scope="module")
def processor(tokenizer):
    return tiny_processor(tokenizer)


def test_tokenizer_special_tokens_match_tiny_config(tokenizer):
    config = tiny_config()
    assert tokenizer.convert_tokens_to_ids(["<unk>", "<s>", "</s>", "<pad>", "<image>"]) == [0, 1, 2, 3, 4]
    assert (tokenizer.bos_token_id, tokenizer.eos_token_id, tokenizer.pad_token_id) == (
        config.text_config.bos_token_id,
        config.text_config.eos_token_id,
        config.pad_token_id,
    )
    assert tokenizer.convert_tokens_to_ids("<image>") == config.image_token_id
    ids = tokenizer("What is in the image?").input_ids
    assert ids[0] == tokenizer.bos_token_id and tokenizer.unk_token_id not in ids
    # Every word of the chat format is in the vocabulary.
    assert (
        tokenizer.unk_token_id not in tokenizer(vicuna_v1_prompt(["<image>\nWhat is in the image?", "Two."])).input_ids
    )


@pytest.mark.parametrize("size", [(30, 50), (50, 30), (40, 40), (7, 90)])
def test_pad_to_square_matches_llava_expand2square(processor, size):
    image = random_image(*size)
    pixel_values = processor(images=[image], text="<image>\nWhat is in the image?", return_tensors="np").pixel_values
    np.testing.assert_allclose(pixel_values[0], llava_expand2square_preprocess(image, 28), atol=1e-5)


def test_padding_uses_the_mean_colour_not_black(processor):
    # A wide black image: the added top and bottom rows are the normalised mean colour, i.e. zero.
    image = Image.new("RGB", (56, 28), (0, 0, 0))
    pixel_values = processor(images=[image], text="<image>\nWhat is in the image?", return_tensors="np").pixel_values
    np.testing.assert_allclose(pixel_values[0, :, 0, :], 0.0, atol=0.02)
    np.testing.assert_allclose(
        pixel_values[0, :, 14, :], np.broadcast_to((-CLIP_MEAN / CLIP_STD)[:, None], (3, 28)), atol=1e-5
    )


def test_input_ids_and_pixels_equal_stock_llava_processor(processor, tokenizer):
    stock = LlavaProcessor(
        image_processor=LlavaImageProcessorPil(
            size={"shortest_edge": 28}, crop_size={"height": 28, "width": 28}, do_pad=True
        ),
        tokenizer=tokenizer,
        patch_size=14,
        vision_feature_select_strategy="default",
        num_additional_image_tokens=1,
    )
    texts = [
        vicuna_v1_prompt(["<image>\nWhat is in the image?", None]),
        vicuna_v1_prompt(["<image>\n<image>\nHow many objects are there?", "Two.", "Describe the picture.", None]),
    ]
    images = [random_image(30, 50, 1), random_image(40, 40, 2), random_image(50, 20, 3)]
    ours = processor(images=images, text=texts, padding=True, return_tensors="pt")
    theirs = stock(images=images, text=texts, padding=True, return_tensors="pt")
    assert set(ours.keys()) == set(theirs.keys()) == {"input_ids", "attention_mask", "pixel_values"}
    for key in ours:
        torch.testing.assert_close(ours[key], theirs[key], rtol=0, atol=0)
    # (28 / 14)^2 visual tokens per image, CLS dropped; left padding for generation.
    assert (ours.input_ids == 4).sum(dim=1).tolist() == [4, 8]
    assert ours.attention_mask[0, 0] == 0 and ours.attention_mask[:, -1].all()


def test_chat_template_single_turn_is_vicuna_v1(processor):
    messages = [user("What is in the image?", num_images=1)]
    assert processor.apply_chat_template(messages, add_generation_prompt=True) == vicuna_v1_prompt(
        ["<image>\nWhat is in the image?", None]
    )
    # Plain-string content, and the image placed after the text in the message still goes first (as LLaVA trained).
    messages = [{"role": "user", "content": [{"type": "text", "text": "What is in the image?"}, {"type": "image"}]}]
    assert processor.apply_chat_template(messages, add_generation_prompt=True) == vicuna_v1_prompt(
        ["<image>\nWhat is in the image?", None]
    )
    messages = [{"role": "user", "content": "Hello"}]
    assert processor.apply_chat_template(messages, add_generation_prompt=True) == vicuna_v1_prompt(["Hello", None])


def test_chat_template_multi_turn_and_system(processor):
    messages = [
        user("What is in the image?", num_images=1),
        assistant("A red square."),
        user("How many objects are there?"),
        assistant("Two."),
    ]
    expected = vicuna_v1_prompt(
        ["<image>\nWhat is in the image?", "A red square.", "How many objects are there?", "Two."]
    )
    assert processor.apply_chat_template(messages) == expected
    assert processor.apply_chat_template(messages + [user("Why?")], add_generation_prompt=True) == vicuna_v1_prompt(
        ["<image>\nWhat is in the image?", "A red square.", "How many objects are there?", "Two.", "Why?", None]
    )
    system = {"role": "system", "content": [{"type": "text", "text": "Answer briefly."}]}
    assert processor.apply_chat_template([system, *messages]) == vicuna_v1_prompt(
        ["<image>\nWhat is in the image?", "A red square.", "How many objects are there?", "Two."],
        system="Answer briefly.",
    )
    # A system message of several text items: their texts, joined by spaces as a user turn's are.
    system = {
        "role": "system",
        "content": [{"type": "text", "text": "Answer briefly."}, {"type": "text", "text": "Be kind."}],
    }
    assert processor.apply_chat_template([system, user("Why?")], add_generation_prompt=True) == vicuna_v1_prompt(
        ["Why?", None], system="Answer briefly. Be kind."
    )


def test_chat_template_refuses_unknown_roles_and_a_system_message_after_the_first(processor):
    with pytest.raises(TemplateError, match="got tool"):
        processor.apply_chat_template([user("Hi"), {"role": "tool", "content": "x"}])
    with pytest.raises(TemplateError, match="a system message only as the first message"):
        processor.apply_chat_template([user("Hi"), {"role": "system", "content": "x"}, user("Why?")])


# Where padding and return_tensors are given; how the images are given (OpenAI's image_url blocks, as a file path).
@pytest.mark.parametrize("top_level", [False, True], ids=["processor_kwargs", "top-level"])
@pytest.mark.parametrize("block", ["image", "image_url"])
@pytest.mark.parametrize("batched, padding_side", [(False, "left"), (True, "left"), (True, "right")])
def test_assistant_mask_marks_exactly_the_answers(
    processor, tokenizer, tmp_path, batched, padding_side, top_level, block
):
    random_image(30, 50).save(tmp_path / "image.png")
    if block == "image":
        image = {"type": "image", "image": Image.open(tmp_path / "image.png")}
    else:
        image = {"type": "image_url", "image_url": {"url": str(tmp_path / "image.png")}}
    long = [
        {
            "role": "user",
            "content": [image, {"type": "text", "text": "What is in the image?"}],
        },
        assistant("A red square."),
        user("How many objects are there?"),
        assistant("Two."),
    ]
    short = [
        {
            "role": "user",
            "content": [image, {"type": "text", "text": "Describe the picture."}],
        },
        assistant("There is a cat next to a green box."),
    ]
    conversations = [long, short] if batched else [long]
    answers = [["A red square.", "Two."], ["There is a cat next to a green box."]]
    processing = {"padding": True, "padding_side": padding_side, "return_tensors": "pt"}
    out = processor.apply_chat_template(
        conversations if batched else long,
        tokenize=True,
        return_dict=True,
        return_assistant_tokens_mask=True,
        **(processing if top_level else {"processor_kwargs": processing}),
    )
    assert all(isinstance(value, torch.Tensor) for value in out.values())
    assert out["assistant_masks"].shape == out["input_ids"].shape
    for row, conversation_answers in enumerate(answers[: len(conversations)]):
        ids, mask = out["input_ids"][row], out["assistant_masks"][row].bool()
        # Independent reference: tokenise each answer + "</s>" on its own.
        expected = [t for a in conversation_answers for t in tokenizer(a, add_special_tokens=False).input_ids + [2]]
        assert ids[mask].tolist() == expected
        # The masked tokens sit at the ends of the assistant turns of the expanded prompt (4 image tokens).
        assert (ids == 4).sum() == 4
        last = out["attention_mask"][row].nonzero().max()
        assert mask[last] and ids[last] == tokenizer.eos_token_id
        assert not mask[out["attention_mask"][row] == 0].any()


def llava_preprocess_v1_supervised(tokenizer, turns):
    """The tokens of a text-only conversation and which of them LLaVA-1.5's `preprocess_v1` (llava/train/train.py,
    `conv_vicuna_v1`) supervises, written from it: the conversation is cut into rounds at "</s>"; in each, the first
    `len(tokens(prompt + " ASSISTANT: ")) - 2` tokens (BOS, and the space that the answer's first token takes) are
    not supervised, and the round's length counts its "</s>" through the BOS of its own tokenisation."""
    conversation = vicuna_v1_prompt(turns)
    ids = tokenizer(conversation).input_ids
    supervised = [False] + [True] * (len(ids) - 1)
    start = 1
    for round_text in conversation.split("</s>")[:-1]:
        prompt = round_text.split(" ASSISTANT: ")[0] + " ASSISTANT: "
        instruction = len(tokenizer(prompt).input_ids) - 2
        supervised[start : start + instruction] = [False] * instruction
        start += len(tokenizer(round_text).input_ids)
    assert start == len(ids)  # LLaVA's "tokenization mismatch" check
    return ids, supervised


@pytest.mark.parametrize("answer", ["A red square.", "2", "3 boxes", "\u6728", " red"], ids=repr)
def test_assistant_mask_supervises_what_llava_supervises_with_a_llama_tokenizer(tmp_path, answer):
    """With Llama's SentencePiece tokenizer (digits split, a dummy prefix) the space before an answer merges with its
    first token ("▁A") or, before a digit or a byte-encoded character, is a token of its own ("▁"), which the generation
    prompt (ending at "ASSISTANT:") must produce first: LLaVA-1.5 supervises it, and so must the mask."""
    write_sentencepiece_tokenizer(tmp_path, train_sentencepiece())
    tokenizer = AutoTokenizer.from_pretrained(tmp_path)
    # <image> and <pad> as hyperllava-convert adds them to a LLaVA-1.5 release's tokenizer.
    tokenizer.add_tokens([AddedToken("<image>", special=True, normalized=False)], special_tokens=True)
    tokenizer.add_special_tokens({"pad_token": "<pad>"})
    config = tiny_config(vocab_size=len(tokenizer), image_token_id=tokenizer.convert_tokens_to_ids("<image>"))
    processor = tiny_processor(tokenizer, config)
    turns = ["What is in the image?", answer]
    ids, supervised = llava_preprocess_v1_supervised(tokenizer, turns)
    out = processor.apply_chat_template(
        [user(turns[0]), assistant(turns[1])], tokenize=True, return_dict=True, return_assistant_tokens_mask=True
    )
    assert out["input_ids"][0] == ids
    assert [bool(flag) for flag in out["assistant_masks"][0]] == supervised


@pytest.mark.parametrize(
    "top_level", [False, True], ids=["processor_kwargs", "top-level"]
)  # where truncation is given
@pytest.mark.parametrize("with_image", [False, True], ids=["text-only", "image"])
def test_assistant_mask_refuses_a_truncated_prompt(processor, tokenizer, with_image, top_level):
    question = {"type": "text", "text": "What is in the image?"}
    first = [{"type": "image", "image": random_image(30, 50)}, question] if with_image else [question]
    conversation = [{"role": "user", "content": first}, assistant("A red square.")]

    def apply(**truncation):
        return processor.apply_chat_template(
            conversation,
            tokenize=True,
            return_dict=True,
            return_assistant_tokens_mask=True,
            **(truncation if top_level else {"processor_kwargs": truncation}),
        )

    full = apply()
    length = len(full["input_ids"][0])
    # Room for the whole prompt: truncation changes nothing and the mask is the answer and its </s>.
    fits = apply(truncation=True, max_length=length)
    assert fits["input_ids"] == full["input_ids"] and fits["assistant_masks"] == full["assistant_masks"]
    ids, mask = full["input_ids"][0], full["assistant_masks"][0]
    assert [t for t, m in zip(ids, mask) if m] == tokenizer("A red square.", add_special_tokens=False).input_ids + [2]
    # A cut prompt no longer holds the whole conversation: refused rather than given a wrong or empty mask. (With an
    # image, a cut before the end of its tokens is refused by Transformers itself, on 5.17 and 5.24 alike.)
    for max_length in (length - 1,) if with_image else (5, length - 1):
        with pytest.raises(
            ValueError,
            match=re.escape("Could not place the assistant mask on the processed prompt (was it truncated?)"),
        ):
            apply(truncation=True, max_length=max_length)


def test_bad_inputs_give_clear_errors(processor):
    image = random_image(28, 28)
    prompt = vicuna_v1_prompt(["<image>\n<image>\nWhat is in the image?", None])
    with pytest.raises(ValueError, match="2 <image> placeholder\\(s\\) but 1 image\\(s\\)"):
        processor(images=[image], text=prompt)
    with pytest.raises(ValueError, match="2 <image> placeholder\\(s\\) but 0 image\\(s\\)"):
        processor(text=prompt)
    with pytest.raises(ValueError, match="0 <image> placeholder\\(s\\) but 2 image\\(s\\)"):
        processor(images=[image, image], text="What is in the image?")
    with pytest.raises(ValueError, match="Empty prompt at batch index \\[1\\]"):
        processor(text=["What is in the image?", "  "])
    for text in (5, ["What is in the image?", None]):
        with pytest.raises(
            TypeError, match=re.escape(f"text must be a prompt string or a list of them, got {text!r}")
        ):
            processor(text=text)
    with pytest.raises(ValueError, match="vocab_size"):
        tiny_processor(train_tokenizer([" ".join(f"word{i}" for i in range(80))]))


def test_processor_save_load_with_model(tmp_path, tokenizer):
    """Saved beside the model, the processor comes back through AutoProcessor (the package registers it) and
    through remote code in a fresh process where the package cannot be imported."""
    config = tiny_config(vocab_size=len(tokenizer))
    processor = tiny_processor(tokenizer, config)
    torch.manual_seed(0)
    HyperLlavaForConditionalGeneration(config).save_pretrained(tmp_path)
    processor.save_pretrained(tmp_path)

    image = random_image(50, 30)
    prompt = processor.apply_chat_template([user("What is in the image?", 1)], add_generation_prompt=True)
    expected = processor(images=[image], text=prompt, return_tensors="np")

    loaded = AutoProcessor.from_pretrained(tmp_path)
    assert type(loaded) is HyperLlavaProcessor
    assert loaded.chat_template == processor.chat_template
    assert loaded.tokenizer.padding_side == "left"
    got = loaded(images=[image], text=prompt, return_tensors="np")
    np.testing.assert_array_equal(got["input_ids"], expected["input_ids"])
    np.testing.assert_array_equal(got["pixel_values"], expected["pixel_values"])

    image.save(tmp_path / "image.png")
    script = f"""
import json, sys
sys.modules["transformers_hyperllava"] = None  # the package must not be importable here
from PIL import Image
from transformers import AutoProcessor
processor = AutoProcessor.from_pretrained({str(tmp_path)!r}, trust_remote_code=True)
prompt = processor.apply_chat_template(
    [{{"role": "user", "content": [{{"type": "image"}}, {{"type": "text", "text": "What is in the image?"}}]}}],
    add_generation_prompt=True,
)
out = processor(images=[Image.open({str(tmp_path / "image.png")!r})], text=prompt, return_tensors="np")
print(json.dumps({{"class": type(processor).__module__ + "." + type(processor).__name__,
                  "input_ids": out["input_ids"].tolist(), "pixel_values": out["pixel_values"].tolist()}}))
"""
    env = {**os.environ, "HF_MODULES_CACHE": str(tmp_path / "modules"), "HF_HUB_OFFLINE": "1"}
    result = subprocess.run(
        [sys.executable, "-c", script], capture_output=True, text=True, env=env, cwd=tmp_path, timeout=300
    )
    assert result.returncode == 0, result.stderr
    remote = json.loads(result.stdout.strip().splitlines()[-1])
    assert remote["class"].startswith("transformers_modules.") and remote["class"].endswith(".HyperLlavaProcessor")
    assert remote["input_ids"] == expected["input_ids"].tolist()
    np.testing.assert_allclose(np.array(remote["pixel_values"]), expected["pixel_values"], rtol=0, atol=1e-7)


def test_batched_left_padded_generation_equals_one_by_one(tokenizer):
    config = tiny_config(vocab_size=len(tokenizer))
    processor = tiny_processor(tokenizer, config)
    torch.manual_seed(0)
    model = HyperLlavaForConditionalGeneration(config).eval()
    with torch.no_grad():  # non-zero experts, so that per-sequence expert weights matter
        for name, param in model.named_parameters():
            if "expert" in name:
                param.normal_(0, 0.2)
    questions = ["What is in the image?", "Describe the picture in detail.", "How many objects are there?"]
    prompts = [
        processor.apply_chat_template([user(q, num_images=1)], add_generation_prompt=True) for q in questions[:2]
    ] + [
        processor.apply_chat_template(
            [user(questions[2], 1), assistant("Two."), user("Why?")], add_generation_prompt=True
        )
    ]
    images = [random_image(30, 50, 1), random_image(40, 40, 2), random_image(20, 35, 3)]

    def generate(batch_prompts, batch_images):
        inputs = processor(images=batch_images, text=batch_prompts, padding=True, return_tensors="pt")
        with torch.no_grad():
            out = model.generate(
                **inputs, max_new_tokens=6, do_sample=False, pad_token_id=tokenizer.pad_token_id,
                output_logits=True, return_dict_in_generate=True,
            )  # fmt: skip
        new_tokens = out.sequences[:, inputs["input_ids"].shape[1] :].tolist()
        return new_tokens, torch.stack(out.logits, dim=1), inputs["attention_mask"]

    batched, batched_logits, attention_mask = generate(prompts, images)
    assert (attention_mask == 0).any(), "the prompts should differ in length, so that left padding is exercised"
    assert (attention_mask[:, -1] == 1).all()
    for i in range(len(prompts)):
        single, single_logits, _ = generate([prompts[i]], [images[i]])
        n = len(single[0])
        assert batched[i][:n] == single[0]
        assert all(token == tokenizer.pad_token_id for token in batched[i][n:])  # it stopped at eos
        # Every step's logits, not only their argmax: guidance that took in the padding would change the logits long
        # before it changed a token of this tiny model.
        torch.testing.assert_close(batched_logits[i, :n], single_logits[0], atol=1e-5, rtol=1e-5)


def same_settings(cls, processor, **kwargs):
    """A processor of class `cls` with `processor`'s parts and settings."""
    return cls(
        image_processor=processor.image_processor,
        tokenizer=processor.tokenizer,
        patch_size=processor.patch_size,
        vision_feature_select_strategy=processor.vision_feature_select_strategy,
        num_additional_image_tokens=processor.num_additional_image_tokens,
        **kwargs,
    )


def test_assistant_mask_with_named_chat_templates(processor, tokenizer):
    """A processor with several templates (`chat_templates/*.jinja`): the mask follows the template that the call
    names, or the one named "default", as the rendered prompt does."""
    from transformers_hyperllava.processing_hyperllava import CHAT_TEMPLATE, VICUNA_V1_SYSTEM

    other = CHAT_TEMPLATE.replace(VICUNA_V1_SYSTEM.replace("'", "\\'"), "Describe the picture in detail.")
    assert other != CHAT_TEMPLATE
    named = same_settings(HyperLlavaProcessor, processor, chat_template={"default": CHAT_TEMPLATE, "other": other})
    conversation = [user("What is in the image?"), assistant("A red square.")]
    kwargs = {"tokenize": True, "return_dict": True, "return_assistant_tokens_mask": True}
    answer = tokenizer("A red square.", add_special_tokens=False).input_ids + [tokenizer.eos_token_id]
    for name, template in ((None, CHAT_TEMPLATE), ("other", other)):
        expected = processor.apply_chat_template(conversation, chat_template=template, **kwargs)
        got = named.apply_chat_template(conversation, chat_template=name, **kwargs)
        assert got["input_ids"] == expected["input_ids"]
        assert got["assistant_masks"] == expected["assistant_masks"]
        assert [t for t, m in zip(got["input_ids"][0], got["assistant_masks"][0]) if m] == answer


def test_sanitized_user_text_that_spells_the_image_placeholder(processor, tokenizer):
    """`sanitize_control_tokens=True` (Transformers 5.24 on) encodes an "<image>" that the user typed as text: it is
    no placeholder, as for LlavaProcessor. (It needs a template that writes BOS, which vicuna_v1's does not.)"""
    from transformers import processing_utils

    if not hasattr(processing_utils, "_MARKED_RE"):
        pytest.skip("this Transformers release has no sanitize_control_tokens")
    stock = same_settings(LlavaProcessor, processor)
    template = "{{- bos_token -}}" + processor.chat_template
    conversation = [
        {
            "role": "user",
            "content": [
                {"type": "image", "image": random_image(30, 50)},
                {"type": "text", "text": "What is <image>?"},
            ],
        }
    ]
    kwargs = {"chat_template": template, "tokenize": True, "return_dict": True, "sanitize_control_tokens": True}
    ours = processor.apply_chat_template(conversation, add_generation_prompt=True, return_tensors="pt", **kwargs)
    theirs = stock.apply_chat_template(conversation, add_generation_prompt=True, return_tensors="pt", **kwargs)
    assert (ours["input_ids"] == 4).sum() == 4  # the one image's tokens only
    for key in theirs:
        torch.testing.assert_close(ours[key], theirs[key], rtol=0, atol=0)
    # Sanitized text and an assistant mask do not go together: Transformers says so.
    conversation.append(assistant("Two."))
    with pytest.raises(ValueError, match="not compatible with `return_assistant_tokens_mask=True`"):
        processor.apply_chat_template(conversation, return_assistant_tokens_mask=True, **kwargs)


def test_assistant_mask_where_sanitize_control_tokens_is_ignored(processor, tokenizer):
    """Releases before 5.24 have no sanitize_control_tokens and ignore it: the mask is still this processor's, not
    the release's own (5.17's misplaces the answers)."""
    from transformers import processing_utils

    if hasattr(processing_utils, "_MARKED_RE"):
        pytest.skip("this Transformers release sanitizes control tokens (and refuses the mask with them)")
    conversation = [user("What is in the image?"), assistant("A red square.")]
    kwargs = {"tokenize": True, "return_dict": True, "return_assistant_tokens_mask": True}
    expected = processor.apply_chat_template(conversation, **kwargs)
    got = processor.apply_chat_template(conversation, sanitize_control_tokens=True, **kwargs)
    assert got["input_ids"] == expected["input_ids"]
    assert got["assistant_masks"] == expected["assistant_masks"]
    answer = tokenizer("A red square.", add_special_tokens=False).input_ids + [tokenizer.eos_token_id]
    assert [t for t, m in zip(got["input_ids"][0], got["assistant_masks"][0]) if m] == answer
