"""Fused Triton kernels for HyperLLaVA's expert adapter.

`fused_expert_adapter(x, w_down, w_up, residual, ffn_out)` computes, with one weight set per sample,

    out = residual [+ ffn_out] + (SiLU(x @ w_down[..., :r]) * (x @ w_down[..., r:])) @ w_up

in one kernel launch (the (rows, 2r) bottleneck never leaves the chip) or, for decoding (a few rows per weight
set), in two short launches that spread the reduction over d_in across the GPU; its backward takes three launches.
It is a `torch.library` custom op, so `torch.compile(fullgraph=True)` and CUDA graphs treat it as one opaque call
(without autograd, outside a compiled graph, its launcher is called directly: the op's dispatch would only add host
time).
This file ships as Hub remote code: it imports only torch, triton and the standard library, and imports fine
without Triton (then `is_available()` is False and the model uses its eager path).
"""

# The kernels' `tl.constexpr` annotations stay unevaluated strings (Triton reads them as text), so this module
# imports without Triton installed.
from __future__ import annotations

import contextlib
import copy
import functools
import os
import threading
import warnings

import torch
from torch.utils._python_dispatch import is_in_torch_dispatch_mode

try:
    import triton
    import triton.language as tl
except ImportError:
    triton = tl = None

_DTYPES = (torch.float32, torch.bfloat16, torch.float16)


def is_available(device) -> bool:
    """Whether `fused_expert_adapter` can run on `device`: an NVIDIA GPU with Triton installed. (PyTorch's ROCm build
    calls AMD GPUs "cuda" devices too; the kernels were built and tested for NVIDIA's only, so `"auto"` keeps the eager
    adapter there.)"""
    return (
        triton is not None
        and torch.device(device).type == "cuda"
        and not torch.version.hip
        and torch.cuda.is_available()
    )


def fused_expert_adapter(x, w_down, w_up, residual, ffn_out=None):
    """`residual [+ ffn_out] + (SiLU(x W_d[:, :r]) * (x W_d[:, r:])) W_u` with per-sample weights, fused (forward and
    backward).

    Args:
        x: (batch, length, d_in) adapter input, float32/bfloat16/float16; the compute dtype.
        w_down: (batch or 1, d_in, 2r) down projection: the first r columns feed the SiLU gate.
        w_up: (batch or 1, r, d_out) up projection. A weight batch of 1 is shared by every sample.
        residual: (batch, length, d_out) what the adapter output is added to.
        ffn_out: optional (batch, length, d_out), added to the residual first and rounded to the dtype of PyTorch's
            `residual + ffn_out`, as that add rounds: the FFN's output beside which the language expert sits. Adding
            it here rather than before the call saves a compiled graph one kernel per layer (Inductor cannot fuse an
            add into a custom op's input, while LLaVA's graph fuses it into the next layer's RMSNorm).

    Returns:
        (batch, length, d_out) in the dtype PyTorch's `residual + ffn_out + adapter` would give. The matmuls
        accumulate in float32; the weights are cast to `x.dtype` (autograd sees the cast), and under autocast x too
        is cast to autocast's dtype, as the eager adapter's matmuls cast their operands.
    """
    plain = _plain_eager_call(x, w_down, w_up, residual, ffn_out)
    if plain and _elsewhere(x):  # (the custom op sees to it in its own call, which a compiled graph makes)
        with torch.cuda.device(x.device):
            return fused_expert_adapter(x, w_down, w_up, residual, ffn_out)
    if plain and (launches := _DECODE_LAUNCHES.get(_call_signature(x, w_down, w_up, residual, ffn_out))):
        # An eager decoding step makes the same call at every step and layer: what the first one checked and worked
        # out holds for this one (see _call_signature), and its compiled kernels launch directly.
        return launches(x, w_down, w_up, residual, ffn_out)
    _check_inputs(x, w_down, w_up, residual, ffn_out)
    if torch.is_autocast_enabled(x.device.type):  # where the eager adapter's matmuls would run, so do the kernels
        x = x.to(torch.get_autocast_dtype(x.device.type))
    w_down, w_up = w_down.to(x.dtype), w_up.to(x.dtype)
    if plain:
        # The custom op's dispatch would only add host time, which bounds eager decoding (docs/performance.md).
        return _launch(x, w_down, w_up, residual, ffn_out)
    return torch.ops.hyperllava.expert_adapter(x, w_down, w_up, residual, ffn_out)


def _elsewhere(x) -> bool:
    """Whether x is on a CUDA device other than the current one: Triton launches on the current device, which a model
    split over GPUs (`device_map`) does not set."""
    return x.is_cuda and x.get_device() != torch.cuda.current_device()


def _plain_eager_call(*tensors) -> bool:
    """No autograd, no compiler, tracer, dispatch mode or torch.func transform, and plain tensors: nothing that needs
    to see the op."""
    return (
        not torch.is_grad_enabled()
        and not torch.compiler.is_compiling()
        and not torch.jit.is_tracing()
        and not is_in_torch_dispatch_mode()
        and not torch._C._are_functorch_transforms_active()  # (vmap's tensors pass the type check below)
        and all(type(tensor) is torch.Tensor for tensor in tensors if tensor is not None)
    )


def _check_inputs(x, w_down, w_up, residual, ffn_out=None):
    if x.dim() != 3 or w_down.dim() != 3 or w_up.dim() != 3 or residual.dim() != 3:
        raise ValueError(
            "fused_expert_adapter expects 3-D x (batch, length, d_in), w_down (batch|1, d_in, 2r), "
            f"w_up (batch|1, r, d_out) and residual (batch, length, d_out); got x {tuple(x.shape)}, "
            f"w_down {tuple(w_down.shape)}, w_up {tuple(w_up.shape)}, residual {tuple(residual.shape)}"
        )
    batch, length, d_in = x.shape
    weight_batch, r, d_out = w_up.shape
    if tuple(w_down.shape) != (weight_batch, d_in, 2 * r):
        raise ValueError(
            f"w_down has shape {tuple(w_down.shape)}; with x {tuple(x.shape)} and w_up {tuple(w_up.shape)} it must "
            f"be {(weight_batch, d_in, 2 * r)}"
        )
    if weight_batch not in (1, batch):
        raise ValueError(f"the weights' batch size {weight_batch} must be 1 or x's batch size {batch}")
    addends = {"residual": residual} if ffn_out is None else {"residual": residual, "ffn_out": ffn_out}
    for name, tensor in addends.items():
        if tuple(tensor.shape) != (batch, length, d_out):
            raise ValueError(f"{name} has shape {tuple(tensor.shape)}, expected {(batch, length, d_out)}")
    for name, tensor in (("x", x), ("w_down", w_down), ("w_up", w_up), *addends.items()):
        if tensor.dtype not in _DTYPES:
            raise ValueError(f"{name} has dtype {tensor.dtype}; supported: {list(_DTYPES)}")
        if tensor.device != x.device:
            raise ValueError(f"{name} is on {tensor.device} but x is on {x.device}")
    if triton is None:
        raise RuntimeError("fused_expert_adapter needs Triton (`pip install triton`); use the eager path instead")
    if x.device.type != "cuda" and os.environ.get("TRITON_INTERPRET") != "1":
        raise ValueError(
            f"fused_expert_adapter runs on CUDA devices, not {x.device}: use expert_kernel='auto' or 'eager' there"
        )


# ----------------------------------------------------------------------------------------------------------------
# Kernels. Activations are contiguous and viewed as `groups` independent problems (one per weight set) of `rows`
# rows; each weight set is a contiguous matrix, `w_down_stride` / `w_up_stride` elements after the previous one.
# ----------------------------------------------------------------------------------------------------------------


