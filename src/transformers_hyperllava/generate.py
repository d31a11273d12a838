"""`hyperllava-generate`: answer a question about images with a saved HyperLLaVA model.

One question (the answer streams to stdout):

    hyperllava-generate --model PATH --image cat.jpg --prompt "What is in the image?"

Many questions, in LLaVA's `model_vqa` format (a JSONL of `{"question_id", "image", "text"}`; answers as JSONL of
`{"question_id", "prompt", "text", "answer_id", "model_id", "metadata"}`):

    hyperllava-generate --model PATH --question-file q.jsonl --image-folder images/ --answers-file a.jsonl
"""

import argparse
import contextlib
import json
import os
import sys
import uuid
from pathlib import Path

import numpy as np
import torch
from huggingface_hub.utils import HFValidationError, validate_repo_id
from PIL import Image, UnidentifiedImageError
from tqdm import tqdm
from transformers import AutoModelForImageTextToText, AutoProcessor, TextStreamer, set_seed

from .files import replaced_when_done, stop_signals_interrupt


def load_image(path) -> Image.Image:
    """An image file as RGB, like LLaVA-1.5 (grayscale, palette and RGBA images are converted)."""
    try:
        with Image.open(path) as image:
            # Pillow only warns up to twice its limit (a possible decompression bomb) and refuses above: refused from
            # the limit on, before the pixels are decoded. (None turns the limit off, as it does for Pillow.)
            if Image.MAX_IMAGE_PIXELS is not None and image.width * image.height > Image.MAX_IMAGE_PIXELS:
                raise ValueError(
                    f"{image.width}x{image.height} = {image.width * image.height} pixels, over Pillow's pixel limit "
                    f"(PIL.Image.MAX_IMAGE_PIXELS = {Image.MAX_IMAGE_PIXELS})"
                )
            return to_rgb(image)
    except FileNotFoundError:
        raise FileNotFoundError(f"Image file not found: {path}") from None
    # (Pillow refuses an image over twice its pixel limit with an error of its own, and some damaged files, a PNG with
    # a broken chunk say, with a SyntaxError.)
    except (UnidentifiedImageError, OSError, Image.DecompressionBombError, ValueError, SyntaxError) as error:
        raise ValueError(f"Cannot read image file {path}: {error}") from error


def to_rgb(image) -> Image.Image:
    """`image.convert("RGB")`, as LLaVA-1.5 reads an image, but for single-channel images of more than 8 bits, whose
    values that conversion clips to 255 (a 16-bit scan comes out almost white): 16-bit ones are scaled to 8 bits;
    32-bit integer and float ones, whose range no mode fixes, are taken only where their values are 8-bit already."""
    if image.mode.startswith("I;16"):
        image = Image.fromarray(np.round(np.asarray(image, dtype=np.float64) / 257).astype(np.uint8))
    elif image.mode in ("I", "F"):
        low, high = image.getextrema()
        if low < 0 or high > 255:
            raise ValueError(
                f"a {'32-bit integer' if image.mode == 'I' else 'float'} grayscale "
                f"image (mode {image.mode}) with values from {low} to {high}, whose range is not 8-bit: convert it to "
                "an 8-bit image"
            )
    return image.convert("RGB")


def build_prompt(processor, question: str, num_images: int, system: str | None = None) -> str:
    """The vicuna_v1 prompt for one question; images go first unless the question places its own `<image>`s."""
    if not isinstance(question, str) or not question.strip():
        raise ValueError("The prompt is empty")
    placeholders = question.count(processor.image_token)
    if placeholders and placeholders != num_images:
        raise ValueError(
            f"The prompt has {placeholders} {processor.image_token} placeholder(s) "
            f"but {num_images} image(s) were given"
        )
    content = [{"type": "image"}] * (0 if placeholders else num_images) + [{"type": "text", "text": question}]
    messages = [{"role": "user", "content": content}]
    if system is not None:
        messages.insert(0, {"role": "system", "content": system})
    return processor.apply_chat_template(messages, add_generation_prompt=True)


def generation_kwargs(args, processor) -> dict:
    kwargs = {
        "max_new_tokens": args.max_new_tokens,
        "num_beams": args.num_beams,
        "do_sample": args.temperature > 0,
        "pad_token_id": processor.tokenizer.pad_token_id,
    }
    if args.temperature > 0:
        kwargs.update(temperature=args.temperature, top_p=args.top_p)
    return kwargs


