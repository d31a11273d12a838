"""The fused Triton expert adapter against a plain PyTorch computation (forward and backward).

Without a GPU the same kernels run in Triton's CPU interpreter, which must be switched on (`TRITON_INTERPRET=1`)
before Triton is first imported: when the suite did not start that way, `test_kernels_in_triton_interpreter`
runs this file again in a child process that does.
"""

import concurrent.futures
import contextlib
import copy
import functools
import json
import os
import re
import subprocess
import sys
import threading
from types import SimpleNamespace

import numpy
import pytest
import torch
import torch.nn.functional as F
from torch._dynamo.utils import counters
from torch._inductor.utils import run_and_get_code
from torch.utils.flop_counter import FlopCounterMode
from transformers import LlavaForConditionalGeneration

from conftest import (
    IMAGE_TOKEN,
    LAUNCHER_KINDS,
    DispatchedOps,
    compile_for,
    compiled_generation,
    images,
    left_pad,
    make_model,
    prompt_ids,
    ptx_parameters,
    randomize_experts,
    recorded_compilation,
    training_batch,
)
from transformers_hyperllava import HyperLlavaForConditionalGeneration, modeling_hyperllava
from transformers_hyperllava import fused_expert_hyperllava as fused
from transformers_hyperllava.modeling_hyperllava import CACHE_ARG
from transformers_hyperllava.tiny import tiny_config

triton = pytest.importorskip("triton", reason="the fused expert kernel needs Triton (`pip install triton`)")

ON_CUDA = torch.cuda.is_available()
DEVICE = "cuda" if ON_CUDA else "cpu"
# Largest error allowed, relative to the largest reference value: float32 runs exact float32 matmuls.
TOLERANCE = {torch.float32: 2e-5, torch.float16: 5e-3, torch.bfloat16: 3e-2}


INTERPRETED = not ON_CUDA and os.environ.get("TRITON_INTERPRET") == "1"
needs_kernels = pytest.mark.skipif(
    not (ON_CUDA or INTERPRETED), reason="no CUDA: run by test_kernels_in_triton_interpreter with TRITON_INTERPRET=1"
)
# Tests that compile kernels for the GPU (no GPU needed): under TRITON_INTERPRET a kernel is interpreted, not compiled.
compiled_not_interpreted = pytest.mark.skipif(
    INTERPRETED, reason="the parent process runs it: it compiles the kernels"
)


@pytest.mark.skipif(ON_CUDA or INTERPRETED, reason="the kernel tests run directly in this process")
def test_kernels_in_triton_interpreter():
    env = {**os.environ, "TRITON_INTERPRET": "1"}
    command = [sys.executable, "-m", "pytest", __file__, "-q", "-p", "no:cacheprovider", "-k", "not interpreter"]
    result = subprocess.run(command, check=False, env=env, capture_output=True, text=True, timeout=600)
    if result.returncode != 0 and "only 0-dimensional arrays can be converted to Python scalars" in result.stdout:
        # (Triton's interpreter turns a scalar argument into an int as NumPy 2.4 no longer allows: seen with 3.2-3.4
        # and 3.6, torch 2.6-2.8's and 2.11's, the GPU machine's; 3.9's runs. With NumPy 2.3 they pass: 3.3, 3.6.)
        pytest.skip(
            f"Triton {triton.__version__}'s interpreter does not run with NumPy {numpy.__version__}: numpy<2.4"
        )
    assert result.returncode == 0, result.stdout[-5000:] + result.stderr[-2000:]
    assert " passed" in result.stdout.splitlines()[-1], result.stdout[-2000:]


def expert_adapter_reference(x, w_down, w_up, residual, ffn_out=None):
    gate, up = torch.matmul(x, w_down).chunk(2, dim=-1)
    residual = residual if ffn_out is None else residual + ffn_out
    return residual + torch.matmul(F.silu(gate) * up, w_up)


def make_inputs(batch, length, d_in, d_out, r, weight_batch, dtype, residual_dtype=None, seed=0, ffn_dtype=None):
    """x, w_down, w_up, residual, and an FFN output when `ffn_dtype` is given."""
    generator = torch.Generator().manual_seed(seed)

    def randn(*shape, scale=1.0, dtype=dtype):
        return (torch.randn(shape, generator=generator, dtype=torch.float64) * scale).to(DEVICE, dtype)

    inputs = (
        randn(batch, length, d_in),
        randn(weight_batch, d_in, 2 * r, scale=d_in**-0.5),
        randn(weight_batch, r, d_out, scale=r**-0.5),
        randn(batch, length, d_out, dtype=residual_dtype or dtype),
    )
    return inputs if ffn_dtype is None else (*inputs, randn(batch, length, d_out, dtype=ffn_dtype))


def assert_close(got, want, tolerance, what):
    error = (got.double() - want).abs().max().item()
    scale = want.abs().max().item()
    assert error <= tolerance * scale, f"{what}: max error {error:.3g} > {tolerance:g} x max |reference| {scale:.3g}"


def check_against_reference(inputs, tolerance):
    """Forward output and the gradients of all inputs (four, or five with an FFN output), against the reference run
    in float64."""
    inputs = [t.detach().requires_grad_() for t in inputs]
    exact = [t.detach().double().requires_grad_() for t in inputs]
    out = fused.fused_expert_adapter(*inputs)
    want = expert_adapter_reference(*exact)
    assert out.shape == want.shape
    assert out.dtype == functools.reduce(torch.promote_types, (inputs[0].dtype, *(t.dtype for t in inputs[3:])))
    assert_close(out, want, tolerance, "output")

    grad_out = torch.randn(out.shape, generator=torch.Generator().manual_seed(1)).to(DEVICE, out.dtype)
    out.backward(grad_out)
    want.backward(grad_out.double())
    for name, tensor, reference in zip(("x", "w_down", "w_up", "residual", "ffn_out"), inputs, exact):
        assert tensor.grad.dtype == tensor.dtype
        assert_close(tensor.grad, reference.grad, tolerance, f"grad of {name}")


SHAPES = {
    # (batch, length, d_in, d_out, r, weight batch)
    "decode": (1, 1, 64, 200, 16, 1),  # one row: the decode path splits d_in and the output columns
    "decode-batch": (3, 1, 96, 80, 16, 3),  # one weight set per sample
    "odd-broadcast": (4, 5, 33, 47, 7, 1),  # sizes that are not block multiples; one weight set for the batch
    "long": (2, 130, 70, 67, 5, 2),  # several row blocks per sample: the tiled path
    "visual": (2, 9, 24, 40, 4, 2),  # d_in != d_out, like the visual expert; 9 rows per weight set: decode path
}
if ON_CUDA:
    SHAPES["large"] = (4, 1024, 1024, 1024, 16, 4)
    SHAPES["large-broadcast"] = (8, 640, 512, 512, 16, 1)


def cpu_interpreter_skip(dtype):
    if dtype == torch.bfloat16 and not ON_CUDA:
        pytest.skip("Triton's CPU interpreter multiplies bfloat16 tl.dot operands as raw integers; bf16 runs on CUDA")


@needs_kernels
@pytest.mark.parametrize("dtype", [torch.float32, torch.float16, torch.bfloat16], ids=str)
@pytest.mark.parametrize("shape", SHAPES.values(), ids=SHAPES.keys())
def test_matches_reference(shape, dtype):
    cpu_interpreter_skip(dtype)
    check_against_reference(make_inputs(*shape, dtype), TOLERANCE[dtype])


DECODE_SHAPES = {
    # (batch, length, d_in, d_out, r, weight batch): decoding, up to 16 rows per weight set
    "7b-batch1": (1, 1, 4096, 4096, 16, 1),
    "7b-batch16": (16, 1, 4096, 4096, 16, 16),  # one weight set per sequence, as the language expert has
    "7b-batch16-shared": (16, 1, 4096, 4096, 16, 1),  # 16 rows of one weight set
    "odd-batch3": (3, 1, 1000, 777, 16, 3),
    "odd-batch3-shared": (3, 1, 1000, 777, 7, 1),
    "odd-4-tokens": (2, 4, 1000, 777, 5, 2),  # a few tokens per step (assisted decoding)
}


@pytest.fixture
def decode_path_only(monkeypatch):
    """Makes the one-launch tiled forward fail, so that a test passes only through the decode path."""

    def refuse(*args):
        raise AssertionError("the tiled forward ran at a decode shape")

    monkeypatch.setattr(fused, "_tiled_forward", refuse)


@needs_kernels
@pytest.mark.parametrize("dtype", [torch.float32, torch.float16, torch.bfloat16], ids=str)
@pytest.mark.parametrize("shape", DECODE_SHAPES.values(), ids=DECODE_SHAPES.keys())
def test_decode_forward_matches_reference(shape, dtype, decode_path_only):
    """The split-K decode forward at 7B and odd sizes. Forward only: the backward is the one tested above. It uses
    no tl.dot, so bfloat16 runs in the CPU interpreter too."""
    x, w_down, w_up, residual = make_inputs(*shape, dtype)
    out = fused.fused_expert_adapter(x, w_down, w_up, residual)
    assert out.dtype == dtype
    want = expert_adapter_reference(*(t.double() for t in (x, w_down, w_up, residual)))
    assert_close(out, want, TOLERANCE[dtype], "output")


@needs_kernels
@pytest.mark.parametrize("shape", [SHAPES["decode-batch"], SHAPES["long"]], ids=["decode", "tiled"])
def test_without_autograd_the_kernels_launch_without_the_custom_op(shape, monkeypatch):
    """Eager decoding runs without autograd, where the custom op's dispatch would add only host time: the launcher is
    called directly there, with the same result. With autograd on, or under a dispatch mode (which must see the op),
    the call goes through the op, which runs the launcher it was registered with."""
    monkeypatch.setattr(fused, "_DECODE_LAUNCHES", {})  # (a call like an earlier test's would not reach _launch)
    calls = []  # each launch: whether it came straight from fused_expert_adapter (not from the custom op's code)
    launch = fused._launch
    monkeypatch.setattr(
        fused,
        "_launch",
        lambda *args: calls.append(sys._getframe(1).f_code.co_name == "fused_expert_adapter") or launch(*args),
    )
    inputs = make_inputs(*shape, torch.float32, ffn_dtype=torch.float32)
    with torch.no_grad():
        out = fused.fused_expert_adapter(*inputs)
    assert calls == [True]
    assert_close(out, expert_adapter_reference(*(t.double() for t in inputs)), TOLERANCE[torch.float32], "output")
    op = torch.ops.hyperllava.expert_adapter.default
    for mode in (contextlib.nullcontext(), torch.no_grad()):
        fused._DECODE_LAUNCHES.clear()  # (on CUDA the op would launch the kept kernels without reaching _launch)
        with mode, DispatchedOps() as ops:
            assert torch.equal(fused.fused_expert_adapter(*inputs), out)
        assert ops.calls[op] == 1
    assert calls == [True, False, False]