def _kernel(fn):
    # Without Triton the kernels are never launched (is_available() is False); they only need to import.
    return triton.jit(fn) if triton is not None else fn


@_kernel
def _down_projection(
    x_ptr, w_down_ptr, offs_m, mask_m, offs_r, mask_r, d_in, r,
    BLOCK_M: tl.constexpr, BLOCK_K: tl.constexpr, BLOCK_R: tl.constexpr, PRECISION: tl.constexpr,
):  # fmt: skip
    """x W_d for a block of rows, fp32 accumulation: the SiLU gate (first r columns) and the up half (the next r)."""
    gate = tl.zeros((BLOCK_M, BLOCK_R), dtype=tl.float32)
    up = tl.zeros((BLOCK_M, BLOCK_R), dtype=tl.float32)
    for k in range(0, d_in, BLOCK_K):
        offs_k = k + tl.arange(0, BLOCK_K)
        mask_k = offs_k < d_in
        x = tl.load(
            x_ptr + offs_m[:, None] * d_in + offs_k[None, :], mask=mask_m[:, None] & mask_k[None, :], other=0.0
        )
        w = w_down_ptr + offs_k[:, None] * (2 * r) + offs_r[None, :]
        w_mask = mask_k[:, None] & mask_r[None, :]
        gate = tl.dot(x, tl.load(w, mask=w_mask, other=0.0), gate, input_precision=PRECISION)
        up = tl.dot(x, tl.load(w + r, mask=w_mask, other=0.0), up, input_precision=PRECISION)
    return gate, up


@_kernel
def _residual(residual_ptr, ffn_ptr, offsets, mask, HAS_FFN: tl.constexpr, SUM_DTYPE: tl.constexpr):
    """The residual in float32, plus the FFN's output rounded to SUM_DTYPE, the dtype of PyTorch's `residual +
    ffn_out`, as PyTorch's add rounds it."""
    residual = tl.load(residual_ptr + offsets, mask=mask, other=0.0).to(tl.float32)
    if HAS_FFN:
        residual = (residual + tl.load(ffn_ptr + offsets, mask=mask, other=0.0).to(tl.float32)).to(SUM_DTYPE)
    return residual.to(tl.float32)


@_kernel
def _forward_kernel(
    x_ptr, w_down_ptr, w_up_ptr, residual_ptr, ffn_ptr, out_ptr,
    rows, d_in, d_out, r, cols_per_program, w_down_stride, w_up_stride,
    BLOCK_M: tl.constexpr, BLOCK_K: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_R: tl.constexpr,
    PRECISION: tl.constexpr, HAS_FFN: tl.constexpr, SUM_DTYPE: tl.constexpr,
):  # fmt: skip
    """Program (i, j, g): rows [i * BLOCK_M, ...) and output columns [j * cols_per_program, ...) of problem g."""
    group = tl.program_id(2).to(tl.int64)
    first_row = tl.program_id(0).to(tl.int64) * BLOCK_M
    offs_m = tl.arange(0, BLOCK_M)
    offs_r = tl.arange(0, BLOCK_R)
    mask_m = first_row + offs_m < rows
    mask_r = offs_r < r
    x_ptr += (group * rows + first_row) * d_in
    w_down_ptr += group * w_down_stride
    w_up_ptr += group * w_up_stride
    residual_ptr += (group * rows + first_row) * d_out
    ffn_ptr += (group * rows + first_row) * d_out
    out_ptr += (group * rows + first_row) * d_out

    gate, up = _down_projection(
        x_ptr, w_down_ptr, offs_m, mask_m, offs_r, mask_r, d_in, r, BLOCK_M, BLOCK_K, BLOCK_R, PRECISION
    )
    # Padded bottleneck columns are 0 * 0 = 0, so they add nothing below.
    hidden = (gate * tl.sigmoid(gate) * up).to(w_up_ptr.dtype.element_ty)

    col_start = tl.program_id(1) * cols_per_program
    for n in range(col_start, tl.minimum(col_start + cols_per_program, d_out), BLOCK_N):
        offs_n = n + tl.arange(0, BLOCK_N)
        mask_n = offs_n < d_out
        w = tl.load(
            w_up_ptr + offs_r[:, None] * d_out + offs_n[None, :], mask=mask_r[:, None] & mask_n[None, :], other=0.0
        )
        tile = offs_m[:, None] * d_out + offs_n[None, :]
        mask = mask_m[:, None] & mask_n[None, :]
        out = _residual(residual_ptr, ffn_ptr, tile, mask, HAS_FFN, SUM_DTYPE)
        out += tl.dot(hidden, w, input_precision=PRECISION)
        tl.store(out_ptr + tile, out.to(out_ptr.dtype.element_ty), mask=mask)


@_kernel
def _decode_down_kernel(
    x_ptr, w_down_ptr, partial_ptr,
    rows, d_in, two_r, splits, w_down_stride,
    BLOCK_K: tl.constexpr, BLOCK_2R: tl.constexpr, DEPENDENT_LAUNCH: tl.constexpr,
):  # fmt: skip
    """Program (s, m, g): the partial pre-activation x[m] @ w_down[k-slice s] of row m of problem g, in float32.

    No tl.dot: one row would be padded to 16 and the work is a few KiB per program; the upcast operands'
    products summed with tl.sum are float32 arithmetic for every input dtype (exact float32 for float32 inputs)."""
    if DEPENDENT_LAUNCH:
        # Launched before the kernel ahead of it has finished: wait for it before reading anything (it may have
        # written x, or the weights), and only then let the up kernel start, which reads the residual before it waits.
        tl.extra.cuda.gdc_wait()
        tl.extra.cuda.gdc_launch_dependents()
    split = tl.program_id(0)
    group = tl.program_id(2).to(tl.int64)
    row = group * rows + tl.program_id(1)  # in the flattened (groups * rows, d_in) input
    offs_k = split * BLOCK_K + tl.arange(0, BLOCK_K)
    offs_c = tl.arange(0, BLOCK_2R)
    mask_k = offs_k < d_in
    mask_c = offs_c < two_r
    x = tl.load(x_ptr + row * d_in + offs_k, mask=mask_k, other=0.0).to(tl.float32)
    w = tl.load(
        w_down_ptr + group * w_down_stride + offs_k[:, None] * two_r + offs_c[None, :],
        mask=mask_k[:, None] & mask_c[None, :],
        other=0.0,
    ).to(tl.float32)
    partial = tl.sum(x[:, None] * w, axis=0)
    tl.store(partial_ptr + (row * splits + split) * two_r + offs_c, partial, mask=mask_c)


