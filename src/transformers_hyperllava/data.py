"""Training data in LLaVA's JSON format: a lazy dataset and a padding collator.

A sample is `{"id", "image" (a file name, a list of them, or absent for text-only), "conversations": [{"from":
"human", "value": "<image>\\n..."}, {"from": "gpt", "value": "..."}, ...]}`. The prompt is rendered with the
processor's chat template (LLaVA-1.5's `vicuna_v1` for a `HyperLlavaProcessor`), whose assistant mask marks the
supervised tokens: every answer and its `</s>`. Everything else is labelled -100. The collator also names the prompt,
the non-padding tokens before the first supervised one, as `language_guidance_mask`: the model would derive it from
`labels`, but the Trainer keeps the labels to itself when it computes the loss (label smoothing, `compute_loss_func`),
and the guidance would then pool over the answers too.
"""

import json
import logging
import random
from pathlib import Path

import torch
from torch.utils.data import Dataset

from .generate import load_image
from .modeling_hyperllava import prompt_mask

logger = logging.getLogger(__name__)

IGNORE_INDEX = -100
ROLES = {"human": "user", "gpt": "assistant"}


def load_samples(path) -> list[dict]:
    """The samples of a LLaVA JSON file (a list of objects) or a JSON Lines file (one object a line)."""
    path = Path(path)
    try:
        text = path.read_text(encoding="utf-8-sig")  # (a byte-order mark, as some editors write one, is dropped)
    except UnicodeDecodeError as error:
        raise ValueError(
            f"{path}: not UTF-8 text (byte {error.start}): LLaVA's data files are UTF-8 JSON; re-encode it"
        ) from error
    if path.suffix == ".jsonl":
        samples = []
        # Split on "\n" alone: str.splitlines also splits on U+2028 and U+0085, which JSON strings may hold raw.
        for number, line in enumerate(text.split("\n"), start=1):
            if not line.strip():
                continue
            try:
                sample = json.loads(line)
            except json.JSONDecodeError as error:
                raise ValueError(f"{path}, line {number}, column {error.colno}: invalid JSON: {error.msg}") from error
            except RecursionError as error:  # (a damaged or hostile file: Python's JSON reader recurses per level)
                raise ValueError(f"{path}, line {number}: JSON nested too deeply to read ({error})") from error
            if not isinstance(sample, dict):
                got = type(sample).__name__
                raise TypeError(f"{path}, line {number}: a sample must be a JSON object, got {got}")
            samples.append(sample)
        return samples
    if not text.strip():
        raise ValueError(f"{path}: the file is empty")
    try:
        samples = json.loads(text)
    except json.JSONDecodeError as error:
        hint = ""
        if error.msg == "Extra data":
            hint = f" (if it holds one sample a line, JSON Lines, name it {path.stem}.jsonl)"
        raise ValueError(f"{path}: invalid JSON: {error}{hint}") from error
    except RecursionError as error:  # (a damaged or hostile file: Python's JSON reader recurses per level)
        raise ValueError(f"{path}: JSON nested too deeply to read ({error})") from error
    if not isinstance(samples, list):
        raise TypeError(f"{path}: expected a JSON list of samples, got {type(samples).__name__}")
    for index, sample in enumerate(samples):
        if not isinstance(sample, dict):
            raise TypeError(f"{path}: sample {index} must be a JSON object, got {type(sample).__name__}")
    return samples


def sample_images(sample) -> list[str]:
    """The image file names of a sample that `to_messages` checked."""
    image = sample.get("image")
    return [] if image is None else [image] if isinstance(image, str) else image