def generate_answers(model, processor, prompts, images, streamer=None, **kwargs) -> list[str]:
    """Answers for a batch of prompts (left-padded together) and their images, in prompt order."""
    # Left padding whatever the saved tokenizer says: generation continues every prompt from its last token.
    inputs = processor(images=images or None, text=prompts, padding=True, padding_side="left", return_tensors="pt")
    inputs = inputs.to(model.device, dtype=model.dtype)
    with torch.inference_mode():
        output = model.generate(**inputs, streamer=streamer, **kwargs)
    answers = processor.batch_decode(output[:, inputs["input_ids"].shape[1] :], skip_special_tokens=True)
    return [answer.strip() for answer in answers]


def is_text(string: str) -> bool:
    """Whether `string` is text: no lone surrogate, which a JSON escape (half an emoji) or an argument that is not
    UTF-8 leaves, and which neither the tokenizer nor a UTF-8 file takes."""
    try:
        string.encode("utf-8")
    except UnicodeEncodeError:
        return False
    return True


def read_questions(path):
    """(question_id or line label, question dict or the error) for every non-blank line of a JSONL file."""
    with open(path, encoding="utf-8-sig") as file:  # (-sig: Notepad and PowerShell start UTF-8 files with a BOM)
        for number, line in enumerate(file, start=1):
            if not line.strip():
                continue
            try:
                question = json.loads(line)
            except json.JSONDecodeError as error:
                yield f"line {number}", ValueError(f"invalid JSON: {error}")
                continue
            except RecursionError as error:  # (a damaged or hostile line: Python's JSON reader recurses per level)
                yield f"line {number}", ValueError(f"JSON nested too deeply to read ({error})")
                continue
            if not isinstance(question, dict):
                yield f"line {number}", ValueError(f"expected a JSON object, got {json.dumps(question):.80}")
                continue
            if "question_id" not in question:
                yield f"line {number}", ValueError("missing key 'question_id'")
                continue
            # Named by its id, unless the id is what cannot be printed.
            label = question["question_id"]
            if not is_text(json.dumps(question, ensure_ascii=False)):
                label = label if is_text(json.dumps(label, ensure_ascii=False)) else f"line {number}"
                yield label, ValueError("an unpaired \\ud800-\\udfff escape (half a character): not text")
                continue
            missing = [key for key in ("image", "text") if key not in question]
            if missing:
                yield label, ValueError(f"missing key(s) {missing}")
                continue
            wrong = [
                f"key {key!r} must be a string, got {json.dumps(question[key]):.80}"
                for key in ("image", "text")
                if not isinstance(question[key], str)
            ]
            yield label, ValueError("; ".join(wrong)) if wrong else question


class _NothingAnswered(Exception):
    """Every question failed (a wrong --image-folder, say). Raised inside `replaced_when_done`, which then keeps the
    previous answers file rather than replace it with an empty one."""


def _make_folders(folder):
    """Makes `folder` and the folders above it that are missing, from the top down as the path is written (through a
    `..` too, whose folder must exist); returns those it made, the deepest first."""
    made = []
    for depth in range(1, len(folder.parts) + 1):
        part = Path(*folder.parts[:depth])
        try:
            part.mkdir()
        except FileExistsError:  # (there before, or made by another writer meanwhile: not ours to take away)
            continue
        made.insert(0, part)
    return made


def answer_file(args, questions, model, processor) -> int:
    """Answers `questions` (from `read_questions`) into `args.answers_file`; returns the number that failed."""
    # A folder's name (`.`'s and a link's too, not where they lead), or a Hub id's last part.
    model_id = Path(os.path.abspath(args.model)).name
    kwargs = generation_kwargs(args, processor)
    failures = []

    def fail(question_id, error):
        failures.append(question_id)
        tqdm.write(f"question {question_id!r} failed: {error}", file=sys.stderr)

    answers_file = Path(args.answers_file)
    made = _make_folders(answers_file.parent)
    try:
        with (
            replaced_when_done(answers_file) as partial,
            open(partial, "w", encoding="utf-8") as out,
            tqdm(total=len(questions), desc="questions") as progress,
        ):
            for start in range(0, len(questions), args.batch_size):
                batch = []
                for question_id, question in questions[start : start + args.batch_size]:
                    try:
                        if isinstance(question, Exception):
                            raise question
                        image = load_image(Path(args.image_folder) / question["image"])
                        prompt = build_prompt(processor, question["text"], 1, args.system)
                        batch.append((question_id, question["text"], prompt, image))
                    except (OSError, ValueError, TypeError) as error:
                        fail(question_id, error)
                if batch:
                    ids, texts, prompts, images = zip(*batch)
                    try:
                        answers = generate_answers(model, processor, list(prompts), list(images), **kwargs)
                    except (RuntimeError, ValueError) as error:
                        for question_id in ids:
                            fail(question_id, error)
                        answers = []
                    for question_id, text, answer in zip(ids, texts, answers):
                        record = {
                            "question_id": question_id,
                            "prompt": text,
                            "text": answer,
                            "answer_id": uuid.uuid4().hex,
                            "model_id": model_id,
                            "metadata": {},
                        }
                        out.write(json.dumps(record, ensure_ascii=False) + "\n")
                    out.flush()
                progress.update(min(args.batch_size, len(questions) - start))
            if questions and len(failures) == len(questions):
                raise _NothingAnswered
    except _NothingAnswered:
        print(f"no question was answered: {answers_file} is left as it was", file=sys.stderr)
    finally:
        if not answers_file.exists():  # nothing written: the folders made for it go too, unless something is in them
            for folder in made:
                with contextlib.suppress(OSError):
                    folder.rmdir()
    if failures:
        print(f"{len(failures)} of {len(questions)} questions failed: {failures}", file=sys.stderr)
    return len(failures)