@_kernel
def _decode_up_kernel(
    partial_ptr, w_up_ptr, residual_ptr, ffn_ptr, out_ptr,
    rows, r, d_out, splits, w_up_stride,
    BLOCK_S: tl.constexpr, BLOCK_R: tl.constexpr, BLOCK_N: tl.constexpr, HAS_FFN: tl.constexpr,
    SUM_DTYPE: tl.constexpr, DEPENDENT_LAUNCH: tl.constexpr,
):  # fmt: skip
    """Program (j, m, g): output columns [j * BLOCK_N, ...) of row m of problem g. Sums the row's partial
    pre-activations (every program of the row repeats this: it is a few KiB), applies SiLU(gate) * up and adds
    hidden @ w_up[:, columns] to the residual (plus the FFN's output)."""
    group = tl.program_id(2).to(tl.int64)
    row = group * rows + tl.program_id(1)
    offs_s = tl.arange(0, BLOCK_S)
    offs_r = tl.arange(0, BLOCK_R)
    offs_n = tl.program_id(0) * BLOCK_N + tl.arange(0, BLOCK_N)
    mask_r = offs_r < r
    mask_n = offs_n < d_out
    # Every load before the reductions (which synchronise the warps), so that the three reads overlap.
    w = tl.load(
        w_up_ptr + group * w_up_stride + offs_r[:, None] * d_out + offs_n[None, :],
        mask=mask_r[:, None] & mask_n[None, :],
        other=0.0,
    )
    out = _residual(residual_ptr, ffn_ptr, row * d_out + offs_n, mask_n, HAS_FFN, SUM_DTYPE)
    if DEPENDENT_LAUNCH:
        # Started while the down kernel runs (it is launched right after it), which let it start only once the
        # kernels before had finished: what is read above was ready then. The partial sums are ready when the down
        # kernel has finished.
        tl.extra.cuda.gdc_wait()
    partial = partial_ptr + (row * splits + offs_s[:, None]) * (2 * r) + offs_r[None, :]
    mask = (offs_s < splits)[:, None] & mask_r[None, :]
    gate = tl.load(partial, mask=mask, other=0.0)
    up = tl.load(partial + r, mask=mask, other=0.0)
    gate, up = tl.sum(gate, axis=0), tl.sum(up, axis=0)
    # Rounded to the weights' dtype like the tiled kernel's tl.dot operand (and eager PyTorch's matmul input).
    # Padded bottleneck entries are 0 * 0 = 0, so they add nothing below.
    hidden = (gate * tl.sigmoid(gate) * up).to(w_up_ptr.dtype.element_ty).to(tl.float32)
    out += tl.sum(hidden[:, None] * w.to(tl.float32), axis=0)
    tl.store(out_ptr + row * d_out + offs_n, out.to(out_ptr.dtype.element_ty), mask=mask_n)


@_kernel
def _decode_add_kernel(
    x_ptr, w_down_ptr, w_up_ptr, residual_ptr, ffn_ptr, out_ptr,
    rows, d_in, r, d_out, w_down_stride, w_up_stride,
    BLOCK_K: tl.constexpr, BLOCK_R: tl.constexpr, BLOCK_N: tl.constexpr,
):  # fmt: skip
    """Program (j, m, g): output columns [j * BLOCK_N, ...) of residual + FFN(x) + E(x) for row m of problem g: the
    whole adapter and LLaVA's residual add in one launch (`DecodeAdapter`). Every program of a row computes the row's
    bottleneck itself, reading all of its W_d (from L2 after the first program's read: 256 KiB a row at 7B): a few
    microseconds of GPU time, where eager decoding, bound by the host's time per call, would pay a second launch and a
    buffer for the partial sums."""
    group = tl.program_id(2).to(tl.int64)
    row = group * rows + tl.program_id(1)
    offs_r = tl.arange(0, BLOCK_R)
    mask_r = offs_r < r
    w_down = w_down_ptr + group * w_down_stride
    # Products summed element-wise over the steps and reduced once after them: a reduction per step would synchronise
    # the program's warps at every step.
    gate = tl.zeros([BLOCK_K, BLOCK_R], dtype=tl.float32)
    up = tl.zeros([BLOCK_K, BLOCK_R], dtype=tl.float32)
    for start in range(0, d_in, BLOCK_K):
        offs_k = start + tl.arange(0, BLOCK_K)
        mask_k = offs_k < d_in
        x = tl.load(x_ptr + row * d_in + offs_k, mask=mask_k, other=0.0).to(tl.float32)[:, None]
        gate_columns = w_down + offs_k[:, None] * (2 * r) + offs_r[None, :]  # (the first r columns feed the gate)
        mask = mask_k[:, None] & mask_r[None, :]
        gate += x * tl.load(gate_columns, mask=mask, other=0.0).to(tl.float32)
        up += x * tl.load(gate_columns + r, mask=mask, other=0.0).to(tl.float32)
    gate, up = tl.sum(gate, axis=0), tl.sum(up, axis=0)
    # Rounded to the weights' dtype as the other kernels round it; padded entries are 0 * 0 = 0.
    hidden = (gate * tl.sigmoid(gate) * up).to(w_up_ptr.dtype.element_ty).to(tl.float32)
    offs_n = tl.program_id(0) * BLOCK_N + tl.arange(0, BLOCK_N)
    mask_n = offs_n < d_out
    w = tl.load(
        w_up_ptr + group * w_up_stride + offs_r[:, None] * d_out + offs_n[None, :],
        mask=mask_r[:, None] & mask_n[None, :],
        other=0.0,
    ).to(tl.float32)
    # residual + FFN(x) rounded first, as LLaVA's add rounds it (and the eager adapter's sum that `baddbmm_` adds to).
    out = _residual(residual_ptr, ffn_ptr, row * d_out + offs_n, mask_n, True, out_ptr.dtype.element_ty)
    out += tl.sum(hidden[:, None] * w, axis=0)
    tl.store(out_ptr + row * d_out + offs_n, out.to(out_ptr.dtype.element_ty), mask=mask_n)


@_kernel
def _backward_rows_kernel(
    x_ptr, w_down_ptr, w_up_ptr, grad_out_ptr, grad_x_ptr, grad_pre_ptr, hidden_ptr,
    rows, d_in, d_out, r, w_down_stride, w_up_stride,
    BLOCK_M: tl.constexpr, BLOCK_K: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_R: tl.constexpr,
    PRECISION: tl.constexpr,
):  # fmt: skip
    """For one block of rows: grad_x, and what the weight gradients reduce over the rows: the gradient of the
    pre-activation x W_d (grad_pre, rows x 2r) and the hidden SiLU(gate) * up (rows x r)."""
    group = tl.program_id(1).to(tl.int64)
    first_row = tl.program_id(0).to(tl.int64) * BLOCK_M
    offs_m = tl.arange(0, BLOCK_M)
    offs_r = tl.arange(0, BLOCK_R)
    mask_m = first_row + offs_m < rows
    mask_r = offs_r < r
    x_ptr += (group * rows + first_row) * d_in
    grad_x_ptr += (group * rows + first_row) * d_in
    grad_out_ptr += (group * rows + first_row) * d_out
    grad_pre_ptr += (group * rows + first_row) * 2 * r
    hidden_ptr += (group * rows + first_row) * r
    w_down_ptr += group * w_down_stride
    w_up_ptr += group * w_up_stride
    dtype = x_ptr.dtype.element_ty

    # Recompute the pre-activation rather than saving it: it costs one more read of x, no extra memory.
    gate, up = _down_projection(
        x_ptr, w_down_ptr, offs_m, mask_m, offs_r, mask_r, d_in, r, BLOCK_M, BLOCK_K, BLOCK_R, PRECISION
    )

    grad_hidden = tl.zeros((BLOCK_M, BLOCK_R), dtype=tl.float32)
    for n in range(0, d_out, BLOCK_N):
        offs_n = n + tl.arange(0, BLOCK_N)
        mask_n = offs_n < d_out
        g = tl.load(
            grad_out_ptr + offs_m[:, None] * d_out + offs_n[None, :], mask=mask_m[:, None] & mask_n[None, :], other=0.0
        )
        w_t = tl.load(
            w_up_ptr + offs_n[:, None] + offs_r[None, :] * d_out, mask=mask_n[:, None] & mask_r[None, :], other=0.0
        )
        grad_hidden = tl.dot(g.to(dtype), w_t, grad_hidden, input_precision=PRECISION)

    sig = tl.sigmoid(gate)
    silu = gate * sig
    grad_up = (grad_hidden * silu).to(dtype)
    grad_gate = (grad_hidden * up * sig * (1.0 + gate * (1.0 - sig))).to(dtype)
    small = mask_m[:, None] & mask_r[None, :]
    tl.store(hidden_ptr + offs_m[:, None] * r + offs_r[None, :], (silu * up).to(dtype), mask=small)
    grad_pre = grad_pre_ptr + offs_m[:, None] * (2 * r) + offs_r[None, :]
    tl.store(grad_pre, grad_gate, mask=small)
    tl.store(grad_pre + r, grad_up, mask=small)

    for k in range(0, d_in, BLOCK_K):
        offs_k = k + tl.arange(0, BLOCK_K)
        mask_k = offs_k < d_in
        w_t = w_down_ptr + offs_r[:, None] + offs_k[None, :] * (2 * r)
        w_mask = mask_r[:, None] & mask_k[None, :]
        grad_x = tl.dot(grad_gate, tl.load(w_t, mask=w_mask, other=0.0), input_precision=PRECISION)
        grad_x = tl.dot(grad_up, tl.load(w_t + r, mask=w_mask, other=0.0), grad_x, input_precision=PRECISION)
        tile = offs_m[:, None] * d_in + offs_k[None, :]
        tl.store(grad_x_ptr + tile, grad_x.to(grad_x_ptr.dtype.element_ty), mask=mask_m[:, None] & mask_k[None, :])