def to_messages(sample, image_token="<image>", sample_id=None) -> list[dict]:
    """LLaVA's conversation as chat messages: `<image>` tags become image items (one per tag) of their turn.

    Checks the things that would otherwise train on a corrupted sample, and names the sample in the error (`sample_id`,
    by default its "id").
    """
    sample_id = sample.get("id", "<no id>") if sample_id is None else sample_id
    conversations = sample.get("conversations")
    if not isinstance(conversations, list) or not conversations:
        raise ValueError(f"sample {sample_id!r}: 'conversations' must be a non-empty list of turns")
    messages, num_tags = [], 0
    for turn_index, turn in enumerate(conversations):
        expected = "human" if turn_index % 2 == 0 else "gpt"
        if not isinstance(turn, dict) or turn.get("from") != expected:
            got = turn.get("from") if isinstance(turn, dict) else turn
            hint = (
                " (LLaVA's format: 'from' and 'value', not 'role' and 'content')"
                if isinstance(turn, dict) and "role" in turn
                else ""
            )
            raise ValueError(
                f"sample {sample_id!r}: turn {turn_index} must be {{'from': {expected!r}, 'value': <text>}} "
                f"(turns alternate human, gpt), got from={got!r}{hint}"
            )
        if not isinstance(turn.get("value"), str):
            raise ValueError(
                f"sample {sample_id!r}: turn {turn_index} ({expected}): 'value' must be a string, "
                f"got {turn.get('value')!r}"
            )
        value = turn["value"]
        if expected == "gpt" and not value.strip():
            # (It would train the model to answer with "</s>" alone.)
            raise ValueError(f"sample {sample_id!r}: turn {turn_index} (gpt) is an empty answer")
        tags = value.count(image_token)
        if tags and expected == "gpt":
            raise ValueError(f"sample {sample_id!r}: turn {turn_index} (gpt) contains {image_token}")
        num_tags += tags
        # The template puts a turn's images first, each followed by a newline. So does LLaVA-1.5's
        # preprocess_multimodal: it removes the tags and strips what is left, in the turns that have tags only.
        text = value.replace(image_token, "").strip() if tags else value
        content = [{"type": "image"}] * tags + [{"type": "text", "text": text}]
        messages.append({"role": ROLES[expected], "content": content})
    if len(conversations) % 2:
        raise ValueError(f"sample {sample_id!r}: the last turn must be an answer (from 'gpt'), got 'human'")
    image = sample.get("image")
    if not (
        image is None or isinstance(image, str) or (isinstance(image, list) and all(isinstance(n, str) for n in image))
    ):
        raise ValueError(f"sample {sample_id!r}: 'image' must be a file name or a list of file names, got {image!r}")
    num_images = len(sample_images(sample))
    if num_tags != num_images:
        raise ValueError(
            f"sample {sample_id!r}: {num_tags} {image_token} tag(s) in the conversation but {num_images} image(s); "
            f"each image needs exactly one {image_token} tag"
        )
    return messages