class CountedLaunches:
    """Stands in for a decode kernel: counts its launches through Triton's launcher (`kernel[grid](...)`, which
    compiles it) and those of the compiled kernel that launcher returns. Triton's CPU interpreter compiles nothing (it
    returns None); there the compiled kernel's stand-in launches the interpreted one the way a compiled kernel is
    launched: `compiled[grid](*arguments)`, every argument in the kernel's order, constexprs included, no options."""

    def __init__(self, kernel):
        self.kernel, self.through_triton, self.direct = kernel, 0, 0

    def __getitem__(self, grid):
        def launch(*arguments, **options):
            self.through_triton += 1
            compiled = self.kernel[grid](*arguments, **options)
            return CountedCompiled(self, compiled if ON_CUDA else self.kernel)

        return launch


class CountedCompiled:
    """A compiled kernel's stand-in: its launches by its own launcher counted; the rest is the compiled kernel's (what
    PyTorch's launcher reads off it, which `counted_one_launch` counts)."""

    def __init__(self, counts, compiled):
        self.counts, self.compiled = counts, compiled

    def __getattr__(self, name):
        return getattr(self.compiled, name)

    def __getitem__(self, grid):
        launch = self.compiled[grid]

        def counted(*arguments):
            self.counts.direct += 1
            launch(*arguments)

        return counted


@pytest.fixture
def counted_launches(monkeypatch):
    """The decode kernels, counted (no launches kept from earlier tests): a function that returns how many launches
    went through Triton's launcher and how many launched the compiled kernels directly."""
    monkeypatch.setattr(fused, "_DECODE_LAUNCHES", {})
    down, up = CountedLaunches(fused._decode_down_kernel), CountedLaunches(fused._decode_up_kernel)
    monkeypatch.setattr(fused, "_decode_down_kernel", down)
    monkeypatch.setattr(fused, "_decode_up_kernel", up)

    def launches():
        assert down.through_triton == up.through_triton and down.direct == up.direct
        return down.through_triton, down.direct

    return launches


@needs_kernels
@pytest.mark.parametrize("ffn_dtype", [None, torch.float32], ids=["residual", "ffn"])
def test_a_decode_call_like_an_earlier_one_launches_the_compiled_kernels_directly(counted_launches, ffn_dtype):
    """Eager decoding makes the same call at every step and layer, and its time is host time. The first call with a
    signature goes through Triton's launcher; later ones (outside autograd or through the custom op) launch the kernels
    it compiled, with the same result. A call that differs in what the kernels are specialised on or what the op would
    cast (which pointers are 16-byte aligned, autocast) goes through Triton again."""
    launches = counted_launches

    def check(inputs, out, dtype=torch.bfloat16):
        assert_close(out, expert_adapter_reference(*(t.double() for t in inputs)), TOLERANCE[dtype], "output")

    first, second = (make_inputs(*SHAPES["decode-batch"], torch.bfloat16, seed=s, ffn_dtype=ffn_dtype) for s in (0, 1))
    with torch.no_grad():
        outs = [fused.fused_expert_adapter(*inputs) for inputs in (first, second, first)]
    assert launches() == (1, 2)
    assert torch.equal(outs[2], outs[0])
    assert outs[0].dtype == (torch.bfloat16 if ffn_dtype is None else ffn_dtype)
    check(first, outs[0])
    check(second, outs[1])
    assert torch.equal(fused.fused_expert_adapter(*second), outs[1])  # autograd on: through the op
    assert launches() == (1, 3)

    def unaligned(tensor):  # the same values, 2 bytes past a 16-byte boundary
        storage = torch.empty(tensor.numel() + 1, dtype=tensor.dtype, device=tensor.device)
        return storage[1:].view(tensor.shape).copy_(tensor)

    x, w_down = first[:2]
    with torch.no_grad():
        assert torch.equal(fused.fused_expert_adapter(unaligned(x), *first[1:]), outs[0])
        assert launches() == (2, 3)
        assert torch.equal(fused.fused_expert_adapter(x, unaligned(w_down), *first[2:]), outs[0])
        assert launches() == (3, 3)
        with torch.autocast(DEVICE, dtype=torch.float16):  # x is cast to float16
            out = fused.fused_expert_adapter(*first)
    assert launches() == (4, 3)
    check(first, out, torch.float16)
    assert out.dtype == torch.float32  # float16 x with a bfloat16 residual


@needs_kernels
def test_a_direct_launch_needs_the_autocast_dtype_of_the_call_that_compiled_it(counted_launches):
    """Under autocast the op computes in autocast's dtype: float16 inputs under bfloat16 autocast are cast to bfloat16,
    so they cannot reuse the launches of the same inputs under float16 autocast, where nothing was cast."""
    x, w_down, w_up, residual = make_inputs(*SHAPES["decode-batch"], torch.float16)
    with torch.no_grad():
        with torch.autocast(DEVICE, dtype=torch.float16):
            fused.fused_expert_adapter(x, w_down, w_up, residual)
        with torch.autocast(DEVICE, dtype=torch.bfloat16):
            out = fused.fused_expert_adapter(x, w_down, w_up, residual)
    assert counted_launches() == (2, 0)
    assert out.dtype == torch.float32  # bfloat16 x with the float16 residual
    assert_close(out, expert_adapter_reference(x.double(), w_down.double(), w_up.double(), residual.double()),
                 TOLERANCE[torch.bfloat16], "output")  # fmt: skip


@needs_kernels
@pytest.mark.parametrize("cast", ["weights", "w_up", "autocast"])
def test_the_custom_op_keeps_launches_only_for_what_fused_expert_adapter_would_not_cast(cast, counted_launches):
    """`torch.ops.hyperllava.expert_adapter` casts nothing, and a compiled graph's code or anyone may call it. Its
    launches are kept only for inputs that `fused_expert_adapter` would hand over as they are: after the op's call
    with float32 weights (or only a float32 w_up) and float16 x, or with float16 inputs under bfloat16 autocast,
    `fused_expert_adapter` with the same inputs must still cast them, and compute as it does with the cast inputs."""
    x, w_down, w_up, residual = make_inputs(*SHAPES["decode-batch"], torch.float16)
    if cast != "autocast":
        w_up = w_up.float()
        w_down = w_down.float() if cast == "weights" else w_down
    autocast = torch.autocast(DEVICE, dtype=torch.bfloat16) if cast == "autocast" else contextlib.nullcontext()
    with torch.no_grad():
        with autocast:
            torch.ops.hyperllava.expert_adapter(x, w_down, w_up, residual, None)
            out = fused.fused_expert_adapter(x, w_down, w_up, residual)
        assert counted_launches() == (2, 0)  # (the second with the inputs cast: other launches)
        dtype = torch.bfloat16 if cast == "autocast" else torch.float16
        assert torch.equal(out, fused.fused_expert_adapter(x.to(dtype), w_down.to(dtype), w_up.to(dtype), residual))


@needs_kernels
def test_the_custom_op_checks_its_inputs_once_per_signature(counted_launches, monkeypatch):
    """Anyone may call `torch.ops.hyperllava.expert_adapter`: it checks what it is given, as `fused_expert_adapter`
    does, and a later call with the same signature launches the kept kernels without checking again."""
    checks = []
    monkeypatch.setattr(
        fused, "_check_inputs", lambda *inputs, check=fused._check_inputs: checks.append(check(*inputs))
    )
    inputs = make_inputs(*SHAPES["decode-batch"], torch.float16)
    with torch.no_grad():
        outs = [torch.ops.hyperllava.expert_adapter(*inputs, None) for _ in range(2)]
        assert counted_launches() == (1, 1) and len(checks) == 1
        assert torch.equal(outs[1], outs[0])
        x, _, _, residual = make_inputs(4, 1, 64, 48, 8, 4, torch.float32)
        _, w_down, w_up, _ = make_inputs(4, 1, 64, 48, 8, 2, torch.float32)
        with pytest.raises(ValueError, match="weights' batch size 2 must be 1 or x's batch size 4"):
            torch.ops.hyperllava.expert_adapter(x, w_down, w_up, residual, None)


@needs_kernels
def test_a_compiled_graph_launches_the_decode_kernels_of_its_earlier_calls_directly(counted_launches, monkeypatch):
    """Without CUDA graphs a compiled decoding step is host time at every step, as eager decoding is: the custom op it
    calls launches the kernels of its first call directly from then on."""
    launched = []
    monkeypatch.setattr(fused, "_launch", lambda *args, launch=fused._launch: launched.append(1) or launch(*args))
    compiled = torch.compile(fused.fused_expert_adapter, fullgraph=True)
    inputs = make_inputs(*SHAPES["decode-batch"], torch.bfloat16)
    with torch.no_grad():
        outs = [compiled(*inputs) for _ in range(3)]
    assert counted_launches() == (1, 2) and len(launched) == 1  # (the later calls skip the checks and the set-up too)
    assert torch.equal(outs[1], outs[0]) and torch.equal(outs[2], outs[0])
    assert_close(outs[0], expert_adapter_reference(*(t.double() for t in inputs)), TOLERANCE[torch.bfloat16], "out")


@needs_kernels
@pytest.mark.parametrize(
    "dtypes",
    [
        (torch.float16, torch.float16, torch.float16),
        (torch.float16, torch.float32, torch.float16),  # autocast keeps a float32 residual stream
        (torch.float32, torch.float16, torch.float16),  # the sum is rounded to float16, though the output is float32
    ],
    ids=["float16", "autocast", "wider-input"],  # (x, residual, FFN output)
)
@pytest.mark.parametrize("shape", [SHAPES["decode-batch"], SHAPES["long"]], ids=["decode", "tiled"])
def test_ffn_output_is_added_as_pytorch_adds_it(shape, dtypes):
    """With the FFN's output passed in, the result is bit for bit what the kernel gives for the residual that PyTorch's
    `residual + ffn_out` computes (rounded to its dtype first), and it gets its gradient."""
    x_dtype, residual_dtype, ffn_dtype = dtypes
    inputs = make_inputs(*shape, x_dtype, residual_dtype=residual_dtype, ffn_dtype=ffn_dtype)
    x, w_down, w_up, residual, ffn_out = inputs
    assert torch.equal(
        fused.fused_expert_adapter(x, w_down, w_up, residual, ffn_out),
        fused.fused_expert_adapter(x, w_down, w_up, residual + ffn_out),
    )
    check_against_reference(inputs, TOLERANCE[torch.float16])


@needs_kernels
def test_wider_residual_and_weights():
    """A float32 residual stream with a half-precision adapter (autocast): the output keeps float32, the float32
    weights are cast to the adapter's dtype, and every gradient comes back in its input's dtype."""
    x, w_down, w_up, residual = make_inputs(2, 3, 40, 40, 8, 2, torch.float16, residual_dtype=torch.float32)
    check_against_reference((x, w_down.float(), w_up.float(), residual), TOLERANCE[torch.float16])