@_kernel
def _rows_reduction_kernel(
    a_ptr, b_ptr, out_ptr, rows, p, q,
    BLOCK_M: tl.constexpr, BLOCK_P: tl.constexpr, BLOCK_Q: tl.constexpr, PRECISION: tl.constexpr,
):  # fmt: skip
    """out[g] = a[g]^T @ b[g], summed over the rows: a (groups, rows, p), b (groups, rows, q), out (groups, p, q).
    This is both weight gradients: x^T @ grad_pre for w_down and hidden^T @ grad_out for w_up."""
    group = tl.program_id(2).to(tl.int64)
    offs_p = tl.program_id(0) * BLOCK_P + tl.arange(0, BLOCK_P)
    offs_q = tl.program_id(1) * BLOCK_Q + tl.arange(0, BLOCK_Q)
    mask_p = offs_p < p
    mask_q = offs_q < q
    a_ptr += group * rows * p
    b_ptr += group * rows * q
    dtype = a_ptr.dtype.element_ty

    acc = tl.zeros((BLOCK_P, BLOCK_Q), dtype=tl.float32)
    for m in range(0, rows, BLOCK_M):
        offs_m = m + tl.arange(0, BLOCK_M)
        mask_m = offs_m < rows
        a_t = tl.load(a_ptr + offs_p[:, None] + offs_m[None, :] * p, mask=mask_p[:, None] & mask_m[None, :], other=0.0)
        b = tl.load(b_ptr + offs_m[:, None] * q + offs_q[None, :], mask=mask_m[:, None] & mask_q[None, :], other=0.0)
        acc = tl.dot(a_t, b.to(dtype), acc, input_precision=PRECISION)
    out = out_ptr + group * p * q + offs_p[:, None] * q + offs_q[None, :]
    tl.store(out, acc.to(out_ptr.dtype.element_ty), mask=mask_p[:, None] & mask_q[None, :])


# ----------------------------------------------------------------------------------------------------------------
# Launchers, registered as custom ops so that torch.compile keeps them whole (with shapes from the fake kernels).
# ----------------------------------------------------------------------------------------------------------------

# Fused multiply-adds, as Triton has compiled them so far: Triton 3.9 warns that its default turns to none in 3.10,
# which would change the kernels' rounding and speed with the installed version. Options, not kernel arguments.
_OPTIONS = {"enable_fp_fusion": True}
_BLOCK_K = 128  # d_in per step of the tiled kernels
_BLOCK_N = 64  # d_out per step
_BLOCK_REDUCE = 64  # rows per step of the weight-gradient reduction
# Decoding (T = 1: one row per sequence, or a few per shared weight set) takes the split-K path: the tiled kernel
# would pad the rows to a 16-row tile and reduce over all of d_in serially in each program, which is latency-bound.
_DECODE_MAX_ROWS = 16
_DECODE_MAX_SPLITS = 32  # d_in slices per row: what every program of the second launch sums
_DECODE_TILE = 8192  # elements of a decode program's weight tile: 64 float32 registers per thread at 4 warps


def _problem(x, w_up):
    """View a (batch, length, ...) call as `groups` independent problems, one per weight set."""
    batch, length, d_in = x.shape
    groups, r, d_out = w_up.shape
    return groups, batch * length // groups if groups else 0, d_in, r, d_out  # (an empty batch: no weight set)


def beats_eager(x, w_up) -> bool:
    """Whether the fused op is the faster choice for this call. Measured on an H200 (docs/performance.md): the decode
    path (few rows per weight set) takes about half the eager adapter's GPU time, the tiled path (prefill, training)
    about 1.2x its time, so "auto" uses the fused op for decoding only, in the dtypes it takes (float64 stays eager)."""
    return x.dtype in _DTYPES and _problem(x, w_up)[1] <= _DECODE_MAX_ROWS


@functools.cache
def _multiprocessor_count(device) -> int:
    if device.type == "cuda":
        return torch.cuda.get_device_properties(device).multi_processor_count
    return 4  # Triton's interpreter: any value is correct; a few exercise the d_in and column splits in the tests.


def _forward(
    x: torch.Tensor, w_down: torch.Tensor, w_up: torch.Tensor, residual: torch.Tensor, ffn_out: torch.Tensor | None
) -> torch.Tensor:
    """The custom op's implementation, called by `fused_expert_adapter`, by a compiled graph's code (which without CUDA
    graphs is host time at every step, as eager decoding is) or by anyone: like `fused_expert_adapter`, it launches
    the kernels of an earlier call with its inputs' signature directly, and checks the inputs of any other call."""
    return _compute(x, w_down, w_up, residual, ffn_out)


def _compute(x, w_down, w_up, residual, ffn_out, out=None):
    """`_forward`, into `out` when one is given."""
    if _elsewhere(x):
        with torch.cuda.device(x.device):
            return _compute(x, w_down, w_up, residual, ffn_out, out)
    if launches := _DECODE_LAUNCHES.get(_call_signature(x, w_down, w_up, residual, ffn_out)):
        return launches(x, w_down, w_up, residual, ffn_out, out)
    _check_inputs(x, w_down, w_up, residual, ffn_out)
    return _launch(x, w_down, w_up, residual, ffn_out, out)


def _launch(x, w_down, w_up, residual, ffn_out, out=None):
    """The kernels for one call, whose inputs were checked."""
    rows = _problem(x, w_up)[1]
    out = _new_output(x, residual, ffn_out) if out is None else out
    if out.numel() == 0 or rows == 0:
        return out.copy_(residual if ffn_out is None else residual + ffn_out)
    ffn_out = None if ffn_out is None else ffn_out.contiguous()
    inputs = (x.contiguous(), _matrices_contiguous(w_down), _matrices_contiguous(w_up), residual.contiguous(), ffn_out)
    # The path depends on shapes only: no host synchronisation, so the op can be captured in a CUDA graph.
    if rows <= _DECODE_MAX_ROWS:
        _decode_forward(*inputs, out, keep=_cast_free(x, w_down, w_up))
    else:
        _tiled_forward(*inputs, out)
    return out


_expert_adapter = torch.library.custom_op("hyperllava::expert_adapter", _forward, mutates_args=())


def _new_output(x, residual, ffn_out):
    return residual.new_empty(residual.shape, dtype=_output_dtype(x, residual, ffn_out))