class LlavaJsonDataset(Dataset):
    """LLaVA-format training samples, tokenised and with their images loaded when they are read.

    Every sample is checked when the dataset is built (turn roles, `<image>` tags against images, image files
    present), so that a bad sample stops training before it starts, with its id in the error. A sample longer than
    `max_length` is truncated unless the cut falls inside its image tokens or removes every supervised token: such
    a sample is dropped, counted in `num_dropped` and logged with its id, and another sample that fits, drawn at
    random (seeded by the index), takes its place. So is a sample none of whose tokens the processor marks as an
    answer's.
    """

    def __init__(self, data_path, processor, image_folder=None, max_length: int | None = None):
        if max_length is not None and max_length < 1:
            raise ValueError(f"max_length must be at least 1 token, got {max_length}")
        self.processor = processor
        self.image_folder = Path(image_folder) if image_folder is not None else None
        self.max_length = max_length
        self.samples = load_samples(data_path)
        if not self.samples:
            raise ValueError(f"{data_path}: the dataset is empty")
        self.messages = [
            to_messages(sample, processor.image_token, self.sample_id(index))
            for index, sample in enumerate(self.samples)
        ]
        named = [(index, name) for index, sample in enumerate(self.samples) for name in sample_images(sample)]
        if named and self.image_folder is None:
            raise ValueError(f"sample {self.sample_id(named[0][0])!r} has an image but no image folder was given")
        if named and not self.image_folder.is_dir():
            raise FileNotFoundError(f"the image folder {self.image_folder} does not exist")
        for index, name in named:
            path = self.image_folder / name
            if not path.is_file():
                problem = "names a folder, not an image file" if path.is_dir() else "not found"
                raise FileNotFoundError(f"sample {self.sample_id(index)!r}: image {name!r} ({path}) {problem}")
        # Which samples were dropped: each logged once and not read again. In shared memory, so that the dataloader's
        # workers (forked or spawned, new ones every epoch) and the main process keep one record.
        self.dropped = torch.zeros(len(self.samples), dtype=torch.bool).share_memory_()
        # A batch of these leaves the projector and the visual expert without a gradient (`build_trainer` reads this).
        self.text_only_ids = [self.sample_id(i) for i, sample in enumerate(self.samples) if not sample_images(sample)]

    def __len__(self):
        return len(self.samples)

    def sample_id(self, index):
        """What errors and warnings call sample `index`: its "id", or its place in the file where it has none."""
        return self.samples[index].get("id", f"#{index}")

    @property
    def num_dropped(self) -> int:
        return int(self.dropped.sum())

    def _open_image(self, sample_id, name):
        try:
            return load_image(self.image_folder / name)
        except (OSError, ValueError) as error:
            raise ValueError(f"sample {sample_id!r}: {error}") from error

    def __getitem__(self, index) -> dict:
        index = range(len(self))[index]  # (an IndexError past the end is what ends iterating over the dataset)
        item = None if self.dropped[index] else self._read(index)
        if item is not None:
            return item
        # A dropped sample's place goes to another that fits, so that no batch comes out empty: with one sample per
        # batch, a single over-long sample would otherwise stop the run at its step, hours in. Drawn at random (the
        # same in every epoch and process), not the next one: LLaVA's mix keeps its long text-only conversations
        # together, and a run of them would all give their places to one sample.
        draws = random.Random(index)
        while item is None:
            if self.dropped.all():
                raise ValueError(f"every sample was dropped (max_length={self.max_length}; see the warnings)")
            candidate = draws.randrange(len(self))
            if not self.dropped[candidate]:
                item = self._read(candidate)
        return item

    def _read(self, index) -> dict | None:
        """Sample `index` tokenised, truncated to `max_length`; None when it is dropped: it cannot be cut, or it
        supervises no token."""
        sample = self.samples[index]
        sample_id = self.sample_id(index)
        images = iter([self._open_image(sample_id, name) for name in sample_images(sample)])
        # The images travel inside the messages, in tag order, as the processor's chat template expects.
        messages = [
            {
                **m,
                "content": [
                    {"type": "image", "image": next(images)} if c["type"] == "image" else c for c in m["content"]
                ],
            }
            for m in self.messages[index]
        ]
        out = self.processor.apply_chat_template(
            messages, tokenize=True, return_dict=True, return_assistant_tokens_mask=True
        )
        input_ids = torch.tensor(out["input_ids"][0])
        labels = torch.where(torch.tensor(out["assistant_masks"][0]).bool(), input_ids, IGNORE_INDEX)
        problem = None
        if (labels == IGNORE_INDEX).all():
            # Trained, it would add nothing but its place in the batch. (Another model's processor gives Transformers'
            # own mask, which on 5.17 stops at an answer whose first character no token covers: none follow.)
            problem = "none of its tokens is an answer's (the tokenizer's assistant mask is empty)"
        elif self.max_length is not None and len(input_ids) > self.max_length:
            cuts_image = bool((input_ids[self.max_length :] == self.processor.image_token_id).any())
            if cuts_image or (labels[: self.max_length] == IGNORE_INDEX).all():
                problem = f"{len(input_ids)} tokens do not fit max_length={self.max_length} without cutting " + (
                    "image tokens" if cuts_image else "every answer"
                )
            input_ids, labels = input_ids[: self.max_length], labels[: self.max_length]
        if problem is not None:
            if not self.dropped[index]:
                self.dropped[index] = True
                logger.warning("Dropped sample %r: %s (%d dropped so far)", sample_id, problem, self.num_dropped)
            return None
        item = {"input_ids": input_ids, "labels": labels}
        if "pixel_values" in out:
            item["pixel_values"] = torch.stack([torch.as_tensor(p) for p in out["pixel_values"]])
        return item


class LlavaDataCollator:
    """Pads a batch on the right (`pad_token_id` for inputs, -100 for labels), concatenates the images and names the
    prompt of each sample (`language_guidance_mask`).

    Images of a batch go in one `pixel_values` tensor, in sample order, which is the order the model fills the image
    tokens in; text-only samples contribute none.
    """

    def __init__(self, pad_token_id: int):
        if pad_token_id is None:  # else the first batch fails deep in `torch.full`
            raise ValueError(
                "LlavaDataCollator got pad_token_id=None: the tokenizer has no pad token. Set one and save the "
                "tokenizer (LLaVA-1.5 pads with its unk token: `tokenizer.pad_token = tokenizer.unk_token`)"
            )
        self.pad_token_id = pad_token_id

    def __call__(self, features):
        length = max(len(f["input_ids"]) for f in features)
        batch = {
            "input_ids": torch.full((len(features), length), self.pad_token_id, dtype=torch.long),
            "attention_mask": torch.zeros((len(features), length), dtype=torch.long),
            "labels": torch.full((len(features), length), IGNORE_INDEX, dtype=torch.long),
        }
        for row, feature in enumerate(features):
            n = len(feature["input_ids"])
            batch["input_ids"][row, :n] = feature["input_ids"]
            batch["attention_mask"][row, :n] = 1
            batch["labels"][row, :n] = feature["labels"]
        batch["language_guidance_mask"] = prompt_mask(batch["labels"], batch["attention_mask"])
        pixel_values = [f["pixel_values"] for f in features if "pixel_values" in f]
        if pixel_values:
            batch["pixel_values"] = torch.cat(pixel_values)
        return batch


__all__ = ["IGNORE_INDEX", "LlavaDataCollator", "LlavaJsonDataset", "load_samples", "to_messages"]
