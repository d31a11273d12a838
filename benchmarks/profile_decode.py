"""Where a decoding step's time goes, LLaVA vs HyperLLaVA: device busy time, host gaps, and the kernels and host ops
that differ. `bench_overhead.py` gives the ratios; this says what makes them.

    python benchmarks/profile_decode.py --size 7b --out profile    # CUDA: kernels and host ops, traces in profile/
    python benchmarks/profile_decode.py --size tiny                 # CPU: host ops only (7B's depth, toy widths)
    python benchmarks/profile_decode.py --size 7b --eager           # eager decoding (dynamic cache), no compilation
    python benchmarks/profile_decode.py --size 7b --eager --batch 1 16  # at batch 1, then 16 (models built once)

By default each model decodes with a static cache and `torch.compile` (what `generate` compiles, with CUDA graphs on a
GPU): LLaVA, HyperLLaVA with its experts detached (the control: HyperLLaVA's code doing LLaVA's computation),
HyperLLaVA with its default adapter and, with the fused op (beside the FFN, on a second stream), after the FFN. After a
warm-up call that compiles, one call times the compiled forward calls (host time: a CUDA graph replays asynchronously)
from the first token's logits to the end, so that only decoding steps count, and one is profiled from the second
token's logits: its first decoding step (which records the CUDA graphs again when the call's new static cache gets new
addresses) stays out of the per-step tables too. With --eager the models decode as `generate` does by default
(host-bound at 7B), and HyperLLaVA runs with the eager adapter, on an NVIDIA GPU also with its default there, one
launch a layer ("auto"), and with the fused op ("triton"): where each one's host time goes, op by op (the profiler
slows the host, so the step times it shows are longer than unprofiled ones).
"""

import argparse
import contextlib
import os
import re
import statistics
import time
import unittest.mock

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TRANSFORMERS_VERBOSITY", "error")

import torch  # noqa: E402
from torch._dynamo.utils import counters  # noqa: E402
from torch.profiler import ProfilerActivity  # noqa: E402

from bench_overhead import (  # noqa: E402
    SIZES,
    HyperVariants,
    build_models,
    compile_on_any_device,
    decode_seconds_per_token,
    decode_step_seconds,
    device_busy_us,
    is_device_activity,
    make_batch,
    profile_decoding,
)
from transformers_hyperllava import fused_expert_hyperllava as fused  # noqa: E402
from transformers_hyperllava import modeling_hyperllava  # noqa: E402


@contextlib.contextmanager
def forward_clock(model):
    """Yields a list that collects the seconds of each compiled forward call `generate` makes in the meantime."""
    seconds, compiled_call = [], model.get_compiled_call

    def timed_compiled_call(compile_config):
        forward = compiled_call(compile_config)

        def call(**kwargs):
            started = time.perf_counter()
            output = forward(**kwargs)
            seconds.append(time.perf_counter() - started)
            return output

        return call

    model.get_compiled_call = timed_compiled_call
    try:
        yield seconds
    finally:
        del model.get_compiled_call


@contextlib.contextmanager
def adapter_clock():
    """Eager decoding only: yields a dict that collects, in the meantime, the host seconds of each adapter call less
    those of the FFN it runs ("seconds": the language expert's layers run their FFN inside `expert_adapter`, the
    visual expert's projector calls it without one; no synchronisation, host time being what a host-bound step is made
    of), and the decode launches that went through Triton's launcher ("through triton": those of a call signature with
    no launches kept yet). Run 9's H200 timed the fused op's direct launches at 56.5 us a call alone, the eager
    adapter's five ops at 86.0, yet eager decoding with the fused op took 44.5 ms a step against 30.8 (one call each):
    this says whether the step's adapter calls take what they take alone."""
    clock, adapter, launches = (
        {"seconds": [], "through triton": 0},
        modeling_hyperllava.expert_adapter,
        fused._DecodeLaunches,
    )

    def timed_adapter(*args, ffn=None, **kwargs):
        ffn_seconds = []

        def timed_ffn(x):
            started = time.perf_counter()
            output = ffn(x)
            ffn_seconds.append(time.perf_counter() - started)
            return output

        started = time.perf_counter()
        output = adapter(*args, ffn=None if ffn is None else timed_ffn, **kwargs)
        clock["seconds"].append(time.perf_counter() - started - sum(ffn_seconds))
        return output

    class CountedLaunches(launches):
        def __init__(self, *args):
            clock["through triton"] += 1
            super().__init__(*args)

    with (
        unittest.mock.patch.object(modeling_hyperllava, "expert_adapter", timed_adapter),
        unittest.mock.patch.object(fused, "_DecodeLaunches", CountedLaunches),
    ):
        yield clock