@needs_kernels
@pytest.mark.parametrize("shape", [SHAPES["decode-batch"], SHAPES["long"]], ids=["decode", "tiled"])
def test_under_autocast_the_kernels_compute_as_the_eager_adapter(shape):
    """A float32 input under autocast: the eager adapter's matmuls run in autocast's dtype, and so do the kernels. With
    a half-precision residual (a Linear's output under autocast), both give half precision, and the same gradients."""
    inputs = make_inputs(*shape, torch.float32, residual_dtype=torch.float16)
    results = {}
    for kernel in ("eager", "triton"):
        leaves = [t.detach().requires_grad_() for t in inputs]
        with torch.autocast(DEVICE, dtype=torch.float16):
            out = modeling_hyperllava.expert_adapter(*leaves, kernel=kernel)
        out.backward(torch.ones_like(out))
        results[kernel] = out, [t.grad for t in leaves]
    (got, got_grads), (want, want_grads) = results["triton"], results["eager"]
    assert got.dtype == want.dtype == torch.float16
    assert_close(got, want.double(), TOLERANCE[torch.float16], "output")
    for name, got_grad, want_grad in zip(("x", "w_down", "w_up", "residual"), got_grads, want_grads, strict=True):
        assert got_grad.dtype == want_grad.dtype
        assert_close(got_grad, want_grad.double(), TOLERANCE[torch.float16], f"grad of {name}")


@needs_kernels
def test_an_empty_batch_and_vmap_without_autograd():
    """Shapes and transforms a caller may hand over: a batch of no samples (with no weight set), and torch.func.vmap
    over the batch outside autograd (whose tensors the direct launch cannot read)."""
    x, w_down, w_up, residual = make_inputs(0, 4, 17, 3, 2, 0, torch.float32)
    leaves = [t.detach().requires_grad_() for t in (x, w_down, w_up, residual)]
    out = fused.fused_expert_adapter(*leaves)
    assert out.shape == (0, 4, 3)
    out.sum().backward()
    assert [t.grad.shape for t in leaves] == [t.shape for t in leaves]

    inputs = make_inputs(*SHAPES["decode-batch"], torch.float32)

    def one_sample(*tensors):
        return fused.fused_expert_adapter(*(t.unsqueeze(0) for t in tensors)).squeeze(0)

    with torch.no_grad():
        got = torch.func.vmap(one_sample)(*inputs)
    assert_close(got, expert_adapter_reference(*(t.double() for t in inputs)), TOLERANCE[torch.float32], "vmap")


@needs_kernels
def test_non_contiguous_inputs():
    """Transposed views (as a model may hand over) give the same result as their contiguous copies."""
    x, w_down, w_up, residual = make_inputs(2, 6, 40, 24, 4, 2, torch.float32)
    views = (x.transpose(1, 2).contiguous().transpose(1, 2), w_down.transpose(1, 2).contiguous().transpose(1, 2),
             w_up, residual.transpose(0, 1).contiguous().transpose(0, 1))  # fmt: skip
    assert not any(view.is_contiguous() for view in (views[0], views[1], views[3]))
    check_against_reference(views, TOLERANCE[torch.float32])


@needs_kernels
@pytest.mark.parametrize("shape", [SHAPES["decode-batch"], SHAPES["long"]], ids=["decode", "tiled"])
def test_weights_read_in_place_from_all_layers_weights(shape):
    """The language expert hands each layer a view into one (batch, layers, P) tensor of generated weights, whose
    batch stride spans every layer's weights. The kernels read such views in place (no copy per decoding step) and
    give the reference's output and gradients."""
    _, _, d_in, d_out, r, _ = shape
    per_layer = [make_inputs(*shape, torch.float32, seed=layer) for layer in range(3)]
    generated = torch.stack([torch.cat([w_d.flatten(1), w_u.flatten(1)], 1) for _, w_d, w_u, _ in per_layer], 1)
    num_down = d_in * 2 * r
    w_down = generated[..., :num_down].unflatten(-1, (d_in, 2 * r))[:, 1]
    w_up = generated[..., num_down:].unflatten(-1, (r, d_out))[:, 1]
    assert not w_down.is_contiguous() and not w_up.is_contiguous()
    assert fused._matrices_contiguous(w_down) is w_down and fused._matrices_contiguous(w_up) is w_up
    x, _, _, residual = per_layer[1]
    check_against_reference((x, w_down, w_up, residual), TOLERANCE[torch.float32])


@needs_kernels
def test_compiles_without_graph_breaks():
    x, w_down, w_up, residual = make_inputs(2, 5, 32, 24, 4, 2, torch.float32)

    def block(x, w_down, w_up, residual):
        return fused.fused_expert_adapter(torch.tanh(x), w_down, w_up, residual) * 2

    def reference(x, w_down, w_up, residual):
        return expert_adapter_reference(torch.tanh(x), w_down, w_up, residual) * 2

    # Inductor's CPU backend would spend its time compiling C++; aot_eager traces the same graph and autograd.
    compiled = torch.compile(block, fullgraph=True, backend="inductor" if ON_CUDA else "aot_eager")
    check_compiled = [t.detach().requires_grad_() for t in (x, w_down, w_up, residual)]
    exact = [t.detach().double().requires_grad_() for t in (x, w_down, w_up, residual)]
    out = compiled(*check_compiled)
    want = reference(*exact)
    assert_close(out, want, TOLERANCE[torch.float32], "compiled output")
    out.sum().backward()
    want.sum().backward()
    for tensor, reference_tensor in zip(check_compiled, exact):
        assert_close(tensor.grad, reference_tensor.grad, TOLERANCE[torch.float32], "compiled gradient")


FUSED_FORWARD, FUSED_BACKWARD = torch.ops.hyperllava.expert_adapter, torch.ops.hyperllava.expert_adapter_backward


@needs_kernels
def test_expert_kernel_triton_runs_every_adapter_of_the_model_through_the_fused_op():
    """`expert_kernel="triton"`: both visual adapters and every language-expert layer run the fused op, forward and
    backward, and the model computes what the same weights compute with the eager adapter."""
    models = {
        kernel: make_model(visual_expert="both", expert_kernel=kernel).to(DEVICE) for kernel in ("eager", "triton")
    }
    models["triton"].load_state_dict(models["eager"].state_dict())
    batch = {name: tensor.to(DEVICE) for name, tensor in training_batch().items()}
    outputs = {}
    for kernel, model in models.items():
        with DispatchedOps() as dispatched:
            outputs[kernel] = model(**batch)
            outputs[kernel].loss.backward()
        adapters = 2 + len(model.config.language_expert_layer_indices) if kernel == "triton" else 0
        assert dispatched.calls[FUSED_FORWARD.default] == adapters
        assert dispatched.calls[FUSED_BACKWARD.default] == adapters
    assert_close(outputs["triton"].logits, outputs["eager"].logits.double(), 1e-5, "logits")
    # (Some vision parameters get none: LLaVA-1.5 reads the vision tower's second-to-last layer.)
    gradients = {name: p.grad for name, p in models["triton"].named_parameters() if p.grad is not None}
    references = {name: p.grad.double() for name, p in models["eager"].named_parameters() if p.grad is not None}
    assert gradients.keys() == references.keys()
    largest = max(reference.abs().max() for reference in references.values())
    for name, reference in references.items():
        # Gradients that vanish analytically (a key bias: softmax ignores it) are rounding noise; an absolute floor.
        error = (gradients[name].double() - reference).abs().max()
        assert error <= 1e-4 * reference.abs().max() + 1e-7 * largest, f"gradient of {name}: max error {error:.3g}"


@needs_kernels
def test_eager_generation_launches_every_decoding_steps_kernels_directly(counted_launches):
    """In `generate` every expert layer's call at every decoding step has one signature (each layer's weights are views
    of the generated tensor at the same strides), so after the first step's first layer every decode launch is
    direct. (The tiny model's visual experts, 4 image tokens per image, take the decode path at the prefill too.)"""
    model = make_model(expert_kernel="triton").to(DEVICE)
    ids = torch.tensor([prompt_ids("img", 5, 6, 7)], device=DEVICE)
    kwargs = {"input_ids": ids, "pixel_values": images(1).to(DEVICE), "do_sample": False}
    model.generate(**kwargs, max_new_tokens=1)  # the prefill alone
    through_triton, direct = counted_launches()
    model.generate(**kwargs, max_new_tokens=6)  # the same prefill again, then 5 decoding steps
    prefill_calls, step_calls = through_triton + direct, len(model.config.language_expert_layer_indices)
    assert counted_launches() == (through_triton + 1, direct + prefill_calls + 5 * step_calls - 1)


@needs_kernels
@pytest.mark.parametrize("beside_ffn", [True, False], ids=["beside-ffn", "after-ffn"])
def test_auto_uses_the_fused_kernels_for_the_compiled_decoding_step(beside_ffn, monkeypatch):
    """`expert_kernel="auto"` (the default) puts the fused kernels in the graph `generate` compiles for the decoding
    steps, forked beside the FFN (`ADAPTER_BESIDE_FFN`, the default) or as the fused op after it, and keeps the eager
    adapter outside it (the prefill), with the tokens of eager generation."""
    if not ON_CUDA:  # the interpreter runs the kernels on CPU tensors; "auto" otherwise picks them on CUDA only
        monkeypatch.setattr(modeling_hyperllava, "fused_kernel_available", lambda device: True)
    monkeypatch.setattr(modeling_hyperllava, "ADAPTER_BESIDE_FFN", beside_ffn)
    model = make_model().to(DEVICE)
    assert model.config.expert_kernel == "auto"
    ids = torch.tensor([prompt_ids("img", 10, 11, 12), prompt_ids(13, "img", 14, 15)], device=DEVICE)
    kwargs = {"input_ids": ids, "pixel_values": images(2).to(DEVICE), "max_new_tokens": 4, "do_sample": False}
    with DispatchedOps() as dispatched:  # (a dispatch mode cannot wrap a compiled call, so the eager part alone)
        expected = model.generate(**kwargs)  # eager: the prefill and every step with the eager adapter
    assert dispatched.calls[FUSED_FORWARD.default] == 0
    with recorded_compilation(model) as graphs:
        compiled = model.generate(**kwargs, cache_implementation="static")
    assert len(graphs) == 1
    nodes = graphs[0].graph.nodes
    op = torch.ops.hyperllava.expert_adapter_fork if beside_ffn else FUSED_FORWARD
    fused_calls = [node for node in nodes if node.target in (op, op.default)]  # as called
    assert len(fused_calls) == len(model.config.language_expert_layer_indices)
    assert not [node for node in nodes if node.target is torch.bmm]  # no eager adapter left in the graph
    assert torch.equal(compiled, expected)


def compiled_decoding_step_code(model):
    """The code Inductor generates for the decoding step that `generate` compiles (static cache; on any device)."""
    ids = torch.tensor([prompt_ids(10, 11, 12)], device=DEVICE)
    with compiled_generation(model):
        _, codes = run_and_get_code(
            model.generate, input_ids=ids, max_new_tokens=3, do_sample=False, cache_implementation="static"
        )
    (code,) = codes
    # The kernels' sources come first, then the calls: in `call`, and on CUDA also in the functions `partition_N` before
    # it (Inductor's graph partitions, each captured as a CUDA graph).
    return code[min(code.index(start) for start in ("def partition_0(", "def call(") if start in code) :]


