import collections
import contextlib
import io
import json
import os
import re
import signal

# Nothing downloads at test time: every model, tokenizer and image is built here.
os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TRANSFORMERS_VERBOSITY", "error")

import pytest  # noqa: E402
import sentencepiece  # noqa: E402
import torch  # noqa: E402
from torch.utils._python_dispatch import TorchDispatchMode  # noqa: E402
from transformers import CompileConfig, LlavaForConditionalGeneration  # noqa: E402

from transformers_hyperllava import HyperLlavaForConditionalGeneration  # noqa: E402
from transformers_hyperllava.tiny import tiny_config  # noqa: E402
from transformers_hyperllava.tiny_tokenizer import DEFAULT_TEXTS, TEMPLATE_TEXT  # noqa: E402

IMAGE_TOKEN = 4
TOKENS_PER_IMAGE = 4  # tiny_config: 28 px images, 14 px patches


def randomize_experts(model, std=0.2, seed=0):
    """Non-zero expert weights, so that the experts really change the output."""
    generator = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for name, param in model.named_parameters():
            if "expert" in name:
                param.copy_(torch.randn(param.shape, generator=generator, dtype=torch.float64) * std)
    return model


def make_model(dtype=torch.float32, seed=0, experts=True, **overrides):
    torch.manual_seed(seed)
    model = HyperLlavaForConditionalGeneration(tiny_config(**overrides)).to(dtype).eval()
    return randomize_experts(model, seed=seed) if experts else model


def prompt_ids(*pieces):
    """Token ids from a compact spec: ints are tokens, "img" is one image's placeholder tokens."""
    ids = [1]
    for piece in pieces:
        ids += [IMAGE_TOKEN] * TOKENS_PER_IMAGE if piece == "img" else [piece]
    return ids


def images(n, seed=0):
    return torch.randn(n, 3, 28, 28, generator=torch.Generator().manual_seed(seed))


def left_pad(sequences, pad=3):
    length = max(map(len, sequences))
    ids = torch.tensor([[pad] * (length - len(s)) + s for s in sequences])
    mask = torch.tensor([[0] * (length - len(s)) + [1] * len(s) for s in sequences])
    return ids, mask


def training_batch():
    ids, mask = left_pad([prompt_ids("img", 10, 11, 20, 21, 2), prompt_ids(12, "img", 13, 14, 15, 22, 2)])
    labels = ids.clone()
    labels[:, :-3] = -100
    return {"input_ids": ids, "attention_mask": mask, "pixel_values": images(2), "labels": labels}


class DispatchedOps(TorchDispatchMode):
    """Counts the ops dispatched inside it, per op (`calls[torch.ops.aten.bmm.default]`, ...)."""

    def __init__(self):
        super().__init__()
        self.calls = collections.Counter()

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        self.calls[func] += 1
        return func(*args, **(kwargs or {}))


@contextlib.contextmanager
def compiled_generation(model, backend="inductor"):
    """`generate` with a static cache then compiles its decoding step, as it does on a GPU, on any device (Transformers'
    `_compile_all_devices` switch) and without a graph break (fullgraph), through `backend`."""
    model.generation_config.compile_config = CompileConfig(backend=backend, fullgraph=True)
    model.generation_config.compile_config._compile_all_devices = True
    torch._dynamo.reset()
    try:
        yield
    finally:
        torch._dynamo.reset()


@contextlib.contextmanager
def recorded_compilation(model):
    """`compiled_generation` through a backend that records Dynamo's graphs and runs them as traced. Yields the list of
    graphs."""
    graphs = []

    # A function, not an object: the compile config is deep-copied on its way. The options (`mode` ...) are Inductor's.
    def backend(graph_module, example_inputs, **options):
        graphs.append(graph_module)
        return graph_module.forward

    with compiled_generation(model, backend):
        yield graphs


def train_sentencepiece(vocab_size=320):
    """A serialised SentencePiece BPE model with Llama's settings (byte fallback, digits split, a dummy prefix, spaces
    kept as they are), trained on the test's sentences."""
    words = " ".join([TEMPLATE_TEXT, *DEFAULT_TEXTS]).split()
    generator = torch.Generator().manual_seed(0)
    lines = [" ".join(words[i] for i in torch.randint(len(words), (12,), generator=generator)) for _ in range(80)]
    model = io.BytesIO()
    sentencepiece.SentencePieceTrainer.train(
        sentence_iterator=iter(lines),
        model_writer=model,
        model_type="bpe",
        vocab_size=vocab_size,  # at least the 256 byte pieces, 3 special pieces and the corpus' characters
        byte_fallback=True,
        split_digits=True,
        add_dummy_prefix=True,
        remove_extra_whitespaces=False,
        normalization_rule_name="identity",
        character_coverage=1.0,
        unk_id=0,
        bos_id=1,
        eos_id=2,
        pad_id=-1,
        num_threads=1,
        minloglevel=2,
    )
    return model.getvalue()


def sentencepiece_vocab_size(model):
    return sentencepiece.SentencePieceProcessor(model_proto=model).get_piece_size()