def per_key(profiler, device):
    """{name: (calls, total self time in us)} of the device activities (`device`) or of the host ops."""
    table = {}
    for entry in profiler.key_averages():
        if device and not is_device_activity(entry):
            continue  # a host op's device time is its kernels' (counted under their own names)
        value = entry.self_device_time_total if device else entry.self_cpu_time_total
        if value > 0:
            # Compiled graphs and regions are named per model; without the name they pair up across models.
            name = re.sub(r"(CompiledFxGraph|Compiled Region:) \S+", r"\1", entry.key)
            calls, total = table.get(name, (0, 0.0))
            table[name] = (calls + entry.count, total + value)
    return table


def differences(base, other, steps, top):
    """The `top` names whose time per step differs most between two `per_key` tables."""
    rows = []
    for name in set(base) | set(other):
        calls_b, time_b = base.get(name, (0, 0.0))
        calls_o, time_o = other.get(name, (0, 0.0))
        rows.append(((time_o - time_b) / steps, (calls_o - calls_b) / steps, name))
    rows.sort(key=lambda row: -abs(row[0]))
    return rows[:top]


def main(argv=None):
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--size", choices=sorted(SIZES), default="tiny")
    parser.add_argument(
        "--new-tokens", type=int, default=18, help="tokens per call (default 18: 17 steps timed, 16 profiled)"
    )
    parser.add_argument(
        "--batch", type=int, nargs="+", default=[1], help="sequences decoded together; several sizes run in turn"
    )
    parser.add_argument("--top", type=int, default=15, help="rows per difference table")
    parser.add_argument("--out", help="folder for the Chrome traces (one per model and batch size)")
    parser.add_argument("--eager", action="store_true", help="eager decoding (dynamic cache, nothing compiled)")
    args = parser.parse_args(argv)
    settings = SIZES[args.size]
    device = settings["device"]
    if device == "cuda" and not torch.cuda.is_available():
        parser.error("--size 7b needs a CUDA GPU (use --size tiny on a CPU)")
    if min(args.batch) < 1:
        parser.error(f"--batch sizes must be at least 1, got {args.batch}")
    config, llava, hyper = build_models(args.size, settings)
    if not args.eager and device != "cuda":
        compile_on_any_device(llava, hyper)
    variants = HyperVariants(hyper)
    candidates = {"llava": lambda: llava, "no experts": lambda: variants.use(None)}
    if not args.eager:
        kernels = ["auto" if fused.is_available(device) else "eager"]
    else:  # (and "auto", one launch a layer, where eager decoding does that)
        kernels = ["eager", "triton"] if fused.is_available(device) else ["eager"]
        kernels += ["auto"] if modeling_hyperllava.decode_adapters_available(device) else []
    candidates.update({kernel: lambda kernel=kernel: variants.use(kernel) for kernel in kernels})
    if kernels == ["auto"]:  # compiled with the fused op, beside the FFN on a second stream: also after the FFN
        candidates["after"] = lambda: variants.use("auto", beside_ffn=False)
    # The models are built once for every batch size (at 7B that is most of a short run's time).
    for batch_size in args.batch:
        profile_batch(args, candidates, make_batch(config, settings, batch_size, settings["text_tokens"]), device)