@needs_kernels
def test_the_fused_op_adds_no_other_kernel_to_the_compiled_decoding_step(monkeypatch):
    """Inductor's code for a decoding step launches the same generated kernels as LLaVA's, plus one fused op per expert
    layer: each layer's residual add goes into the fused op rather than into a kernel of its own (LLaVA's graph fuses
    that add into the next layer's RMSNorm; a custom op's input cannot be fused). (The form after the FFN: with
    autocast, say.)"""
    if not ON_CUDA:
        monkeypatch.setattr(modeling_hyperllava, "fused_kernel_available", lambda device: True)
    monkeypatch.setattr(modeling_hyperllava, "ADAPTER_BESIDE_FFN", False)
    torch.manual_seed(0)
    config = tiny_config()
    llava = LlavaForConditionalGeneration(config.to_llava_config()).to(DEVICE).eval()
    hyper = randomize_experts(HyperLlavaForConditionalGeneration.from_llava(llava))
    generated_kernel = re.compile(r"^\s+(cpp_fused_\w+|triton_\w+\.run)\(", re.M)  # Inductor's C++ / Triton kernels
    llava_code, hyper_code = compiled_decoding_step_code(llava), compiled_decoding_step_code(hyper)
    assert generated_kernel.findall(llava_code)  # (the pattern finds the kernel calls of this release and device)
    assert len(generated_kernel.findall(hyper_code)) == len(generated_kernel.findall(llava_code))
    fused_calls = re.findall(r"= torch\.ops\.hyperllava\.expert_adapter\.default\(", hyper_code)
    assert len(fused_calls) == len(config.language_expert_layer_indices)


@needs_kernels
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16], ids=str)
@pytest.mark.parametrize(
    "shape",
    [SHAPES["decode-batch"], DECODE_SHAPES["odd-batch3-shared"], DECODE_SHAPES["7b-batch1"]],
    ids=["batch", "shared", "7b"],
)
def test_the_adapter_beside_the_ffn_adds_what_the_eager_adapter_adds(shape, dtype):
    """`residual + ffn(x) + E(x)` with E(x) forked to the side stream before the FFN and joined after it (on CUDA the
    two run concurrently; the FFN here is long enough to outlast the adapter)."""
    batch, length, d_in, d_out, r, weight_batch = shape
    x, w_down, w_up, residual = make_inputs(batch, length, d_in, d_out, r, weight_batch, dtype)
    ffn_weight = torch.randn(d_in, d_out, dtype=torch.float64).to(DEVICE, dtype) * d_in**-0.5

    def ffn(inputs):
        for _ in range(20):  # (queued after the fork: the side stream's kernels run meanwhile)
            out = inputs @ ffn_weight
        return out

    with torch.no_grad():
        got = fused.expert_adapter_beside_ffn(x, w_down, w_up, residual, ffn)
    want = expert_adapter_reference(*(t.double() for t in (x, w_down, w_up, residual)), ffn(x).double())
    assert got.dtype == dtype
    assert_close(got, want, TOLERANCE[dtype], "beside the FFN")


@needs_kernels
def test_with_autograd_auto_keeps_the_adapter_after_the_ffn(monkeypatch):
    """The ops beside the FFN have no backward: in a compiled training step of short sequences (decoding shapes)
    "auto" keeps the fused op, whose gradients are the eager adapter's."""
    monkeypatch.setattr(modeling_hyperllava, "fused_kernel_available", lambda device: True)
    monkeypatch.setattr(modeling_hyperllava, "ADAPTER_BESIDE_FFN", True)
    monkeypatch.setattr(torch.compiler, "is_compiling", lambda: True)  # (as inside a compiled graph)
    x, w_down, w_up, residual = make_inputs(*SHAPES["decode-batch"], torch.float32)
    ffn_weight = torch.randn(x.shape[-1], residual.shape[-1], device=DEVICE)
    w_down.requires_grad_()
    modeling_hyperllava.expert_adapter(
        x, w_down, w_up, residual, kernel="auto", ffn=lambda t: t @ ffn_weight
    ).sum().backward()
    reference = w_down.detach().double().requires_grad_()
    ffn_out = (x @ ffn_weight).double()
    expert_adapter_reference(x.double(), reference, w_up.double(), residual.double(), ffn_out).sum().backward()
    assert_close(w_down.grad, reference.grad, TOLERANCE[torch.float32], "grad w_down")


@pytest.mark.parametrize("grad", [False, True], ids=["decoding", "training"])
def test_auto_keeps_the_eager_adapter_for_a_dtype_the_kernels_do_not_take(grad, monkeypatch):
    """A float64 model (a reference run, say) on a GPU: inside a compiled graph "auto" keeps the eager adapter rather
    than pick the fused kernels, which refuse float64."""
    monkeypatch.setattr(modeling_hyperllava, "fused_kernel_available", lambda device: True)
    monkeypatch.setattr(torch.compiler, "is_compiling", lambda: True)  # (as inside a compiled graph)
    x, w_down, w_up, residual = make_inputs(*SHAPES["decode-batch"], torch.float32)
    x, w_down, w_up, residual = (t.double() for t in (x, w_down, w_up, residual))
    ffn_weight = torch.randn(x.shape[-1], residual.shape[-1], device=DEVICE, dtype=torch.float64)
    with torch.set_grad_enabled(grad):
        got = modeling_hyperllava.expert_adapter(
            x, w_down, w_up, residual, kernel="auto", ffn=lambda t: t @ ffn_weight
        )
    assert_close(got, expert_adapter_reference(x, w_down, w_up, residual, x @ ffn_weight), 1e-12, "float64")


@pytest.mark.skipif(not ON_CUDA, reason="streams need CUDA")
def test_beside_the_ffn_the_adapter_kernels_run_on_another_stream_than_the_ffn(tmp_path):
    x, w_down, w_up, residual = make_inputs(1, 1, 4096, 4096, 16, 1, torch.bfloat16)
    ffn_weight = torch.randn(4096, 4096, device=DEVICE, dtype=torch.bfloat16) / 64

    def step():
        return fused.expert_adapter_beside_ffn(x, w_down, w_up, residual, lambda inputs: inputs @ ffn_weight)

    with torch.no_grad():
        step()  # compiles the kernels
        torch.cuda.synchronize()
        with torch.profiler.profile(activities=[torch.profiler.ProfilerActivity.CUDA]) as profiler:
            step()
            torch.cuda.synchronize()
    profiler.export_chrome_trace(str(tmp_path / "trace.json"))
    kernels = [
        event
        for event in json.loads((tmp_path / "trace.json").read_text())["traceEvents"]
        if event.get("cat") == "kernel"
    ]
    ours = {event["args"]["stream"] for event in kernels if "_decode_" in event["name"]}
    others = {event["args"]["stream"] for event in kernels if "_decode_" not in event["name"]}  # the matmul among them
    assert len(ours) == 1 and others - ours, (ours, others)


def test_each_thread_forks_the_adapter_to_a_side_stream_of_its_own(monkeypatch):
    """A stream joins one CUDA graph capture at a time, and two threads may capture at once on one device (a server
    with a compiled model per thread): each gets its own side stream, and keeps it from call to call."""
    monkeypatch.setattr(fused, "_SIDE_STREAMS", threading.local())
    monkeypatch.setattr(torch.cuda, "Stream", lambda device, priority: object())  # (stand-ins: no CUDA needed)
    device = torch.device("cuda", 0)
    mine = fused._side_stream(device)
    with concurrent.futures.ThreadPoolExecutor(1) as pool:
        others = pool.submit(lambda: (fused._side_stream(device), fused._side_stream(device))).result()
    assert fused._side_stream(device) is mine
    assert others[0] is others[1] and others[0] is not mine
    assert fused._side_stream(torch.device("cuda", 1)) is not mine


@pytest.mark.skipif(not ON_CUDA, reason="CUDA graphs need CUDA")
def test_the_adapter_beside_the_ffn_is_captured_with_its_stream_in_a_cuda_graph():
    """The fork and the join are captured as a branch of the graph, and its replay reads new inputs."""
    *static, residual = make_inputs(4, 1, 256, 256, 16, 4, torch.bfloat16)
    ffn_weight = torch.randn(256, 256, device=DEVICE, dtype=torch.bfloat16) / 16

    def step():
        return fused.expert_adapter_beside_ffn(*static, residual, lambda inputs: inputs @ ffn_weight)

    with torch.no_grad():
        step()  # compiles the kernels outside the capture
        torch.cuda.synchronize()
        graph = torch.cuda.CUDAGraph()
        with torch.cuda.graph(graph):
            out = step()
    fresh = make_inputs(4, 1, 256, 256, 16, 4, torch.bfloat16, seed=5)
    for target, source in zip([*static, residual], fresh):
        target.copy_(source)
    graph.replay()
    fresh = [t.double() for t in fresh]
    want = expert_adapter_reference(*fresh, fresh[0] @ ffn_weight.double())
    assert_close(out, want, TOLERANCE[torch.bfloat16], "replay")


@needs_kernels
def test_beside_the_ffn_the_compiled_decoding_step_forks_before_the_ffn_and_joins_after_it(monkeypatch):
    """With `ADAPTER_BESIDE_FFN` (the default), each expert layer of the compiled decoding step forks the adapter to
    the side stream before the FFN's three GEMMs and joins it after them, with nothing copied for it and no kernel more
    than LLaVA's (the final add goes into the next RMSNorm's kernel, as LLaVA's residual add does), and generates
    eager generation's tokens."""
    if not ON_CUDA:
        monkeypatch.setattr(modeling_hyperllava, "fused_kernel_available", lambda device: True)
    monkeypatch.setattr(modeling_hyperllava, "ADAPTER_BESIDE_FFN", True)
    torch.manual_seed(0)
    config = tiny_config()
    llava = LlavaForConditionalGeneration(config.to_llava_config()).to(DEVICE).eval()
    hyper = randomize_experts(HyperLlavaForConditionalGeneration.from_llava(llava))
    generated_kernel = re.compile(r"^\s+(cpp_fused_\w+|triton_\w+\.run)\(", re.M)
    llava_code, hyper_code = compiled_decoding_step_code(llava), compiled_decoding_step_code(hyper)
    assert len(generated_kernel.findall(hyper_code)) == len(generated_kernel.findall(llava_code))
    assert "hyperllava.expert_adapter.default" not in hyper_code
    calls = re.findall(r"hyperllava\.expert_adapter_(fork|join)\.default\(|extern_kernels\.(mm)\(", hyper_code)
    order = "".join(fork_or_join[0] if fork_or_join else "m" for fork_or_join, mm in calls)
    layers = len(config.language_expert_layer_indices)
    assert order.count("f") == order.count("j") == layers
    assert re.fullmatch(r"(m|fmmmj)*", order), order  # (m: a GEMM; each fork, the FFN's 3 GEMMs, its join)
    # The FFN reads the buffer the fork was given (nothing was copied to order them), and the join takes it too (its
    # memory is kept until the current stream has waited for the side stream that reads it).
    forked = re.findall(
        r"expert_adapter_fork\.default\((buf\d+),.*\n(?:.*\n)*?.*extern_kernels\.mm\(\w+\((\w+),"
        r"(?:.*\n)*?.*expert_adapter_join\.default\((.*)\)\n",
        hyper_code,
    )
    assert len(forked) == layers, forked
    for fork_input, ffn_input, join_arguments in forked:
        assert fork_input == ffn_input and re.search(rf"\[{fork_input}, ", join_arguments), (
            fork_input,
            join_arguments,
        )

    ids = torch.tensor([prompt_ids(10, 11, 12)], device=DEVICE)
    kwargs = {"input_ids": ids, "max_new_tokens": 4, "do_sample": False}
    expected = hyper.generate(**kwargs)
    skipped = counters["inductor"]["cudagraph_skips"]
    with compiled_generation(hyper):
        assert torch.equal(hyper.generate(**kwargs, cache_implementation="static"), expected)
    if ON_CUDA:  # the step still runs as a CUDA graph (on a CPU, Inductor skips them all)
        assert counters["inductor"]["cudagraph_skips"] == skipped