def _output_dtype(x, residual, ffn_out):
    dtype = torch.promote_types(x.dtype, residual.dtype)
    return dtype if ffn_out is None else torch.promote_types(dtype, ffn_out.dtype)


def _matrices_contiguous(weights):
    """The weights with each sample's matrix contiguous. The kernels take the batch stride as it comes, so the per-layer
    views of the language expert's generated weights (a batch stride of all layers' weights) are read in place instead
    of copied at every decoding step."""
    return weights if weights[0].is_contiguous() else weights.contiguous()


def _tiled_forward(x, w_down, w_up, residual, ffn_out, out):
    """One launch; each program reduces over all of d_in for a block of rows (prefill and training)."""
    groups, rows, d_in, r, d_out = _problem(x, w_up)
    block_r, precision = max(16, triton.next_power_of_2(r)), ("ieee" if x.dtype == torch.float32 else "tf32")
    sms = _multiprocessor_count(x.device)
    block_m = 32 if groups * triton.cdiv(rows, 32) >= sms else 16
    row_blocks = triton.cdiv(rows, block_m)
    # Few row blocks: also split the output columns so that every SM has work; each split recomputes x W_d.
    splits = max(1, min(triton.cdiv(d_out, _BLOCK_N), sms // (groups * row_blocks)))
    cols_per_program = triton.cdiv(triton.cdiv(d_out, splits), _BLOCK_N) * _BLOCK_N
    grid = (row_blocks, triton.cdiv(d_out, cols_per_program), groups)
    ffn, ffn_settings = _ffn_arguments(residual, ffn_out)
    _forward_kernel[grid](
        x, w_down, w_up, residual, ffn, out,
        rows, d_in, d_out, r, cols_per_program, w_down.stride(0), w_up.stride(0),
        BLOCK_M=block_m, BLOCK_K=_BLOCK_K, BLOCK_N=_BLOCK_N, BLOCK_R=block_r, PRECISION=precision, **ffn_settings,
        **_OPTIONS,
    )  # fmt: skip


def _ffn_arguments(residual, ffn_out):
    """The kernels' FFN output and its settings. Without one they never read its pointer: the residual stands in."""
    if ffn_out is None:
        return residual, {"HAS_FFN": False, "SUM_DTYPE": tl.float32}
    sum_dtype = torch.promote_types(residual.dtype, ffn_out.dtype)
    return ffn_out, {"HAS_FFN": True, "SUM_DTYPE": getattr(tl, str(sum_dtype).removeprefix("torch."))}


def _cast_free(x, w_down, w_up) -> bool:
    """Whether `fused_expert_adapter` would hand these inputs to the kernels as they are: nothing to cast to x's dtype
    or to autocast's."""
    autocast = torch.is_autocast_enabled(x.device.type) and torch.get_autocast_dtype(x.device.type)
    return w_down.dtype == w_up.dtype == x.dtype and autocast in (False, x.dtype)


def _decode_forward(x, w_down, w_up, residual, ffn_out, out, keep=False):
    """Two launches with one short step per program, each sized to give about one program per SM:
    (1) the pre-activation x W_d of every row, split over d_in into float32 partial sums;
    (2) per row and block of output columns: sum the partials, SiLU(gate) * up, @ W_u, + residual (+ FFN output).
    No program reads more than a slice of the weights, so the latency is two memory round trips, not d_in / step.
    On Hopper and later the second launch starts while the first runs (`_dependent_launch`)."""
    signature = _call_signature(x, w_down, w_up, residual, ffn_out)
    launches = _DECODE_LAUNCHES.get(signature) or _DecodeLaunches(x, w_down, w_up, residual, ffn_out)
    launches(x, w_down, w_up, residual, ffn_out, out)
    # Kept for later calls when these are checked inputs that `fused_expert_adapter` would hand over as they are
    # (`keep`): then a call with the same signature needs nothing of what this one did. (Triton's interpreter compiles
    # nothing.)
    if launches.compiled and keep:
        _DECODE_LAUNCHES[signature] = launches


# Triton's own launch (binding the arguments, working out their specialisation, looking the compiled kernel up) costs
# tens of microseconds of host time, and eager decoding is bound by host time: the decode path's launches are kept per
# call signature with the kernels Triton compiled for them, and a call with that signature launches those directly.
_DECODE_LAUNCHES = {}


def _call_signature(x, w_down, w_up, residual, ffn_out):
    """What a decode call's launches depend on: each tensor's shape, strides, dtype, device (where Triton loaded the
    kernels: every launch runs with x's device current, see `_elsewhere`) and address modulo 16 (Triton specialises a
    kernel on whether each pointer is 16-byte aligned), and autocast's dtype where it is on (`fused_expert_adapter`
    casts to it). Launches are kept for the signature of checked inputs that `fused_expert_adapter` would hand over
    without a cast (`_decode_forward`), so a call with that signature would pass the checks, need no cast and reach the
    kernels as they are."""
    ffn = (
        None
        if ffn_out is None
        else (ffn_out.shape, ffn_out.stride(), ffn_out.dtype, ffn_out.device, ffn_out.data_ptr() % 16)
    )
    device_type = x.device.type
    return (
        x.shape, x.stride(), x.dtype, x.device, x.data_ptr() % 16,
        w_down.shape, w_down.stride(), w_down.dtype, w_down.device, w_down.data_ptr() % 16,
        w_up.shape, w_up.stride(), w_up.dtype, w_up.device, w_up.data_ptr() % 16,
        residual.shape, residual.stride(), residual.dtype, residual.device, residual.data_ptr() % 16,
        ffn, torch.is_autocast_enabled(device_type) and torch.get_autocast_dtype(device_type),
    )  # fmt: skip


class _DecodeLaunches:
    """The decode path's two launches for one call signature. The first call goes through Triton's launcher, which
    compiles the kernels (or finds them in its cache) and returns them; later calls launch those directly."""

    def __init__(self, x, w_down, w_up, residual, ffn_out):
        groups, rows, d_in, r, d_out = _problem(x, w_up)
        splits, self.down, self.up = _decode_launches(groups, rows, d_in, r, d_out, _multiprocessor_count(x.device))
        self.partial_shape = (groups, rows, splits, 2 * r)
        self.out_shape, self.out_dtype, self.device = residual.shape, _output_dtype(x, residual, ffn_out), x.device
        dependent = _dependent_launch(x.device)
        # Every argument after the tensors, in the kernels' order, constexprs (the last ones) included: Triton's
        # launcher takes them so, and a compiled kernel takes them all.
        self.down_tail = (rows, d_in, 2 * r, splits, w_down.stride(0), *self.down["blocks"].values(), dependent)
        ffn_settings = _ffn_arguments(residual, ffn_out)[1]
        self.up_tail = (
            rows, r, d_out, splits, w_up.stride(0), *self.up["blocks"].values(), *ffn_settings.values(), dependent
        )  # fmt: skip
        # (Triton's compiled kernel launches the way it was compiled: with these options.)
        self.options = {**_OPTIONS, "launch_pdl": True} if dependent else _OPTIONS
        self.compiled = None  # the two kernels' launchers, once Triton has compiled them

    def __call__(self, x, w_down, w_up, residual, ffn_out, out=None):
        if out is None:
            out = torch.empty(self.out_shape, dtype=self.out_dtype, device=self.device)
        partial = torch.empty(self.partial_shape, dtype=torch.float32, device=self.device)
        ffn = residual if ffn_out is None else ffn_out  # (without one the kernel never reads it)
        down_arguments = (x, w_down, partial, *self.down_tail)
        up_arguments = (partial, w_up, residual, ffn, out, *self.up_tail)
        if self.compiled:
            launch_down, launch_up = self.compiled
            launch_down(*down_arguments)
            launch_up(*up_arguments)
        else:
            down = _decode_down_kernel[self.down["grid"]](*down_arguments, **self.options)
            up = _decode_up_kernel[self.up["grid"]](*up_arguments, **self.options)
            if down is not None and up is not None:
                self.compiled = down[self.down["grid"]], up[self.up["grid"]]
        return out


@functools.cache
def _dependent_launch(device) -> bool:
    """Whether the decode kernels use programmatic dependent launch (Hopper and later, with a Triton that has it, not
    its interpreter): each may start before the kernel ahead of it has finished and waits for it inside (`gdc_wait`),
    so that its launch overlaps that kernel, and the up kernel's reads of its weights and the residual overlap the
    down kernel. In a decoding step with CUDA graphs the two launches are most of what the experts cost
    (docs/performance.md)."""
    if device.type != "cuda" or torch.version.hip or os.environ.get("TRITON_INTERPRET") == "1":
        return False  # (an AMD GPU is a "cuda" device under ROCm, and the wait is NVIDIA's PTX)
    # In a `try`: Transformers refuses a Hub repo's remote code that imports, outside one, a package not installed
    # (Triton, on a machine without it), even here where the import never runs.
    try:
        from triton.backends.nvidia.compiler import CUDAOptions  # (the launch option and the wait came in together)
    except ImportError:  # (a Triton without NVIDIA's backend)
        return False
    triton_has_it = "launch_pdl" in CUDAOptions.__dataclass_fields__ and hasattr(tl.extra.cuda, "gdc_wait")
    return triton_has_it and torch.cuda.get_device_capability(device)[0] >= 9


@functools.cache
def _decode_launches(groups, rows, d_in, r, d_out, sms):
    """The decode kernels' grids and block sizes for one shape, worked out once: eager decoding makes the same
    launches at every step and layer, and its time is host time."""
    row_programs = groups * rows
    block_2r, block_r = triton.next_power_of_2(2 * r), triton.next_power_of_2(r)
    fewest_k = max(16, triton.next_power_of_2(triton.cdiv(d_in, _DECODE_MAX_SPLITS)))
    block_k = _decode_block(d_in, row_programs, sms, fewest_k, _DECODE_TILE // block_2r)
    splits = triton.cdiv(d_in, block_k)
    block_n = _decode_block(d_out, row_programs, sms, 64, _DECODE_TILE // block_r)
    down = {"grid": (splits, rows, groups), "blocks": {"BLOCK_K": block_k, "BLOCK_2R": block_2r}}
    up_blocks = {"BLOCK_S": triton.next_power_of_2(splits), "BLOCK_R": block_r, "BLOCK_N": block_n}
    return splits, down, {"grid": (triton.cdiv(d_out, block_n), rows, groups), "blocks": up_blocks}


def _decode_block(size, row_programs, sms, smallest, largest):
    """The power-of-2 slice of `size` that gives each row about sms / row_programs programs; `smallest` wins over
    `largest` (a d_in so long that the tile grows rather than the number of partial sums)."""
    programs_per_row = triton.cdiv(sms, row_programs)
    return max(smallest, min(largest, triton.next_power_of_2(triton.cdiv(size, programs_per_row))))


class DecodeAdapter:
    """One expert layer's adapter for the eager decoding steps of a sequence: `residual + FFN(x) + E(x)` by one launch
    of `_decode_add_kernel`, which reads the sequence's W_d and W_u where they are, in place of LLaVA's residual add.
    Eager decoding is bound by the host's time per call: this costs a step one launch per expert layer where LLaVA's
    add costs one op, while the fused op adds two launches, two buffers and the lookup of its call's signature, and
    the eager adapter five ops. From the second call on, PyTorch's launcher launches the compiled kernel on CUDA where
    it can (`_later_launches`). On an H200's host (run 14, docs/performance.md) a call took 22.6 us at batch 1 against
    LLaVA's add 7.7 and the eager adapter's 63.0.

    Made where the fused kernels run (an NVIDIA GPU with Triton; Triton's interpreter on a CPU). Serves calls like its
    first single-token step, if the kernel takes that one: x, the residual and the FFN's output in the weights' dtype,
    on their device, contiguous, 16-byte aligned (as fresh tensors are: the launches are compiled for it), at most 16
    rows per weight set and a rank of at most 256, no autocast, and nothing that needs to see the ops
    (`_plain_eager_call`: a dispatch mode such as FlopCounterMode, a tracer, vmap). Returns None for any other call (a
    prefill, a step of several tokens, ...), which the caller then runs otherwise, and for every call after a launch
    through Triton failed (with a warning; Triton's compiler's errors among them). The first launch, which loads the
    kernel, is not made inside a CUDA graph capture (loading a module is not allowed in one); once loaded, the launch
    can be captured."""

    def __init__(self, w_down, w_up):
        self.w_down, self.w_up = w_down, w_up
        self.layout = self.arguments = self.launch = self.device_type = None

    def __deepcopy__(self, memo):
        # (A copied cache's weights are copies: its adapters read those.)
        return type(self)(copy.deepcopy(self.w_down, memo), copy.deepcopy(self.w_up, memo))

    def __call__(self, x, residual, ffn_out):
        """`residual + ffn_out + E(x)`, a new tensor, or None where this call is not served."""
        # (Every tensor's device: later launches pass addresses, which nothing checks against the device.)
        devices = (x.device, residual.device, ffn_out.device)
        layout = (x.shape, x.dtype, residual.shape, residual.dtype, ffn_out.shape, ffn_out.dtype, devices)
        if self.layout is None:
            if x.dim() != 3 or x.shape[1] != 1:  # (a prefill, or assisted decoding's steps of several tokens)
                return None
            self.layout, self.arguments = layout, self._arguments(x, residual, ffn_out)
            self.device_type = x.device.type
        if (
            layout != self.layout
            or self.arguments is None
            or (x.data_ptr() | residual.data_ptr() | ffn_out.data_ptr()) % 16
            or not (x.is_contiguous() and residual.is_contiguous() and ffn_out.is_contiguous())
            or torch.is_autocast_enabled(self.device_type)
            or not _plain_eager_call(x, residual, ffn_out)
            or (self.launch is None and x.is_cuda and torch.cuda.is_current_stream_capturing())
        ):
            return None
        out = torch.empty_like(residual)  # (a new tensor: whoever holds the FFN's output or the residual keeps them)
        if _elsewhere(x):  # (a kernel loaded for one device launches with it current)
            with torch.cuda.device(x.device):
                return self._launch(x, residual, ffn_out, out)
        return self._launch(x, residual, ffn_out, out)

    def _arguments(self, x, residual, ffn_out):
        """The kernel's grid and its arguments after the tensors (constexprs last: a compiled kernel takes them all),
        or None where it does not take this call."""
        w_down, w_up = self.w_down, self.w_up
        devices = (x.device, residual.device, ffn_out.device, w_down.device, w_up.device)
        if not (w_down.dim() == w_up.dim() == 3 and len(set(devices)) == 1):
            return None
        groups, rows, d_in, r, d_out = _problem(x, w_up)
        if not (
            x.dtype == residual.dtype == ffn_out.dtype == w_down.dtype == w_up.dtype
            and x.dtype in _DTYPES
            and groups in (1, x.shape[0])
            and 0 < rows <= _DECODE_MAX_ROWS
            and w_down.shape == (groups, d_in, 2 * r)
            and residual.shape == ffn_out.shape == (*x.shape[:-1], d_out)
            and w_down[0].is_contiguous()
            and w_up[0].is_contiguous()
        ):
            return None
        block_r = triton.next_power_of_2(r)
        if block_r > 256:  # (the W_u tile of a program's 64 columns would not fit its registers)
            return None
        block_k = min(triton.next_power_of_2(d_in), _DECODE_TILE // (2 * block_r))
        # About a program per SM, each of which reads all of its row's W_d: more would only add reads of L2.
        block_n = _decode_block(d_out, groups * rows, _multiprocessor_count(x.device), 64, _DECODE_TILE // block_r)
        grid = (triton.cdiv(d_out, block_n), rows, groups)
        return grid, (rows, d_in, r, d_out, w_down.stride(0), w_up.stride(0), block_k, block_r, block_n)

    def _launch(self, x, residual, ffn_out, out):
        grid, tail = self.arguments
        if self.launch is not None:
            self.launch(x, self.w_down, self.w_up, residual, ffn_out, out, *tail)
            return out
        names = ("BLOCK_K", "BLOCK_R", "BLOCK_N")
        try:
            compiled = _decode_add_kernel[grid](
                x, self.w_down, self.w_up, residual, ffn_out, out, *tail[:-3], **dict(zip(names, tail[-3:])),
                **_OPTIONS,
            )  # fmt: skip
        # Any failure, Triton's compiler's among them (its errors are no RuntimeError): the eager adapter can run
        # instead.
        except Exception as error:
            self.arguments = None
            warnings.warn(
                f"the language expert's adapters run eagerly: launching their decoding kernel failed: {error}"
            )
            return None
        if compiled is not None:  # (Triton's interpreter compiles nothing)
            self.launch = self._later_launches(compiled, grid)
        return out

    def _later_launches(self, compiled, grid):
        """What launches the kernel that Triton compiled for this adapter's calls from the second call on, given every
        argument in the kernel's order: on CUDA PyTorch's launcher of Triton's kernels, where it launches this kernel
        as Triton would; otherwise (an older torch, a stand-in kernel in Triton's interpreter) the compiled kernel's own
        launcher. (`benchmarks/probe_launches.py` times both in the step.)"""
        if self.device_type == "cuda" and hasattr(torch._C, "_StaticCudaLauncher"):  # (since torch 2.8)
            with contextlib.suppress(ValueError):
                # (Six tensors: x, W_d, W_u, the residual, the FFN's output and the output.)
                return _TorchLaunch(compiled, grid, 6, self.arguments[1])
        return compiled[grid]


class _TorchLaunch:
    """Triton's `compiled` kernel launched on `grid` by PyTorch's launcher of Triton's kernels (the one Inductor's code
    launches with) on the current stream: one call into C++, whereas the compiled kernel's own launcher runs Triton's
    Python around its call and checks each tensor's pointer with the driver. Called as that launcher is (every argument
    in the kernel's order, constexprs too): first `tensors` tensors, passed as their addresses (the caller checked
    their device), then `tail`, the same at every call (given here). A kernel that PyTorch's launcher would launch
    otherwise than Triton does is refused with a ValueError (`_torch_launcher_arguments`), and so is any while
    Triton's launch hooks are set (when this is made: a hook set later is not called for its launches)."""

    def __init__(self, compiled, grid, tensors, tail):
        knobs = getattr(triton, "knobs", None)  # (since Triton 3.4; before, the hooks were the compiled kernel's)
        hooks = knobs.runtime if knobs else type(compiled)
        if any(getattr(hook, "calls", hook) for hook in (hooks.launch_enter_hook, hooks.launch_exit_hook)):
            raise ValueError("Triton's launch hooks are set (a profiler's?): PyTorch's launcher would not call them")
        self.tensors = tensors
        self.types, kept = _torch_launcher_arguments(compiled, (0,) * tensors + tuple(tail))
        self.tail = kept[tensors:]  # (Triton specialises no tensor argument away)
        self.kernel = (compiled.function, *grid, compiled.metadata.num_warps, compiled.metadata.shared)
        self.compiled = compiled  # (its module, and so `compiled.function`, stays loaded while it is referenced)

    def __call__(self, *args):
        addresses = [tensor.data_ptr() for tensor in args[: self.tensors]]
        stream = torch._C._cuda_getCurrentRawStream(args[0].get_device())
        torch._C._StaticCudaLauncher._launch_kernel(*self.kernel, self.types, (*addresses, *self.tail), stream)


# PyTorch's launcher's letters for Triton's scalar parameter types.
_SCALAR_TYPES = {"i32": "i", "i64": "l", "u32": "I", "u64": "K", "fp32": "f", "fp64": "d"}


def _torch_launcher_arguments(compiled, args):
    """The argument types that PyTorch's launcher takes for Triton's `compiled` kernel, given every argument in the
    kernel's order, and the arguments it is passed: those that are the compiled kernel's parameters (not the
    constexprs: Triton's own and the integers 1 that it specialised as constants), pointers as addresses ("K"), then
    a null address for each of Triton's scratch buffers that the kernel takes (Triton's newer kernels take one for
    each size in their metadata). Refused (ValueError): a kernel that uses a scratch buffer (the null address would
    have it write where it must not), one that takes a scalar of a type not in `_SCALAR_TYPES`, or one compiled for a
    launch with options that PyTorch's launcher does not make or with Triton's instrumentation."""
    signature = compiled.src.signature  # (each parameter's type by name, "constexpr" for a constant)
    types, kept = "", []
    for name, arg in zip(compiled.src.fn.arg_names, args, strict=True):
        kind = signature[name]
        if kind == "constexpr":
            continue
        if not (kind.startswith("*") or kind in _SCALAR_TYPES):
            raise ValueError(f"{compiled.metadata.name} takes {name} as {kind}, which this launch does not pass")
        types += "K" if kind.startswith("*") else _SCALAR_TYPES[kind]
        kept.append(arg)
    metadata = compiled.metadata
    sizes = [getattr(metadata, size, None) for size in ("global_scratch_size", "profile_scratch_size")]
    if any(sizes):
        raise ValueError(f"{metadata.name} uses Triton's scratch memory, which this launch does not provide")
    # (Triton's instrumentation, such as its sanitizer, adds parameters of its own.)
    options = {"launch_pdl": False, "launch_cooperative_grid": False, "num_ctas": 1, "instrumentation_mode": ""}
    if any(getattr(metadata, option, plain) != plain for option, plain in options.items()):
        raise ValueError(f"{metadata.name} was compiled for a launch that PyTorch's launcher does not make: {options}")
    scratch = [None for size in sizes if size is not None]
    return types + "O" * len(scratch), (*kept, *scratch)


@_expert_adapter.register_fake
def _(x, w_down, w_up, residual, ffn_out):
    return _new_output(x, residual, ffn_out)


@torch.library.custom_op("hyperllava::expert_adapter_backward", mutates_args=())
def _expert_adapter_backward(
    grad_out: torch.Tensor, x: torch.Tensor, w_down: torch.Tensor, w_up: torch.Tensor
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    groups, rows, d_in, r, d_out = _problem(x, w_up)
    grad_x, grad_w_down, grad_w_up = _new_contiguous(x, w_down, w_up)
    if rows == 0 or x.numel() == 0:
        return grad_x.zero_(), grad_w_down.zero_(), grad_w_up.zero_()
    block_r, precision = max(16, triton.next_power_of_2(r)), ("ieee" if x.dtype == torch.float32 else "tf32")
    x, grad_out = x.contiguous(), grad_out.contiguous()
    grad_pre = x.new_empty(groups, rows, 2 * r)
    hidden = x.new_empty(groups, rows, r)
    w_down, w_up = _matrices_contiguous(w_down), _matrices_contiguous(w_up)
    _backward_rows_kernel[(triton.cdiv(rows, 16), groups)](
        x, w_down, w_up, grad_out, grad_x, grad_pre, hidden,
        rows, d_in, d_out, r, w_down.stride(0), w_up.stride(0),
        BLOCK_M=16, BLOCK_K=_BLOCK_K, BLOCK_N=_BLOCK_N, BLOCK_R=block_r, PRECISION=precision, **_OPTIONS,
    )  # fmt: skip
    block_2r = max(16, triton.next_power_of_2(2 * r))
    _rows_reduction_kernel[(triton.cdiv(d_in, 64), triton.cdiv(2 * r, block_2r), groups)](
        x, grad_pre, grad_w_down, rows, d_in, 2 * r,
        BLOCK_M=_BLOCK_REDUCE, BLOCK_P=64, BLOCK_Q=block_2r, PRECISION=precision, **_OPTIONS,
    )  # fmt: skip
    _rows_reduction_kernel[(triton.cdiv(r, block_r), triton.cdiv(d_out, _BLOCK_N), groups)](
        hidden, grad_out, grad_w_up, rows, r, d_out,
        BLOCK_M=_BLOCK_REDUCE, BLOCK_P=block_r, BLOCK_Q=_BLOCK_N, PRECISION=precision, **_OPTIONS,
    )  # fmt: skip
    return grad_x, grad_w_down, grad_w_up


@_expert_adapter_backward.register_fake
def _(grad_out, x, w_down, w_up):
    return _new_contiguous(x, w_down, w_up)


def _new_contiguous(*tensors):
    # Not empty_like: that keeps an input's strides, and the kernels write contiguous rows (compile checks strides).
    return tuple(t.new_empty(t.shape) for t in tensors)


def _setup_context(ctx, inputs, output):
    x, w_down, w_up, residual, ffn_out = inputs
    ctx.save_for_backward(x, w_down, w_up)
    ctx.residual_dtype = residual.dtype
    ctx.ffn_dtype = None if ffn_out is None else ffn_out.dtype


def _backward(ctx, grad_out):
    x, w_down, w_up = ctx.saved_tensors
    grad_x, grad_w_down, grad_w_up = torch.ops.hyperllava.expert_adapter_backward(grad_out, x, w_down, w_up)
    grad_ffn = None if ctx.ffn_dtype is None else grad_out.to(ctx.ffn_dtype)
    return grad_x, grad_w_down, grad_w_up, grad_out.to(ctx.residual_dtype), grad_ffn


_expert_adapter.register_autograd(_backward, setup_context=_setup_context)


# ----------------------------------------------------------------------------------------------------------------
# The language expert beside the FFN, on a second stream (compiled decoding). Its adapter reads only the FFN's input
# and is only added after the FFN, so it can run while the FFN's GEMMs do: in a CUDA graph the two branches run side
# by side, and the final add is Inductor's to fuse into the next layer's RMSNorm (LLaVA's graph already fuses the
# FFN's residual add there). `modeling_hyperllava.ADAPTER_BESIDE_FFN` switches it on.
# ----------------------------------------------------------------------------------------------------------------


def expert_adapter_beside_ffn(x, w_down, w_up, residual, ffn):
    """`residual + ffn(x) + E(x)` for a compiled decoding step, E(x) computed on a side stream while the
    FFN runs on the current one (the arguments as `fused_expert_adapter`'s; `ffn` a module or function of x)."""
    if torch.is_autocast_enabled(x.device.type):  # (the fork cannot cast x as autocast would, and stay ordered)
        return fused_expert_adapter(x, w_down, w_up, residual, ffn(x))
    _check_inputs(x, w_down, w_up, residual)
    w_down, w_up = w_down.to(x.dtype), w_up.to(x.dtype)
    adapter = torch.ops.hyperllava.expert_adapter_fork(x, w_down, w_up)
    ffn_out = ffn(x)
    torch.ops.hyperllava.expert_adapter_join(adapter, ffn_out, (x, w_down, w_up))
    return residual + ffn_out + adapter


_SIDE_STREAMS = threading.local()


def _side_stream(device):
    # High priority: drawn from another pool than the streams Torch makes for itself (a CUDA graph's capture stream,
    # say), and the adapter's few blocks are scheduled ahead of the FFN's waiting ones. One per thread and device: a
    # stream joins one CUDA graph capture at a time, and two threads may capture at once on one device. (Torch hands
    # out its pool's 32 high-priority streams per device in turn: past 32 threads, two may get one stream.)
    streams = vars(_SIDE_STREAMS).setdefault("by_device", {})
    if device not in streams:
        streams[device] = torch.cuda.Stream(device, priority=-1)
    return streams[device]


# Declared to write x, which it only reads: a compiled graph orders ops by their data, not as written, and would
# otherwise move the fork after the FFN, next to the join; "written", x is read by the FFN only after the fork.
@torch.library.custom_op("hyperllava::expert_adapter_fork", mutates_args=("x",))
def _expert_adapter_fork(x: torch.Tensor, w_down: torch.Tensor, w_up: torch.Tensor) -> torch.Tensor:
    """E(x), launched on the side stream after what the current stream has queued (on a CPU, Triton's interpreter:
    no streams)."""
    on_side_stream = contextlib.nullcontext()
    if x.is_cuda:
        side, current = _side_stream(x.device), torch.cuda.current_stream(x.device)
        if side == current:
            raise RuntimeError("expert_adapter_fork: the current stream is the side stream the adapter is forked to")
        side.wait_stream(current)
        on_side_stream = torch.cuda.stream(side)
    # The adapter's memory is the current stream's, which reads it after the join and frees it: the side stream's own,
    # it could go to another thread's fork on that stream (see _side_stream) before this thread's add has read it. The
    # zero residual and the kernels' partial sums are the side stream's, reused in its own order.
    adapter = x.new_empty(_adapter_shape(x, w_up))
    with on_side_stream:
        return _compute(x, w_down, w_up, x.new_zeros(adapter.shape), None, adapter)


@_expert_adapter_fork.register_fake
def _(x, w_down, w_up):
    return x.new_empty(_adapter_shape(x, w_up))


def _adapter_shape(x, w_up):
    return (*x.shape[:-1], w_up.shape[-1])


# Declared to write the adapter (so that its readers come after), to read the FFN's output (so that it comes after the
# FFN) and to read the fork's inputs: their memory is then kept until the current stream has waited for the side
# stream, which reads them until then, rather than freed after the FFN's last read and handed to its next buffer.
@torch.library.custom_op("hyperllava::expert_adapter_join", mutates_args=("adapter",))
def _expert_adapter_join(adapter: torch.Tensor, ffn_out: torch.Tensor, forked: list[torch.Tensor]) -> None:
    """The current stream waits for the side stream's work: the adapter the fork launched."""
    if not adapter.is_cuda:
        return
    side = _side_stream(adapter.device)
    if torch.cuda.is_current_stream_capturing():  # (only then: outside a capture there is nothing to check)
        with torch.cuda.stream(side):
            if not torch.cuda.is_current_stream_capturing():  # (CUDA's own error would not say why)
                raise RuntimeError(
                    "expert_adapter_join: the fork of the adapter beside the FFN was left out of this CUDA graph "
                    "capture (a graph break or partition between the fork and the join?)"
                )
    torch.cuda.current_stream(adapter.device).wait_stream(side)


@_expert_adapter_join.register_fake
def _(adapter, ffn_out, forked):
    return None


__all__ = ["fused_expert_adapter", "is_available"]