def check_batch_files(parser, args):
    """Refuses a missing question file, and an answers file that is a folder, lies under a file or would replace the
    questions."""
    if not Path(args.question_file).exists() or Path(args.question_file).is_dir():  # (a pipe or /dev/null will do)
        parser.error(f"question file not found: {args.question_file}")
    answers = Path(args.answers_file)
    if answers.is_dir():
        parser.error(f"--answers-file {args.answers_file} is a directory")
    if answers.exists() and answers.samefile(args.question_file):
        parser.error(f"--answers-file {args.answers_file} is the question file; it would be overwritten")
    # The answers file's folder is created if missing; the deepest part of its path that exists must be a folder.
    existing = next(folder for folder in answers.parents if folder.exists())
    if not existing.is_dir():
        parser.error(f"--answers-file {args.answers_file}: {existing} is not a directory")


def parse_args(argv=None):
    parser = argparse.ArgumentParser(prog="hyperllava-generate", description=__doc__.split("\n\n")[0])
    parser.add_argument("--model", required=True, help="folder (or Hub id) of a saved HyperLLaVA model and processor")
    single = parser.add_argument_group("one question")
    single.add_argument("--prompt", help="the question")
    single.add_argument("--image", action="append", default=[], metavar="FILE", help="an image (repeatable)")
    batch = parser.add_argument_group("many questions (LLaVA's model_vqa format)")
    batch.add_argument("--question-file", help="JSONL, one {question_id, image, text} per line")
    # No defaults here: an option left out is None, so that one given with --prompt can be refused.
    batch.add_argument("--image-folder", help="folder the questions' `image` paths are relative to (default: .)")
    batch.add_argument("--answers-file", help="JSONL to write the answers to")
    batch.add_argument("--batch-size", type=int, help="questions generated together, left-padded (default: 1)")
    gen = parser.add_argument_group("generation")
    gen.add_argument("--system", help="system line (default: LLaVA-1.5's vicuna_v1 system prompt)")
    gen.add_argument("--max-new-tokens", type=int, default=512)
    gen.add_argument("--temperature", type=float, default=0.0, help="0 for greedy decoding (LLaVA's default)")
    gen.add_argument("--top-p", type=float, default=1.0)
    gen.add_argument("--num-beams", type=int, default=1)
    gen.add_argument("--seed", type=int, default=0)
    gen.add_argument(
        "--device", default="cuda" if torch.cuda.is_available() else "cpu", help='e.g. cpu, cuda, cuda:1, or "auto"'
    )
    dtypes = ["auto", "float32", "bfloat16", "float16"]
    gen.add_argument("--dtype", choices=dtypes, default="auto", help="default: the checkpoint's dtype")
    args = parser.parse_args(argv)
    model_folder = Path(args.model)
    if not model_folder.is_dir():
        try:
            validate_repo_id(args.model)
        except HFValidationError:  # (Transformers would report a mistyped folder as a malformed Hub id)
            parser.error(f"--model {args.model}: not a folder, and not a Hub repo id")
    elif not (model_folder / "config.json").is_file():  # (Transformers would blame the processor)
        stage1 = (model_folder / "mm_projector.safetensors").is_file()
        parser.error(
            f"--model {args.model}: a folder without config.json, not a model"
            + (
                ": stage 1's projector alone; make a model of it with hyperllava-convert --base-model"
                if stage1
                else ""
            )
        )
    if args.device != "auto":
        try:
            device = torch.device(args.device)
        except RuntimeError as error:
            parser.error(f"--device {args.device}: {error}")
        if device.type == "cuda" and not torch.cuda.is_available():
            parser.error(f"--device {args.device}: this machine's torch sees no CUDA device (use --device cpu)")
    if (args.prompt is None) == (args.question_file is None):
        parser.error("give either --prompt (with --image) or --question-file (with --answers-file)")
    if args.question_file is not None and (args.answers_file is None or args.image):
        parser.error("--question-file needs --answers-file, and takes its images from the file, not --image")
    if args.prompt is not None:
        for name in ("answers_file", "image_folder", "batch_size"):
            if getattr(args, name) is not None:
                parser.error(f"--{name.replace('_', '-')} goes with --question-file, not --prompt")
    else:
        check_batch_files(parser, args)
    # The batch options' defaults, once it is known whether they were given.
    args.image_folder = "." if args.image_folder is None else args.image_folder
    args.batch_size = 1 if args.batch_size is None else args.batch_size
    for name in ("max_new_tokens", "num_beams", "batch_size"):
        if getattr(args, name) < 1:
            parser.error(f"--{name.replace('_', '-')} must be at least 1")
    if not args.temperature >= 0 or not 0 < args.top_p <= 1:  # (`not >=`: NaN too)
        parser.error("--temperature must be >= 0 and --top-p in (0, 1]")
    if not 0 <= args.seed < 2**32:  # NumPy's range, which set_seed seeds too
        parser.error("--seed must be in [0, 2**32)")
    for name in ("prompt", "system"):
        if getattr(args, name) is not None and not is_text(getattr(args, name)):
            parser.error(f"--{name} is not valid UTF-8 text")
    if args.top_p < 1 and args.temperature == 0:
        parser.error("--top-p applies to sampling: give a --temperature above 0 too (0 decodes greedily)")
    return args