@pytest.mark.skipif(not ON_CUDA, reason="CUDA graphs need CUDA")
def test_cuda_graph_replay():
    """No host synchronisation inside: the op can be captured once and replayed on new inputs."""
    static = make_inputs(4, 1, 256, 256, 16, 4, torch.bfloat16)
    fused.fused_expert_adapter(*static)  # compile the kernel outside the capture
    torch.cuda.synchronize()
    graph = torch.cuda.CUDAGraph()
    with torch.cuda.graph(graph):
        out = fused.fused_expert_adapter(*static)
    fresh = make_inputs(4, 1, 256, 256, 16, 4, torch.bfloat16, seed=5)
    for target, source in zip(static, fresh):
        target.copy_(source)
    graph.replay()
    assert_close(out, expert_adapter_reference(*(t.double() for t in fresh)), TOLERANCE[torch.bfloat16], "replay")


LAUNCHED_KERNELS = (
    "_forward_kernel", "_decode_down_kernel", "_decode_up_kernel", "_backward_rows_kernel", "_rows_reduction_kernel",
    "_decode_add_kernel",
)  # fmt: skip


class RecordedLaunch:
    """Stands in for a kernel: `kernel[grid](*args, **keywords)` records the launch instead of running it."""

    def __init__(self, kernel, calls):
        self.kernel, self.calls = kernel, calls

    def __getitem__(self, grid):
        return lambda *args, **keywords: self.calls.append((self.kernel, args, keywords))


def set_kernel(model, kernel):
    for module in model.modules():
        if hasattr(module, "expert_kernel"):
            module.expert_kernel = kernel
    return model


def greedy(model, kernel, **kwargs):
    set_kernel(model, kernel)
    out = model.generate(**kwargs, do_sample=False, output_logits=True, return_dict_in_generate=True)
    return out.sequences, torch.stack(out.logits)


def decoding_batch(batch):
    ids, mask = left_pad([prompt_ids("img", 10, 11, 12), prompt_ids("img", 13), prompt_ids(14, 15)][:batch])
    pixel_values = images(int(ids.eq(IMAGE_TOKEN).sum()) // 4)
    return {"input_ids": ids.to(DEVICE), "attention_mask": mask.to(DEVICE), "pixel_values": pixel_values.to(DEVICE)}


DECODING_CASES = {  # (batch, expert mode, generate's arguments, dtype)
    "batch-1": (1, "dynamic", {}, torch.float32),
    "per-sample": (3, "dynamic", {}, torch.float32),
    "per-sample-bf16": (3, "dynamic", {}, torch.bfloat16),
    "shared": (3, "static", {}, torch.float32),
    "beams": (2, "dynamic", {"num_beams": 2}, torch.float32),
    # (On a GPU `generate` compiles a static cache's decoding steps unless told not to; compiled, "auto" runs the
    # fused op, whose tests are elsewhere.)
    "static-cache": (2, "dynamic", {"cache_implementation": "static", "disable_compile": True}, torch.float32),
}


def check_auto_decodes_as_the_eager_adapter(case, counts, per_later_step):
    """Generates 5 tokens (4 decoding steps) with the eager adapter, then twice with "auto": the same tokens and
    logits (within bf16's rounding: the bottleneck's sums in another order), and after call n, `counts()` (what "auto"
    launched once per sequence and layer, and at each later step) equal to n * layers and n * per_later_step * layers:
    each call's cache gets eager decoding's adapters of its own, and the eager adapter launches none."""
    batch, expert_mode, generation, dtype = case
    model = make_model(dtype, expert_mode=expert_mode).to(DEVICE)
    kwargs = {**decoding_batch(batch), **generation, "max_new_tokens": 5}
    kwargs["pixel_values"] = kwargs["pixel_values"].to(dtype)
    tokens, logits = greedy(model, "eager", **kwargs)
    assert counts() == (0, 0)
    layers = len(model.config.language_expert_layer_indices)
    tolerance = 1e-4 if dtype == torch.float32 else 5e-2
    for call in (1, 2):
        auto_tokens, auto_logits = greedy(model, "auto", **kwargs)
        assert counts() == (call * layers, call * per_later_step * layers)
        assert torch.equal(auto_tokens, tokens)
        torch.testing.assert_close(auto_logits, logits, atol=tolerance, rtol=tolerance)


@torch.no_grad()
def decode_steps(model, steps):
    """A prefill on one image and two words, then each step's tokens on the cache: each step's logits."""
    ids = torch.tensor([prompt_ids("img", 10, 11)], device=DEVICE)
    cache = {CACHE_ARG: getattr(model(input_ids=ids, pixel_values=images(1).to(DEVICE), use_cache=True), CACHE_ARG)}
    logits = [model(input_ids=torch.tensor([step], device=DEVICE), **cache).logits for step in steps]
    return torch.cat(logits, dim=1)


def continue_a_copied_cache(model, kernel):
    """A prefill and a decoding step, then a copy of the cache (`copy.deepcopy(prompt_cache)`, Transformers' recipe for
    reusing a prompt) and a step on each: their logits, the cache and the copy."""
    set_kernel(model, kernel)
    ids = torch.tensor([prompt_ids("img", 10, 11)], device=DEVICE)
    with torch.no_grad():
        cache = getattr(model(input_ids=ids, pixel_values=images(1).to(DEVICE), use_cache=True), CACHE_ARG)
        model(input_ids=torch.tensor([[12]], device=DEVICE), **{CACHE_ARG: cache})
        copied = copy.deepcopy(cache)
        logits = [
            model(input_ids=torch.tensor([[13]], device=DEVICE), **{CACHE_ARG: each}).logits
            for each in (cache, copied)
        ]
    return logits, cache, copied


ONE_LAUNCH_SHAPES = {
    # (batch, d_in, d_out, r, weight batch): single-token decoding steps
    "batch-1": (1, 64, 200, 16, 1),
    "per-sample": (3, 96, 80, 16, 3),
    "shared-odd": (4, 33, 47, 7, 1),
    "d_in-in-three-blocks": (2, 600, 130, 16, 2),  # 256 of d_in per step: the last one masked
    "16-rows-shared": (16, 40, 24, 4, 1),
}


def layer_views(weight_batch, d_in, d_out, r, dtype, seed=0):
    """One layer's W_d and W_u as the model's eager decoding reads them: views into all three layers' weights
    (batch stride: all of a sample's weights)."""
    generator = torch.Generator().manual_seed(seed)
    down = torch.randn(weight_batch, 3, d_in * 2 * r, generator=generator) * d_in**-0.5
    up = torch.randn(weight_batch, 3, r * d_out, generator=generator) * r**-0.5
    w_down, w_up = modeling_hyperllava.split_weights(torch.cat([down, up], dim=-1).to(DEVICE, dtype), d_in, r, d_out)
    return w_down[:, 1], w_up[:, 1]


def step_inputs(batch, d_in, d_out, dtype=torch.float32, length=1, generator=None):
    """A decoding step's x, residual and FFN output."""
    sizes = (d_in, d_out, d_out)
    return tuple(torch.randn(batch, length, size, generator=generator).to(DEVICE, dtype) for size in sizes)


class CountedTorchLaunch(fused._TorchLaunch):
    """PyTorch's launcher's launches of a counted compiled kernel (a `CountedCompiled`), counted as its direct ones."""

    def __call__(self, *args):
        self.compiled.counts.direct += 1
        super().__call__(*args)


@pytest.fixture
def counted_one_launch(monkeypatch):
    """The one-launch kernel, counted: its launches through Triton's launcher and those of the compiled kernel (by
    PyTorch's launcher on CUDA, by the compiled kernel's own in Triton's interpreter)."""
    counted = CountedLaunches(fused._decode_add_kernel)
    monkeypatch.setattr(fused, "_decode_add_kernel", counted)
    monkeypatch.setattr(fused, "_TorchLaunch", CountedTorchLaunch)
    return counted


@needs_kernels
@torch.no_grad()  # (as decoding runs it: under autograd it refuses)
@pytest.mark.parametrize("dtype", [torch.float32, torch.float16, torch.bfloat16], ids=str)
@pytest.mark.parametrize("shape", ONE_LAUNCH_SHAPES.values(), ids=ONE_LAUNCH_SHAPES.keys())
def test_the_decode_adapter_sums_the_residual_the_ffns_output_and_e_of_x_in_one_launch(
    shape, dtype, counted_one_launch
):
    """`residual + ffn_out + E(x)` in a new tensor, against the float64 reference, with W_d and W_u read where they
    are (one layer's views into all layers' weights) and the inputs left as they were; every call one launch, the
    first through Triton's launcher (which compiles the kernel) and later ones of the compiled kernel directly, on
    CUDA by PyTorch's launcher."""
    batch, d_in, d_out, r, weight_batch = shape
    w_down, w_up = layer_views(weight_batch, d_in, d_out, r, dtype)
    assert w_down.stride(0) > w_down[0].numel()  # (all layers' weights between two samples: read in place)
    adapter = fused.DecodeAdapter(w_down, w_up)
    generator = torch.Generator().manual_seed(1)
    for call in (1, 2, 3):
        inputs = step_inputs(batch, d_in, d_out, dtype, generator=generator)
        before = [tensor.clone() for tensor in inputs]
        x, residual, ffn_out = (tensor.double() for tensor in inputs)
        want = expert_adapter_reference(x, w_down.double(), w_up.double(), residual, ffn_out)
        out = adapter(*inputs)
        assert_close(out, want, TOLERANCE[dtype], f"call {call}")
        assert all(torch.equal(tensor, kept) for tensor, kept in zip(inputs, before))
        assert (counted_one_launch.through_triton, counted_one_launch.direct) == (1, call - 1)
    assert isinstance(adapter.launch, fused._TorchLaunch) == ON_CUDA


@needs_kernels
@torch.no_grad()
@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16], ids=str)
def test_the_decode_adapter_rounds_the_residual_add_as_llava_does_then_adds_e_of_x(dtype):
    """residual + FFN(x) is rounded before E(x) is added, as LLaVA's add rounds it (and the eager adapter adds W_u's
    product into that sum): with eps the dtype's spacing at 1, 1 + eps/2 rounds (to even) to 1, and E(x) = eps/4 then
    leaves it at 1, where one rounding of all three terms would give 1 + eps. (Triton's interpreter casts to bf16 by
    truncation, so on a CPU only float16 tells the two apart; on a GPU both do.)"""
    d, r, eps = 8, 2, torch.finfo(dtype).eps
    x, residual, ffn_out = torch.zeros(1, 1, d), torch.ones(1, 1, d), torch.full((1, 1, d), eps / 2)
    x[..., 0] = 1.0
    w_down, w_up = torch.zeros(1, d, 2 * r), torch.zeros(1, r, d)
    w_down[0, 0, 0], w_down[0, 0, r] = 16.0, 2.0**-4  # the bottleneck's first unit: SiLU(16) / 16, 1 once rounded
    w_up[0, 0] = eps / 4
    x, w_down, w_up, residual, ffn_out = (t.to(DEVICE, dtype) for t in (x, w_down, w_up, residual, ffn_out))
    assert torch.tensor(1 + eps / 2 + eps / 4).to(dtype) == 1 + eps  # (one rounding)
    eager = modeling_hyperllava.expert_adapter(x, w_down, w_up, residual, ffn=lambda _: ffn_out)
    assert torch.equal(eager, torch.ones_like(eager))
    assert torch.equal(fused.DecodeAdapter(w_down, w_up)(x, residual, ffn_out), eager)


