"""GPU time of the expert adapter alone at LLaVA-1.5-7B shapes: the fused Triton op (and its old one-launch tiled
path) against the eager PyTorch adapter, plain and under torch.compile.

    python benchmarks/bench_kernel.py                  # bf16 on one CUDA GPU, under 3 minutes
    python benchmarks/bench_kernel.py --compile-mode max-autotune-no-cudagraphs   # slower: autotunes the matmuls

Launch overhead is taken out: each variant's N calls are captured in one CUDA graph, the graph is replayed, and the
time per call is the replay time / N (median over the replays). That is what a decoding step compiled with CUDA
graphs pays per expert layer. Each call of a graph reads its own copy of the inputs, with at least twice the L2
cache's size among the copies, so the weights come from HBM as in a real decoding step (where the rest of the
layer evicts them between two calls). Before timing, every variant's output is checked against a float32 reference.
"""

import argparse
import math
import statistics
import sys

import torch
import torch.nn.functional as F

from transformers_hyperllava import fused_expert_hyperllava as fused
from transformers_hyperllava.modeling_hyperllava import expert_adapter

D, R = 4096, 16  # Vicuna-7B's hidden size, HyperLLaVA's bottleneck
CASES = {  # name: (batch, length, weight batch, layers the weights are a view into, as the language expert's are)
    "decode B=1": (1, 1, 1, None),
    "decode B=16, per-sample weights": (16, 1, 16, None),
    "decode B=16, per-sample weights, views of 16 layers'": (16, 1, 16, 16),
    "decode B=16, shared weights": (16, 1, 1, None),
    "prefill B=8 x 640": (8, 640, 8, None),
    "train fwd B=4 x 1024": (4, 1024, 4, None),
}
TOLERANCE = 3e-2  # bf16: largest error relative to the largest reference value, as in the kernel tests


def make_inputs(batch, length, weight_batch, layers, dtype, seed):
    """x, w_down, w_up, residual. With `layers`, the weights are the first layer's views into one generated
    (weight batch, layers, P) tensor, as `split_weights` gives them: a batch stride of all layers' weights."""
    generator = torch.Generator(device="cuda").manual_seed(seed)

    def randn(*shape, scale=1.0):
        return (torch.randn(shape, generator=generator, device="cuda") * scale).to(dtype)

    leading = (weight_batch,) if layers is None else (weight_batch, layers)
    w_down, w_up = randn(*leading, D, 2 * R, scale=D**-0.5), randn(*leading, R, D, scale=R**-0.5)
    if layers is not None:
        generated = torch.cat([w_down.flatten(2), w_up.flatten(2)], dim=-1)
        w_down = generated[..., : D * 2 * R].unflatten(-1, (D, 2 * R))[:, 0]
        w_up = generated[..., D * 2 * R :].unflatten(-1, (R, D))[:, 0]
    return randn(batch, length, D), w_down, w_up, randn(batch, length, D)


def reference(x, w_down, w_up, residual):
    gate, up = torch.matmul(x.float(), w_down.float()).chunk(2, dim=-1)
    return residual.float() + torch.matmul(F.silu(gate) * up, w_up.float())


def forced(path):
    """The op with its forward path chosen by hand (the op picks by shape). The weights go in as the op passes them:
    views into all layers' weights are read in place (a `.contiguous()` here would time a copy of them too)."""

    def adapter(x, w_down, w_up, residual):
        out = torch.empty_like(residual)
        w_down, w_up = fused._matrices_contiguous(w_down), fused._matrices_contiguous(w_up)
        path(x.contiguous(), w_down, w_up, residual.contiguous(), None, out)  # no FFN output
        return out

    return adapter


VARIANTS = ("fused", "tiled (old path)", "eager", "eager + compile")


def variant(name, compile_mode):
    if name == "fused":
        return fused.fused_expert_adapter
    if name == "tiled (old path)":
        return forced(fused._tiled_forward)
    if name == "eager":
        return expert_adapter  # its default kernel is the eager one
    # Static shapes, as in the static-cache decoding step; a fresh compile per case.
    return torch.compile(expert_adapter, mode=compile_mode, dynamic=False, fullgraph=True)