def load_model(args):
    model = AutoModelForImageTextToText.from_pretrained(args.model, dtype=args.dtype, device_map=args.device)
    return model.eval()


# A job's time limit (SIGTERM) or a closed terminal (SIGHUP) leaves no partial output either, as Ctrl-C does.
@stop_signals_interrupt()
def main(argv=None) -> int:
    args = parse_args(argv)
    set_seed(args.seed)
    try:
        processor = AutoProcessor.from_pretrained(args.model)
    # A Hub id that is not there (or a mistyped local path, taken for one), a folder without a tokenizer: say which.
    except (OSError, ValueError) as error:
        print(f"hyperllava-generate: error: --model {args.model}: {error}", file=sys.stderr)
        return 1
    if not hasattr(processor, "image_processor"):  # (a text model's folder gives a tokenizer alone)
        print(f"hyperllava-generate: error: --model {args.model}: it has no image processor", file=sys.stderr)
        return 1
    if processor.chat_template is None:  # (HyperLLaVA's processor has vicuna_v1's; a LLaVA folder may have none)
        print(
            f"hyperllava-generate: error: --model {args.model}: its processor has no chat template to write the "
            "prompts with",
            file=sys.stderr,
        )
        return 1
    if args.system is not None and processor.image_token in args.system:  # (every prompt would miscount its images)
        print(
            f"hyperllava-generate: error: --system holds {processor.image_token}: images go in the prompt",
            file=sys.stderr,
        )
        return 1
    # Bad input is reported before the (slow) model load.
    if args.question_file is not None:
        try:
            questions = list(read_questions(args.question_file))
        except UnicodeDecodeError as error:
            print(
                f"hyperllava-generate: error: question file {args.question_file} is not UTF-8 text: {error}",
                file=sys.stderr,
            )
            return 1
        if not questions:  # (answered, it would replace the previous answers file with an empty one)
            print(f"hyperllava-generate: error: question file {args.question_file} holds no question", file=sys.stderr)
            return 1
    else:
        try:
            images = [load_image(path) for path in args.image]
            prompt = build_prompt(processor, args.prompt, len(images), args.system)
        except (OSError, ValueError) as error:
            print(f"hyperllava-generate: error: {error}", file=sys.stderr)
            return 1
    try:
        model = load_model(args)
    # No weights, a config without a model_type, a model that is no image-text model: say which folder.
    except (OSError, ValueError) as error:
        print(f"hyperllava-generate: error: --model {args.model}: {error}", file=sys.stderr)
        return 1
    if args.question_file is not None:
        return 1 if answer_file(args, questions, model, processor) else 0
    kwargs = generation_kwargs(args, processor)
    if args.num_beams > 1:  # beam search cannot stream: its best sequence is known only at the end
        print(generate_answers(model, processor, [prompt], images, **kwargs)[0])
    else:
        streamer = TextStreamer(processor.tokenizer, skip_prompt=True, skip_special_tokens=True)
        generate_answers(model, processor, [prompt], images, streamer=streamer, **kwargs)
    return 0


if __name__ == "__main__":
    sys.exit(main())