@needs_kernels
@torch.no_grad()
def test_the_decode_adapter_serves_only_calls_like_its_first_single_token_step(counted_one_launch):
    """A prefill (or a step of several tokens) before the first single-token step, and any later call unlike that
    one (another batch, autocast, an input 2 bytes off a 16-byte boundary or not contiguous, as the compiled launch
    assumes them), under autograd or under a mode that must see the ops (FlopCounterMode: the eager adapter's FLOPs
    are counted): None, no launch. So are all calls of a layout the kernel does not take (other dtypes than the
    weights', other widths, over 16 rows per weight set, inputs or weights on another device, a rank over 256)."""
    w_down, w_up = layer_views(1, 24, 40, 4, torch.float32)
    generator = torch.Generator().manual_seed(1)

    def inputs(batch, length=1):
        return step_inputs(batch, 24, 40, length=length, generator=generator)

    def unaligned(tensor):
        storage = torch.empty(tensor.numel() + 1, dtype=tensor.dtype, device=tensor.device)
        return storage[1:].view(tensor.shape).copy_(tensor)

    adapter = fused.DecodeAdapter(w_down, w_up)
    assert adapter(*inputs(2, length=3)) is None
    x, residual, ffn_out = inputs(2)
    assert adapter(x, residual, ffn_out) is not None  # the first single-token step: served
    assert adapter(*inputs(3)) is None
    with torch.autocast(DEVICE, dtype=torch.bfloat16):
        assert adapter(x, residual, ffn_out) is None
    assert adapter(unaligned(x), residual, ffn_out) is None
    assert adapter(x, unaligned(residual), ffn_out) is None
    assert adapter(x, residual, unaligned(ffn_out)) is None
    assert adapter(x, residual.to("meta"), ffn_out) is None  # (later launches pass addresses: on another device)
    assert adapter(x, residual, ffn_out.to("meta")) is None
    wide = torch.randn(2, 1, 80).to(DEVICE)
    assert adapter(x, wide[..., ::2], ffn_out) is None
    assert adapter(x, residual, wide[..., ::2]) is None
    with FlopCounterMode(display=False):
        assert adapter(x, residual, ffn_out) is None
    with torch.enable_grad():
        assert adapter(x, residual, ffn_out) is None
    assert counted_one_launch.through_triton + counted_one_launch.direct == 1
    assert adapter(x, residual, ffn_out) is not None  # and a call like the first again

    for adapter, inputs_ in [
        (fused.DecodeAdapter(w_down.bfloat16(), w_up.bfloat16()), inputs(2)),
        (fused.DecodeAdapter(w_down, w_up), (x, residual, ffn_out.bfloat16())),
        (
            fused.DecodeAdapter(w_down.double(), w_up.double()),
            tuple(t.double() for t in inputs(2)),
        ),  # (not a kernel's)
        (fused.DecodeAdapter(w_down, w_up), (x, residual, wide)),  # an FFN output of another width
        (fused.DecodeAdapter(w_down, w_up), (x, residual.to("meta"), ffn_out)),  # a residual elsewhere
        (fused.DecodeAdapter(w_down, w_up), inputs(17)),  # 17 rows of one weight set
        (fused.DecodeAdapter(w_down.to("meta"), w_up.to("meta")), inputs(2)),
        (fused.DecodeAdapter(*layer_views(1, 24, 40, 257, torch.float32)), inputs(2)),
    ]:
        assert adapter(*inputs_) is None
        assert adapter(*inputs_) is None
    assert counted_one_launch.through_triton + counted_one_launch.direct == 2


@pytest.mark.skipif(not ON_CUDA, reason="CUDA graphs need CUDA")
@torch.no_grad()
def test_the_decode_adapter_launches_in_a_cuda_graph_capture_once_its_kernel_is_loaded():
    """Loading a kernel's module is not allowed in a stream capture: inside one, an adapter that has not launched yet
    refuses the call (the eager adapter, which can be captured, runs instead); once it has launched, its launch is
    captured, and the graph's replays sum whatever x, the residual and the FFN's output hold then."""
    w_down, w_up = layer_views(2, 96, 80, 16, torch.float32)
    inputs = step_inputs(2, 96, 80)
    fresh = fused.DecodeAdapter(w_down, w_up)
    with torch.cuda.graph(torch.cuda.CUDAGraph()):
        assert fresh(*inputs) is None
    adapter = fused.DecodeAdapter(w_down, w_up)
    assert adapter(*inputs) is not None  # (launched through Triton: loaded)
    graph = torch.cuda.CUDAGraph()
    with torch.cuda.graph(graph):
        out = adapter(*inputs)
    for _ in range(2):
        for tensor in inputs:
            tensor.copy_(torch.randn_like(tensor))
        graph.replay()
        x, residual, ffn_out = (tensor.double() for tensor in inputs)
        want = expert_adapter_reference(x, w_down.double(), w_up.double(), residual, ffn_out)
        assert_close(out, want, TOLERANCE[torch.float32], "replay")


@needs_kernels
def test_a_failed_launch_warns_and_leaves_the_sequence_to_the_eager_adapter(monkeypatch):
    """A launch through Triton that fails (here a stand-in for its compiler's error, which is no RuntimeError): a
    warning, and every step of that sequence runs the eager adapter, with its tokens and logits."""

    class CompilationError(Exception):
        pass

    attempts = []

    class FailingKernel:
        def __getitem__(self, grid):
            def launch(*args, **kwargs):
                attempts.append(grid)
                raise CompilationError("stand-in for a compiler error")

            return launch

    monkeypatch.setattr(modeling_hyperllava, "decode_adapters_available", lambda device: True)
    model = make_model().to(DEVICE)
    kwargs = {**decoding_batch(2), "max_new_tokens": 4}
    tokens, logits = greedy(model, "eager", **kwargs)
    monkeypatch.setattr(fused, "_decode_add_kernel", FailingKernel())
    with pytest.warns(UserWarning, match="adapters run eagerly: launching their decoding kernel failed"):
        failed_tokens, failed_logits = greedy(model, "auto", **kwargs)
    assert torch.equal(failed_tokens, tokens)
    torch.testing.assert_close(failed_logits, logits, atol=1e-5, rtol=1e-5)
    assert len(attempts) == len(model.config.language_expert_layer_indices)  # one a layer: none after it failed


@needs_kernels
@pytest.mark.parametrize("case", DECODING_CASES.values(), ids=DECODING_CASES.keys())
def test_eager_decoding_adds_each_expert_layers_adapter_in_one_launch_with_the_eager_adapters_result(
    case, counted_one_launch, monkeypatch
):
    """With "auto", eager decoding on an NVIDIA GPU adds each expert layer's adapter to h + FFN(x) with one launch
    at every single-token step: the eager adapter's tokens and logits, with per-sample weights, one weight set for the
    batch ("static"), beam search (whose cache reorders its rows) and a static cache (whose decoding steps read a copy
    of the weights); in bf16 E(x) is rounded once, as `baddbmm_` rounds it. The prefill runs the eager adapter; each
    call's first step goes through Triton's launcher."""
    monkeypatch.setattr(modeling_hyperllava, "decode_adapters_available", lambda device: True)
    # (Each sequence's first step through Triton's launcher, its 3 later ones launching the compiled kernel.)
    launches = counted_one_launch
    check_auto_decodes_as_the_eager_adapter(case, lambda: (launches.through_triton, launches.direct), per_later_step=3)


@needs_kernels
def test_a_decoding_loop_of_ones_own_and_a_copied_cache_add_the_adapter_in_one_launch_where_it_serves(
    counted_one_launch, monkeypatch
):
    """A step of several tokens (assisted decoding's, or one's own loop's) runs the eager adapter and the
    single-token steps around it launch the kernel; a copied cache (`copy.deepcopy(prompt_cache)`) gets adapters that
    read the copy's weights; all as the eager adapter computes."""
    monkeypatch.setattr(modeling_hyperllava, "decode_adapters_available", lambda device: True)
    model = make_model().to(DEVICE)
    layers = len(model.config.language_expert_layer_indices)
    steps = [[12], [13, 14, 15], [16]]
    expected = decode_steps(set_kernel(model, "eager"), steps)
    got = decode_steps(set_kernel(model, "auto"), steps)
    assert counted_one_launch.through_triton + counted_one_launch.direct == 2 * layers
    torch.testing.assert_close(got, expected, atol=1e-4, rtol=1e-4)

    expected = continue_a_copied_cache(model, "eager")[0]
    got, cache, copied = continue_a_copied_cache(model, "auto")
    for got_logits, expected_logits in zip(got, expected):
        torch.testing.assert_close(got_logits, expected_logits, atol=1e-4, rtol=1e-4)
    (_, original), (copied_weights, copy_) = (
        getattr(each, modeling_hyperllava.LAYER_WEIGHTS) for each in (cache, copied)
    )
    for idx, (w_down, _, adapter) in copy_.items():
        assert adapter.w_down.data_ptr() == w_down.data_ptr() != original[idx][2].w_down.data_ptr()
        assert w_down.untyped_storage().data_ptr() == copied_weights.untyped_storage().data_ptr()