def profile_batch(args, candidates, batch, device):
    """Times, then profiles, every candidate's decoding of `batch`, and prints what differs from LLaVA's."""
    compiled = not args.eager
    generate_kwargs = {"cache_implementation": "static"} if compiled else {}
    batch_size = len(batch["input_ids"])
    if compiled:  # each batch size gets its own static graphs, as in bench_overhead.py
        torch._dynamo.reset()
    profiled_steps = args.new_tokens - 2  # the decoding forwards after the first (`ProfiledSteps`)
    mode = "eager (dynamic cache)" if args.eager else "compiled (static cache)"
    print(f"\n{args.size}, batch {batch_size}, {mode} decoding, {args.new_tokens} new tokens per call", flush=True)
    activities = [ProfilerActivity.CPU] + ([ProfilerActivity.CUDA] if device == "cuda" else [])
    # Every model timed before any is profiled: a profiler can leave its instrumentation attached to the process,
    # which slows the host in what runs after it (a second batch size is timed after the first one's profiles).
    timed = {}
    for name, get_model in candidates.items():
        model = get_model()
        # Each CUDA-graph recording adds its graph's non-static inputs (those copied in before every replay) here.
        recorded = [counters["inductor"]["cudagraph_recorded_non_static_inputs"]]
        # Compiles (and captures the CUDA graphs) outside the profile; eager, a warm-up.
        decode_seconds_per_token(model, batch, args.new_tokens, device, **generate_kwargs)
        recorded.append(counters["inductor"]["cudagraph_recorded_non_static_inputs"])
        # (Compiled, the clocks would go into the graph: there the forward call as a whole is timed instead.)
        with (
            forward_clock(model) as forward_seconds,
            adapter_clock() if args.eager else contextlib.nullcontext() as adapters,
        ):
            steps_seconds = decode_step_seconds(model, batch, args.new_tokens, device, **generate_kwargs)
        recorded.append(counters["inductor"]["cudagraph_recorded_non_static_inputs"])
        timed[name] = steps_seconds, forward_seconds, recorded, adapters

    results = {}
    for name, get_model in candidates.items():
        model = get_model()
        steps_seconds, forward_seconds, recorded, adapters = timed[name]
        step_seconds = statistics.median(steps_seconds)
        # The second profiled call: the profiler's first one in a process runs slower (LLaVA's, which comes first).
        profile_decoding(model, batch, args.new_tokens, device, activities, **generate_kwargs)
        profiler = profile_decoding(model, batch, args.new_tokens, device, activities, **generate_kwargs)
        kernels_and_copies, busy_us = device_busy_us(profiler)
        results[name] = {
            "profiler": profiler,
            "cpu": per_key(profiler, device=False),
            "device": per_key(profiler, device=True),
        }
        line = f"{name}: {step_seconds * 1e3:.3f} ms per step"
        if compiled:
            line += f", of which {statistics.median(forward_seconds) * 1e6:.1f} us in the compiled forward call"
        if device == "cuda":  # busy time from the profiled call: the profiler slows the host, not the device
            idle_us = step_seconds * 1e6 - busy_us / profiled_steps
            line += f", device busy {busy_us / profiled_steps:.1f} us, idle {idle_us:.1f} us"
            line += f", {kernels_and_copies / profiled_steps:.0f} kernels and copies"
            if compiled:  # A recording in the timed call (a new StaticCache at other addresses) is per-call work.
                line += f"; CUDA-graph recordings x non-static inputs: compiling call +{recorded[1] - recorded[0]}"
                line += f", timed call +{recorded[2] - recorded[1]}"
        # A first step (or a few) slower than the median would be per-call work, e.g. in the CUDA-graph tree, that a
        # mean over the call spreads over every token (the H200 runs before the median).
        first, mean, slowest = steps_seconds[0], statistics.mean(steps_seconds), max(steps_seconds)
        line += f"; steps: first {first * 1e3:.3f} ms, mean {mean * 1e3:.3f} ms, slowest {slowest * 1e3:.3f} ms"
        if adapters and adapters["seconds"]:  # (the prefill's calls among them: a few against the steps' many)
            seconds, median_us = adapters["seconds"], statistics.median(adapters["seconds"]) * 1e6
            line += (
                f"; adapter calls {len(seconds)}, host time per call without the FFN: median {median_us:.1f} us, "
                f"total {sum(seconds) * 1e3:.3f} ms; decode launches through Triton's launcher: "
                f"{adapters['through triton']}"
            )
        print(line, flush=True)
        if args.out:
            os.makedirs(args.out, exist_ok=True)
            trace = f"{name.replace(' ', '-')}-batch{batch_size}.json.gz"
            profiler.export_chrome_trace(os.path.join(args.out, trace))

    for name in candidates:
        if name == "llava":
            continue
        tables = [("host ops (self CPU time)", "cpu")] + (
            [("kernels and copies", "device")] if device == "cuda" else []
        )
        for title, key in tables:
            print(f"\nHyperLLaVA ({name}) - LLaVA, {title}, per decoding step:")
            print("| us per step | calls per step | name |\n|---|---|---|")
            for time_us, calls, op in differences(results["llava"][key], results[name][key], profiled_steps, args.top):
                print(f"| {time_us:+.1f} | {calls:+.1f} | {op[:100]} |")


if __name__ == "__main__":
    main()