def time_per_call(fn, input_sets, calls, replays):
    """Microseconds per call of `fn`, from a CUDA graph of `calls` calls cycling through `input_sets`."""
    for inputs in input_sets[:2]:  # compile / autotune, and let the allocator settle, outside the capture
        fn(*inputs)
    torch.cuda.synchronize()
    graph = torch.cuda.CUDAGraph()
    with torch.cuda.graph(graph):
        for i in range(calls):
            fn(*input_sets[i % len(input_sets)])
    graph.replay()
    start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
    times = []
    for _ in range(replays):
        start.record()
        graph.replay()
        end.record()
        end.synchronize()
        times.append(start.elapsed_time(end) * 1e3 / calls)
    del graph
    return statistics.median(times)


@torch.no_grad()
def main():
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--calls", type=int, default=100, help="calls captured per graph (at least)")
    parser.add_argument("--replays", type=int, default=20, help="timed replays per variant; the median is shown")
    parser.add_argument("--compile-mode", default="default", help="torch.compile mode for 'eager + compile'")
    parser.add_argument("--no-compile", action="store_true", help="skip 'eager + compile' (saves its compile time)")
    args = parser.parse_args()
    if not torch.cuda.is_available():
        sys.exit("bench_kernel.py measures GPU time and needs a CUDA GPU; none is visible here (nothing was run).")
    if not fused.is_available("cuda"):
        sys.exit("bench_kernel.py needs Triton for the fused kernel (`pip install triton`).")

    import triton

    properties = torch.cuda.get_device_properties(0)
    print(f"{properties.name}, torch {torch.__version__}, Triton {triton.__version__}, bf16, d = {D}, r = {R}")
    names = [name for name in VARIANTS if not (args.no_compile and name == "eager + compile")]
    l2_bytes = getattr(properties, "L2_cache_size", 50 * 2**20)
    rows, wrong = [], []
    for case, (batch, length, weight_batch, layers) in CASES.items():
        probe = make_inputs(batch, length, weight_batch, layers, torch.bfloat16, seed=0)
        # Enough distinct input copies that one graph replay streams at least twice the L2 cache from HBM.
        bytes_per_call = sum(t.numel() * t.element_size() for t in probe) + probe[3].numel() * 2  # + the output
        copies = min(1000, max(2, math.ceil(2 * l2_bytes / bytes_per_call)))
        input_sets = [probe] + [
            make_inputs(batch, length, weight_batch, layers, torch.bfloat16, s) for s in range(1, copies)
        ]
        calls = max(args.calls, copies)
        want = reference(*probe)
        path = "decode" if batch * length // weight_batch <= fused._DECODE_MAX_ROWS else "tiled"
        times = {}
        for name in names:
            fn = variant(name, args.compile_mode)
            got = fn(*probe).float()
            error = (got - want).abs().max().item() / want.abs().max().item()
            if error <= TOLERANCE:
                times[name] = time_per_call(fn, input_sets, calls, args.replays)
            else:  # the other variants still run, so that one bad variant does not cost the whole (GPU) run
                wrong.append(f"{case}: '{name}' is off by {error:.3g} x max |reference| (> {TOLERANCE}); not timed")
                print(wrong[-1], flush=True)
        rows.append((f"{case} [fused: {path}]", times))
        timings = ", ".join(f"{name} {us:.1f} us" for name, us in times.items())
        print(f"{case} ({calls} calls per graph over {copies} input copies): {timings}", flush=True)
        del input_sets, probe

    print("\nus per call (GPU time, CUDA graphs), and the ratio to eager; outputs checked against float32 first\n")
    print("| case | " + " | ".join(names) + " |")
    print("|---" * (len(names) + 1) + "|")
    for case, times in rows:
        cells = [cell(times, name) for name in names]
        print(f"| {case} | " + " | ".join(cells) + " |")
    if wrong:
        sys.exit("Wrong outputs (not timed):\n" + "\n".join(wrong))


def cell(times, name):
    if name not in times:
        return "wrong output"
    if "eager" not in times:
        return f"{times[name]:.1f}"
    return f"{times[name]:.1f} ({times[name] / times['eager']:.2f}x)"


if __name__ == "__main__":
    main()