@compiled_not_interpreted
@pytest.mark.parametrize(
    "batch, weight_sets", [(1, 1), (16, 16), (16, 1)], ids=["batch-1", "batch-16", "batch-16-shared-weights"]
)
def test_on_cuda_the_later_launches_pass_pytorchs_launcher_the_parameters_triton_compiled(
    batch, weight_sets, monkeypatch
):
    """On CUDA the adapter's later launches go through PyTorch's launcher, which must get the arguments of the
    adapter's call minus those that Triton compiled as constants (its constexprs, and an integer 1: the rows per
    weight set, at batch 1 and with a weight set per sequence), each with the right width: the compiled kernel's
    parameters, read off the PTX of the one launch's kernel compiled for a 7B decoding step on an H100/H200. A later
    call passes its own tensors' addresses, the kernel's launch settings and the current stream (a stand-in launcher
    records them)."""
    d, r = 4096, 16
    w_down, w_up = torch.zeros(weight_sets, d, 2 * r), torch.zeros(weight_sets, r, d)
    x, residual, ffn_out, out = (torch.zeros(batch, 1, d) for _ in range(4))
    adapter = fused.DecodeAdapter(w_down, w_up)
    grid, tail = adapter.arguments = adapter._arguments(x, residual, ffn_out)
    adapter.device_type = "cuda"  # (as its first call on a GPU sets it)
    compiled = compile_for(
        90, fused._decode_add_kernel, (x, w_down, w_up, residual, ffn_out, out, *tail), fused._OPTIONS
    )
    compiled.function = 0  # (no GPU: no loaded kernel)
    calls = []
    launcher = SimpleNamespace(_launch_kernel=lambda *arguments: calls.append(arguments))
    monkeypatch.setattr(torch._C, "_StaticCudaLauncher", launcher, raising=False)
    streams = {x.get_device(): 12345}  # (the current stream of x's device)
    monkeypatch.setattr(torch._C, "_cuda_getCurrentRawStream", streams.__getitem__, raising=False)
    launch = adapter._later_launches(compiled, grid)
    assert [LAUNCHER_KINDS[letter] for letter in launch.types] == ptx_parameters(compiled)
    assert launch.types.startswith("K" * 6)  # (by address)
    constants = {name for name, kind in compiled.src.signature.items() if kind == "constexpr"}
    names = fused._decode_add_kernel.arg_names
    kept = [value for name, value in zip(names[6:], tail) if name not in constants]
    assert [value for value in launch.tail if value is not None] == kept  # (None: a scratch buffer's null address)
    assert ("rows" in constants) == (batch == weight_sets)
    x, residual, ffn_out, out = (torch.zeros(batch, 1, d) for _ in range(4))
    launch(x, w_down, w_up, residual, ffn_out, out, *tail)
    settings = (0, *grid, compiled.metadata.num_warps, compiled.metadata.shared, launch.types)
    addresses = tuple(tensor.data_ptr() for tensor in (x, w_down, w_up, residual, ffn_out, out))
    assert calls == [(*settings, (*addresses, *launch.tail), 12345)]


class StandInCompiled:
    """A compiled kernel's stand-in for the choice of its later launches: six pointers, an integer and a constexpr;
    its own launcher returns what it was asked for. (Before Triton 3.4 the launch hooks were the compiled kernel's.)"""

    launch_enter_hook = launch_exit_hook = None

    def __init__(self, metadata):
        names = [*"abcdef", "n", "BLOCK"]
        self.src = SimpleNamespace(signature={**dict.fromkeys("abcdef", "*fp32"), "n": "i32", "BLOCK": "constexpr"})
        self.src.fn = SimpleNamespace(arg_names=names)
        self.metadata, self.function = metadata, 0

    def __getitem__(self, grid):
        return ("its own launcher", grid)


OTHERWISE = "was compiled for a launch that PyTorch's launcher does not make"
REFUSED = {
    "global scratch": (
        lambda compiled: setattr(compiled.metadata, "global_scratch_size", 128),
        "uses Triton's scratch",
    ),
    "profile scratch": (
        lambda compiled: setattr(compiled.metadata, "profile_scratch_size", 128),
        "uses Triton's scratch",
    ),
    "dependent launch": (lambda compiled: setattr(compiled.metadata, "launch_pdl", True), OTHERWISE),
    "cooperative grid": (lambda compiled: setattr(compiled.metadata, "launch_cooperative_grid", True), OTHERWISE),
    "clusters": (lambda compiled: setattr(compiled.metadata, "num_ctas", 2), OTHERWISE),
    "sanitizer": (lambda compiled: setattr(compiled.metadata, "instrumentation_mode", "gsan"), OTHERWISE),
    "1-bit scalar": (
        lambda compiled: compiled.src.signature.update(n="i1"),
        "takes n as i1, which this launch does not",
    ),
}


@pytest.mark.parametrize("refuse, refusal", REFUSED.values(), ids=REFUSED.keys())
def test_the_later_launches_keep_the_compiled_kernels_own_launcher_where_pytorchs_would_launch_otherwise(
    refuse, refusal, monkeypatch
):
    """PyTorch's launcher gets null for Triton's scratch buffers and launches one plain grid of one-CTA programs: a
    kernel that uses a scratch buffer (a size in its metadata) would write through that null address, one compiled for
    programmatic dependent launch, a cooperative grid or clusters would be launched otherwise than Triton launches it,
    one instrumented by Triton (its sanitizer) takes parameters of Triton's own, and a scalar parameter of a type the
    launch does not pass would fail when the adapter is called. Each is refused, and the adapter keeps the compiled
    kernel's own launcher; so it does while a launch hook of Triton's is set (a profiler's, which PyTorch's launcher
    would not call), with a torch that has no such launcher (before 2.8), and off CUDA (Triton's interpreter's
    stand-ins)."""
    plain = {"global_scratch_size": 0, "profile_scratch_size": 0, "launch_pdl": False, "num_ctas": 1}
    plain |= {"num_warps": 4, "shared": 1024}
    monkeypatch.setattr(torch._C, "_StaticCudaLauncher", object(), raising=False)
    adapter = fused.DecodeAdapter(None, None)
    adapter.arguments, adapter.device_type = ((3, 1, 2), (7, 64)), "cuda"

    launch = adapter._later_launches(StandInCompiled(SimpleNamespace(name="the_kernel", **plain)), (3, 1, 2))
    assert isinstance(launch, fused._TorchLaunch)
    assert (launch.types, launch.tail) == ("KKKKKKiOO", (7, None, None))  # (the two scratch buffers' nulls)
    assert launch.kernel == (0, 3, 1, 2, 4, 1024)  # (the function, the grid, the warps, the shared memory)

    refused = StandInCompiled(SimpleNamespace(name="the_kernel", **plain))
    refuse(refused)
    with pytest.raises(ValueError, match=f"the_kernel {re.escape(refusal)}"):
        fused._torch_launcher_arguments(refused, [0] * 6 + [7, 64])
    assert adapter._later_launches(refused, (3, 1, 2)) == ("its own launcher", (3, 1, 2))

    compiled = StandInCompiled(SimpleNamespace(name="the_kernel", **plain))
    with monkeypatch.context() as hooked:
        hooks = triton.knobs.runtime if hasattr(triton, "knobs") else StandInCompiled
        hooked.setattr(hooks, "launch_enter_hook", lambda metadata: None)
        assert adapter._later_launches(compiled, (3, 1, 2)) == ("its own launcher", (3, 1, 2))
    adapter.device_type = "cpu"
    assert adapter._later_launches(compiled, (3, 1, 2)) == ("its own launcher", (3, 1, 2))
    adapter.device_type = "cuda"
    monkeypatch.delattr(torch._C, "_StaticCudaLauncher")
    assert adapter._later_launches(compiled, (3, 1, 2)) == ("its own launcher", (3, 1, 2))


def global_memory_order(ptx, pointer_parameter):
    """A kernel's global loads and stores and its grid dependency control, in program order (PTX text), as pairs
    (instruction, whether its address derives from the pointer parameter `pointer_parameter`, by the registers each
    instruction computes from it)."""
    derived, order = set(), []
    for line in ptx.splitlines():
        instruction = re.sub(r"^@!?%\w+\s+", "", line.strip())
        registers = re.findall(r"%\w+", instruction)
        if re.match(rf"ld\.param\.\w+\s.*_param_{pointer_parameter}\]", instruction):
            derived.add(registers[0])
        elif re.match(r"(ld|st)\.global", instruction):
            address = re.search(r"\[([^]]*)\]", instruction).group(1)
            order.append((instruction, bool(derived & set(re.findall(r"%\w+", address)))))
        elif instruction.startswith("griddepcontrol"):
            order.append((re.match(r"griddepcontrol\.\w+", instruction).group(), False))  # (what follows varies)
        elif registers and derived & set(registers[1:]):  # computed from an address: an address too
            derived.add(registers[0])
    return order


@compiled_not_interpreted
@pytest.mark.parametrize("arch", [75, 80, 90], ids=["T4", "A100", "H100-H200"])  # (T4: Colab's usual GPU)
@pytest.mark.parametrize("dtype", [torch.float32, torch.float16, torch.bfloat16], ids=str)
def test_every_launch_compiles_for_the_gpu(monkeypatch, arch, dtype):
    """Triton's interpreter runs the kernels as Python, so it accepts what the compiler refuses: a loop-carried
    variable that changes dtype, a tl.dot under 16 wide, Python the compiler does not know. Every launch that the op
    makes, forward (with and without the FFN's output) and backward, and eager decoding's one launch, at the tested
    shapes and 7B's prefill and decode, with the block sizes the launchers pick for 132 SMs, is compiled here for the
    GPU, whether or not there is one."""
    monkeypatch.setattr(fused, "_multiprocessor_count", lambda device: 132)
    monkeypatch.setattr(fused, "_dependent_launch", lambda device: arch >= 90)  # as the launchers decide on the GPU
    monkeypatch.setattr(fused, "_DECODE_LAUNCHES", {})  # on a GPU: none compiled by an earlier test
    launches = []
    for name in LAUNCHED_KERNELS:
        monkeypatch.setattr(fused, name, RecordedLaunch(getattr(fused, name), launches))
    prefill_7b = (8, 640, 4096, 4096, 16, 8)
    for batch, length, d_in, d_out, r, weight_batch in [*SHAPES.values(), *DECODE_SHAPES.values(), prefill_7b]:
        x = torch.empty(batch, length, d_in, dtype=dtype)
        w_down, w_up = (
            torch.empty(weight_batch, d_in, 2 * r, dtype=dtype),
            torch.empty(weight_batch, r, d_out, dtype=dtype),
        )
        residual = torch.empty(batch, length, d_out, dtype=torch.float32)
        for ffn_out in (None, residual.to(dtype)):
            fused._launch(x, w_down, w_up, residual, ffn_out)  # (what the op launches: its checks refuse CPU tensors)
        fused._expert_adapter_backward(residual.to(dtype), x, w_down, w_up)
        if batch // weight_batch <= 16:  # eager decoding's one launch, at a single-token step
            step = (torch.empty(batch, 1, size, dtype=dtype) for size in (d_in, d_out, d_out))
            with torch.no_grad():
                assert fused.DecodeAdapter(w_down, w_up)(*step) is not None  # (recorded)
    assert {kernel.__name__ for kernel, _, _ in launches} == set(LAUNCHED_KERNELS)
    for kernel, args, keywords in launches:
        assert compile_for(arch, kernel, args, keywords).asm["cubin"], kernel.__name__