def write_sentencepiece_tokenizer(folder, model):
    """The tokenizer files of a LLaVA-1.5 release (liuhaotian/llava-v1.5-7b): the SentencePiece model and the slow
    LlamaTokenizer's config, no tokenizer.json."""
    (folder / "tokenizer.model").write_bytes(model)
    token = {"__type": "AddedToken", "lstrip": False, "normalized": False, "rstrip": False, "single_word": False}
    config = {
        "tokenizer_class": "LlamaTokenizer",
        "add_bos_token": True,
        "add_eos_token": False,
        "bos_token": {**token, "content": "<s>"},
        "eos_token": {**token, "content": "</s>"},
        "unk_token": {**token, "content": "<unk>"},
        "pad_token": None,
        "clean_up_tokenization_spaces": False,
        "legacy": False,
        "model_max_length": 2048,
        "padding_side": "right",
        "sp_model_kwargs": {},
    }
    (folder / "tokenizer_config.json").write_text(json.dumps(config))


def compile_for(arch, kernel, args, keywords):
    """Compile a launch's kernel for a CUDA architecture as Triton would at the launch, specialised as Triton
    specialises it on the arguments (16-byte aligned pointers and integers divisible by 16 marked so, an integer 1 made
    a constant), with no GPU needed. The launch's arguments, positional or by keyword, are the kernel's; its other
    keywords are compiler options."""
    import triton
    from triton._C import libtriton
    from triton.backends.compiler import BaseBackend, GPUTarget

    if not hasattr(libtriton, "native_specialize_impl"):  # what a launch runs on each argument
        pytest.skip(f"Triton {triton.__version__} specialises a launch's arguments otherwise than 3.6 and 3.9 do")
    native_specialize_impl = libtriton.native_specialize_impl

    named = {name: value for name, value in keywords.items() if name in kernel.arg_names}
    arguments = dict(zip(kernel.arg_names, args)) | named
    assert len(args) + len(named) == len(arguments) == len(kernel.arg_names), f"{kernel.__name__}: arguments missing"
    options = {name: value for name, value in keywords.items() if name not in kernel.arg_names}
    constexprs = {kernel.arg_names[i]: arguments[kernel.arg_names[i]] for i in kernel.constexprs}
    signature, attributes = {}, {}
    for i, name in enumerate(kernel.arg_names):
        if name in constexprs:
            signature[name] = "constexpr"
            continue
        signature[name], attribute = native_specialize_impl(BaseBackend, arguments[name], False, True, True)
        if signature[name] == "constexpr":  # an integer 1
            constexprs[name] = arguments[name]
        elif attribute:
            attributes[(i,)] = BaseBackend.parse_attr(attribute)
    source = triton.compiler.ASTSource(kernel, signature, constexprs, attributes)
    return triton.compile(source, target=GPUTarget("cuda", arch, 32), options=options)


def ptx_parameters(compiled):
    """The kinds of a compiled kernel's parameters, in order, read off its PTX: "pointer", "32-bit" or "64-bit"."""
    entry = compiled.asm["ptx"].split(".entry", 1)[1].split(")", 1)[0]
    parameters = re.findall(r"\.param \.(\w+)( \.ptr)?", entry)
    return ["pointer" if pointer else f"{size[1:]}-bit" for size, pointer in parameters]


# PyTorch's launcher of Triton's kernels: its letter for each kind of parameter (tensors passed as tensors, "O", or
# as addresses, "K").
LAUNCHER_KINDS = {"O": "pointer", "K": "pointer", "i": "32-bit", "I": "32-bit", "l": "64-bit"}


@pytest.fixture
def tiny_llava():
    """A stock LLaVA with random weights (float64) and the HyperLLaVA config that matches it."""
    config = tiny_config()
    torch.manual_seed(0)
    return LlavaForConditionalGeneration(config.to_llava_config()).double().eval(), config


__all__ = [
    "randomize_experts", "make_model", "prompt_ids", "images", "left_pad", "training_batch", "DispatchedOps",
    "compile_for", "ptx_parameters", "LAUNCHER_KINDS", "compiled_generation", "recorded_compilation", "IMAGE_TOKEN",
    "train_sentencepiece", "sentencepiece_vocab_size", "write_sentencepiece_tokenizer",
]  # fmt: skip


@contextlib.contextmanager
def stop_signals_must_be_caught(program):
    """Within the block, SIGTERM and SIGHUP fail the test if `program` lets them through (their default would end the
    test run); after it, `program`'s handlers must be gone and these back. Also Ctrl-C as in a terminal: a test run
    started in the background by a shell without job control inherits SIGINT ignored."""

    def unhandled(signum, frame):
        raise AssertionError(f"{program} let {signal.Signals(signum).name} through")

    outer = {number: signal.signal(number, unhandled) for number in (signal.SIGTERM, signal.SIGHUP)}
    outer[signal.SIGINT] = signal.signal(signal.SIGINT, signal.default_int_handler)
    try:
        yield
        assert [signal.getsignal(number) for number in outer] == [unhandled, unhandled, signal.default_int_handler]
    finally:
        for number, handler in outer.items():
            signal.signal(number, handler)