@compiled_not_interpreted
def test_on_hopper_the_decode_kernels_read_what_the_kernel_before_wrote_only_after_waiting_for_it(monkeypatch):
    """With programmatic dependent launch a kernel can start before the one ahead of it has finished. The down kernel
    must wait for it before any read (x is its output) and only then let the up kernel start; the up kernel may read
    its weights and the residual early (they were written before the down kernel was let through its wait), but the
    down kernel's partial sums only after waiting, and it may write nothing before. Checked in the code compiled for
    sm_90 at 7B's decoding shape in bfloat16, with Triton's specialisation for aligned inputs."""
    launches = []
    monkeypatch.setattr(fused, "_multiprocessor_count", lambda device: 132)
    monkeypatch.setattr(fused, "_dependent_launch", lambda device: True)
    monkeypatch.setattr(fused, "_DECODE_LAUNCHES", {})
    for name in ("_decode_down_kernel", "_decode_up_kernel"):
        monkeypatch.setattr(fused, name, RecordedLaunch(getattr(fused, name), launches))
    x, residual, ffn_out = (torch.empty(1, 1, 4096, dtype=torch.bfloat16) for _ in range(3))
    w_down, w_up = torch.empty(1, 4096, 32, dtype=torch.bfloat16), torch.empty(1, 16, 4096, dtype=torch.bfloat16)
    fused._launch(x, w_down, w_up, residual, ffn_out)  # (what the op launches: its checks refuse CPU tensors)
    (down, down_args, down_options), (up, up_args, up_options) = launches
    assert down_options["launch_pdl"] and up_options["launch_pdl"]

    order = [
        instruction
        for instruction, _ in global_memory_order(compile_for(90, down, down_args, down_options).asm["ptx"], 0)
    ]
    assert order[:2] == ["griddepcontrol.wait", "griddepcontrol.launch_dependents"], order[:3]
    assert not [instruction for instruction in order[2:] if instruction.startswith("griddep")]

    order = global_memory_order(compile_for(90, up, up_args, up_options).asm["ptx"], 0)  # parameter 0: partial sums
    wait = [instruction for instruction, _ in order].index("griddepcontrol.wait")
    early = [instruction for instruction, partial in order[:wait] if partial or instruction.startswith("st.")]
    assert not early, early
    assert [instruction for instruction, partial in order[wait:] if partial]  # (the dataflow finds those loads)
    assert [instruction for instruction, _ in order[:wait]]  # the weights and the residual, read early


@pytest.fixture
def fresh_dependent_launch():
    """`fused._dependent_launch` with its cache emptied before and after (it decides once per device)."""
    fused._dependent_launch.cache_clear()
    yield fused._dependent_launch
    fused._dependent_launch.cache_clear()


@pytest.mark.parametrize("capability, expected", [((8, 0), False), ((8, 9), False), ((9, 0), True), ((10, 0), True)])
def test_dependent_launch_from_hopper_on(monkeypatch, fresh_dependent_launch, capability, expected):
    """Programmatic dependent launch exists from compute capability 9.0 (Hopper) on; the sm_80 code must not hold
    its instructions. Not under Triton's interpreter, which has none of them, nor with a Triton without them."""
    import triton.language as tl

    triton_has_it = hasattr(tl.extra.cuda, "gdc_wait")  # (Triton 3.4 has it, 3.3 and 3.2 not)
    monkeypatch.delenv("TRITON_INTERPRET", raising=False)
    monkeypatch.setattr(torch.cuda, "get_device_capability", lambda device: capability)
    assert fresh_dependent_launch(torch.device("cuda", 0)) is (expected and triton_has_it)
    assert not fresh_dependent_launch(torch.device("cpu"))
    fresh_dependent_launch.cache_clear()
    monkeypatch.setenv("TRITON_INTERPRET", "1")
    assert not fresh_dependent_launch(torch.device("cuda", 0))
    fresh_dependent_launch.cache_clear()
    monkeypatch.delenv("TRITON_INTERPRET")
    monkeypatch.setattr(torch.version, "hip", "6.4")  # an AMD GPU (capability 9.4 for MI300), a "cuda" device too
    assert not fresh_dependent_launch(torch.device("cuda", 0))
    fresh_dependent_launch.cache_clear()
    monkeypatch.setattr(torch.version, "hip", None)
    monkeypatch.delattr(tl.extra.cuda, "gdc_wait", raising=False)  # a Triton from before it
    assert not fresh_dependent_launch(torch.device("cuda", 0))


def test_a_call_whose_tensors_are_not_on_the_current_gpu_launches_with_theirs_current(monkeypatch):
    """Without two GPUs: stand-ins for the device check, the device switch and the launches. Every way into the kernels
    (the direct path outside autograd, the custom op's own call, which compiled graphs make, and eager decoding's one
    launch) launches with the tensors' device current."""
    current = []  # the devices made current, innermost last

    @contextlib.contextmanager
    def device(device):
        current.append(device)
        yield
        current.pop()

    launched_on = []

    def launch(x, w_down, w_up, residual, ffn_out, checked_signature=None):
        launched_on.append(list(current))
        return residual.clone()

    monkeypatch.setenv("TRITON_INTERPRET", "1")  # (lets CPU tensors through the op's check; nothing is launched)
    monkeypatch.setattr(fused, "_elsewhere", lambda x: not current)
    monkeypatch.setattr(torch.cuda, "device", device)
    monkeypatch.setattr(fused, "_launch", launch)
    monkeypatch.setattr(fused, "_DECODE_LAUNCHES", {})
    x, w_down, w_up, residual = make_inputs(*SHAPES["decode-batch"], torch.float32)
    with torch.no_grad():
        fused.fused_expert_adapter(x, w_down, w_up, residual)
    fused.fused_expert_adapter(x, w_down, w_up, residual)  # with autograd: through the custom op
    # and eager decoding's one launch a layer
    monkeypatch.setattr(fused.DecodeAdapter, "_launch", lambda self, *tensors: launched_on.append(list(current)))
    with torch.no_grad():
        fused.DecodeAdapter(w_down, w_up)(x, residual, residual)
    assert launched_on == [[x.device]] * 3 and current == []


@pytest.mark.skipif(torch.cuda.device_count() < 2, reason="needs two CUDA GPUs")
def test_a_call_on_a_gpu_that_is_not_the_current_one_runs_there():
    """`device_map` puts layers on other GPUs without making theirs the current device, where Triton launches."""
    inputs = make_inputs(*SHAPES["decode-batch"], torch.float32, ffn_dtype=torch.float32)
    with torch.cuda.device(0):
        inputs = [t.to("cuda:1") for t in inputs]
        with torch.no_grad():
            out = fused.fused_expert_adapter(*inputs)
        assert out.device == torch.device("cuda", 1)
        want = expert_adapter_reference(*(t.double() for t in inputs))
        assert_close(out, want, TOLERANCE[torch.float32], "output")
        assert_close(torch.ops.hyperllava.expert_adapter(*inputs), want, TOLERANCE[torch.float32], "op output")
        # Eager decoding's one launch a layer: the first through Triton's launcher, the second by PyTorch's.
        w_down, w_up = (t.to("cuda:1") for t in layer_views(2, 96, 80, 16, torch.float32))
        adapter = fused.DecodeAdapter(w_down, w_up)
        for call in (1, 2):
            x, residual, ffn_out = (t.to("cuda:1") for t in step_inputs(2, 96, 80))
            want = expert_adapter_reference(*(t.double() for t in (x, w_down, w_up, residual, ffn_out)))
            assert_close(adapter(x, residual, ffn_out), want, TOLERANCE[torch.float32], f"call {call}")


def test_is_available(monkeypatch):
    assert not fused.is_available("cpu")
    assert fused.is_available("cuda") == ON_CUDA
    # PyTorch's ROCm build calls AMD GPUs "cuda" too: the kernels are NVIDIA's only.
    monkeypatch.setattr(torch.cuda, "is_available", lambda: True)
    monkeypatch.setattr(torch.version, "cuda", "13.0")
    monkeypatch.setattr(torch.version, "hip", None)
    assert fused.is_available("cuda") == (fused.triton is not None)  # an NVIDIA GPU
    monkeypatch.setattr(torch.version, "cuda", None)
    monkeypatch.setattr(torch.version, "hip", "6.4")
    assert not fused.is_available("cuda")  # an AMD one


def test_imports_without_triton():
    """The module ships as Hub remote code, so importing it must not need Triton; calling it then says why not."""
    script = (
        "import sys; sys.modules['triton'] = None\n"
        "import torch\n"
        "from transformers_hyperllava import fused_expert_hyperllava as fused\n"
        "assert not fused.is_available('cuda')\n"
        "x = torch.zeros(1, 1, 4); w_down = torch.zeros(1, 4, 2); w_up = torch.zeros(1, 1, 4)\n"
        "try:\n"
        "    fused.fused_expert_adapter(x, w_down, w_up, x)\n"
        "except RuntimeError as error:\n"
        "    assert 'pip install triton' in str(error), error\n"
        "else:\n"
        "    raise AssertionError('no error without Triton')\n"
    )
    result = subprocess.run([sys.executable, "-c", script], check=False, capture_output=True, text=True, timeout=300)
    assert result.returncode == 0, result.stderr


@pytest.mark.parametrize(
    "shapes, message",
    [
        (((2, 3, 8), (2, 8, 4), (2, 2, 8), (2, 3)), "3-D"),
        (((2, 3, 8), (2, 8, 6), (2, 2, 8), (2, 3, 8)), "w_down has shape (2, 8, 6)"),
        (((2, 3, 8), (3, 8, 4), (3, 2, 8), (2, 3, 8)), "batch size 3 must be 1 or x's batch size 2"),
        (((2, 3, 8), (1, 8, 4), (1, 2, 5), (2, 3, 8)), "residual has shape (2, 3, 8), expected (2, 3, 5)"),
        (((2, 3, 8), (1, 8, 4), (1, 2, 5), (2, 3, 5), (2, 1, 5)), "ffn_out has shape (2, 1, 5), expected (2, 3, 5)"),
    ],
)
def test_bad_shapes_are_refused(shapes, message):
    tensors = [torch.zeros(shape) for shape in shapes]
    with pytest.raises(ValueError, match=message.replace("(", r"\(").replace(")", r"\)")):
        fused.fused_expert_adapter(*tensors)


def test_bad_dtype_is_refused():
    x = torch.zeros(1, 1, 4, dtype=torch.float64)
    with pytest.raises(ValueError, match="x has dtype torch.float64"):
        fused.fused_expert_adapter(x, torch.zeros(1, 4, 2), torch.zeros(1, 1, 4), torch.zeros(1, 1, 4))
