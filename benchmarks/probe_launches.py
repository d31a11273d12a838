"""What one launch costs eager decoding inside the step, by kind of launch: LLaVA decodes with a probe after the FFN of
each layer where HyperLLaVA has its language expert, each probe a launch that does nothing, in turns with LLaVA alone
and HyperLLaVA's adapters.

    python benchmarks/probe_launches.py --size 7b     # CUDA: about 5 minutes
    python benchmarks/probe_launches.py --size tiny   # CPU: the probes that need no GPU (7B's depth, toy widths)
    python benchmarks/probe_launches.py --size 7b --adapters-only --repeats 24 --new-tokens 16   # about 3.5 minutes
    python benchmarks/probe_launches.py --size 7b --adapters-only --lockstep   # in turns every 8 steps: about 3 minutes

Why: on the H200 machine a launch through Triton (the fused op, eager decoding's one launch a layer, and before them the
CUDA graphs' replays) seemed to cost eager decoding several times what its calls take alone, while the eager adapter's
PyTorch ops cost about what they take alone (docs/performance.md, run 13: the one launch 23.7 us a call alone, LLaVA's
add 6.7, yet about 75 us a layer in the step; run 14 did not bear that out, on a host too noisy to tell 1% apart:
`--adapters-only` with many short rounds is for that). The probes tell which part of a launch that is: the hook that
calls the probe (the floor of every probe), a PyTorch op, an empty Triton kernel launched as the one launch is (Triton's
cached launcher, six tensor arguments), the same twice in a row (a cost of the first launch after PyTorch's, or of every
one), an empty kernel that takes integers only (Triton checks each tensor argument's pointer with the driver), the empty
kernel launched by PyTorch's own launcher of Triton's kernels (the one Inductor's code launches with: one call into C++
and none of Triton's Python; with tensors, or with their addresses, which it does not check), and a CUDA graph of the
PyTorch op, replayed. Beside them HyperLLaVA runs detached, with its eager adapter, with "auto" (the one launch a layer)
whose later launches go through Triton's compiled kernel's launcher (as before commit de6e9ec), and with the library's
"auto", whose later launches go through PyTorch's launcher (if that launch writes what Triton's does). A probe's cost
per layer is its step's median over LLaVA's, divided by the probed layers, beside the host time of its calls themselves:
more in the step than in the calls means the launch slows what follows it.

On CUDA the report starts with whether a call waits for the GPU: each adapter's and probe's host time on an idle GPU
and queued behind a GPU sleep, and a whole decoding step's, with the Python and C functions each calls (counted).
Then where an eager decoding step's host time goes: in the expert layers, in the others, or outside the layers.
"""

import argparse
import concurrent.futures
import contextlib
import functools
import multiprocessing
import os
import statistics
import sys
import time

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TRANSFORMERS_VERBOSITY", "error")

import torch  # noqa: E402

from bench_overhead import (  # noqa: E402
    CACHE_ARG,
    SIZES,
    HyperVariants,
    TritonLaunchedDecodeAdapter,
    build_models,
    decode_step_times,
    gpu_sleep_cycles_per_ms,
    interleaved,
    lockstep_cell,
    lockstep_ratios,
    lockstep_rounds,
    make_batch,
    ratio_cell,
    timed_generate,
)
from transformers_hyperllava import fused_expert_hyperllava as fused  # noqa: E402
from transformers_hyperllava import modeling_hyperllava  # noqa: E402
from transformers_hyperllava.modeling_hyperllava import decode_adapters_available, expert_adapter  # noqa: E402


@contextlib.contextmanager
def probed(model, layers, probe, seconds):
    """`model` with `probe()` called after the FFN of each layer in `layers` (its output left as it is), the host
    seconds of each call appended to `seconds`: whether a probe costs the step its own time, or slows what follows."""

    def after_the_ffn(module, args, output):
        started = time.perf_counter()
        probe()  # (a hook that returned something would replace the FFN's output)
        seconds.append(time.perf_counter() - started)

    decoder_layers = model.model.language_model.layers
    handles = [decoder_layers[i].mlp.register_forward_hook(after_the_ffn) for i in layers]
    try:
        yield model
    finally:
        for handle in handles:
            handle.remove()


class TritonProbe:
    """An empty Triton kernel's launch on one program, launched as eager decoding's one launch is: the first through
    Triton's launcher, the later ones by the compiled kernel's cached launcher."""

    def __init__(self, kernel, args):
        self.kernel, self.args, self.launch = kernel, args, None

    def __call__(self):
        if self.launch is not None:
            self.launch()
            return
        compiled = self.kernel[(1,)](*self.args)
        if compiled is not None:  # (Triton's interpreter compiles nothing)
            self.launch = self.later_launches(compiled)

    def later_launches(self, compiled):
        return functools.partial(compiled[(1, 1, 1)], *self.args)


class TorchLauncherProbe(TritonProbe):
    """The same, the later launches by PyTorch's launcher of Triton's compiled kernels (as the library's adapter
    launches: `fused._TorchLaunch`); `by_address`: the tensors passed as their addresses, as the adapter passes them,
    else as tensors, whose pointers PyTorch's launcher checks with the driver as Triton's launcher does."""

    def __init__(self, kernel, args, by_address):
        super().__init__(kernel, args)
        self.by_address = by_address

    def later_launches(self, compiled):
        launch = (fused._TorchLaunch if self.by_address else TensorsTorchLaunch)(
            compiled, (1, 1, 1), len(self.args), ()
        )
        return functools.partial(launch, *self.args)


class TensorsTorchLaunch(fused._TorchLaunch):
    """`fused._TorchLaunch`, its tensors passed as tensors ("O")."""

    def __init__(self, compiled, grid, tensors, tail):
        super().__init__(compiled, grid, tensors, tail)
        self.types = "O" * tensors + self.types[tensors:]

    def __call__(self, *args):
        stream = torch._C._cuda_getCurrentRawStream(args[0].get_device())
        torch._C._StaticCudaLauncher._launch_kernel(
            *self.kernel, self.types, (*args[: self.tensors], *self.tail), stream
        )


@functools.cache
def empty_kernel():
    """A Triton kernel of six pointer arguments that does nothing."""
    import triton

    @triton.jit
    def _empty_kernel(a, b, c, d, e, f):
        pass

    return _empty_kernel


def make_probes(device):
    """Each probe's name and the function it calls after each probed FFN."""
    a, b, out = (torch.zeros(1, device=device) for _ in range(3))
    probes = {"hook alone": lambda: None, "PyTorch op": lambda: torch.add(a, b, out=out)}
    if device.type == "cuda":  # (the removed CUDA-graph adapters replayed a graph a layer: run 12, 1.070x)
        graph = torch.cuda.CUDAGraph()
        with torch.cuda.graph(graph):
            torch.add(a, b, out=out)
        probes["CUDA graph replay (of that op)"] = graph.replay
    if fused.is_available(device):
        # 16 elements each: aligned as fresh tensors are (the one launch's kernel is compiled for 16-byte alignment).
        tensors = [torch.zeros(16, device=device) for _ in range(6)]
        probes["Triton, 6 tensors"] = triton_tensors = TritonProbe(empty_kernel(), tensors)
        probes["Triton, 6 tensors, twice"] = lambda: (triton_tensors(), triton_tensors())
        # Integers that Triton does not specialise (1) nor mark divisible by 16.
        probes["Triton, 6 integers"] = TritonProbe(empty_kernel(), [7] * 6)
        if hasattr(torch._C, "_StaticCudaLauncher"):  # (since torch 2.8)
            probes["PyTorch's launcher, 6 tensors"] = TorchLauncherProbe(empty_kernel(), tensors, by_address=False)
            probes["PyTorch's launcher, 6 addresses"] = TorchLauncherProbe(empty_kernel(), tensors, by_address=True)
    return probes


@contextlib.contextmanager
def triton_launched_adapters(variants):
    """HyperLLaVA with "auto" adapters whose later launches go through Triton's compiled kernel's own launcher (the
    adapters are made at each call's prefill)."""
    made = modeling_hyperllava.DecodeAdapter
    modeling_hyperllava.DecodeAdapter = TritonLaunchedDecodeAdapter
    try:
        yield variants.use("auto")
    finally:
        modeling_hyperllava.DecodeAdapter = made


def launch_checked_apart(config, batches, device, dtype):
    """`torch_launch_matches_tritons` at each batch size, in a process of its own: a launch that faulted would leave
    its process's CUDA context broken, and here that would fail every candidate after it."""
    d, r = config.text_config.hidden_size, config.expert_bottleneck_dim
    spawned = multiprocessing.get_context("spawn")  # (a fork would share this process's CUDA state)
    with concurrent.futures.ProcessPoolExecutor(1, mp_context=spawned) as apart:
        checks = [apart.submit(torch_launch_matches_tritons, d, r, batch, device, dtype) for batch in batches]
        return all(check.result(timeout=180) for check in checks)


@torch.no_grad()
def torch_launch_matches_tritons(d, r, batch, device, dtype):
    """Whether a layer's one launch by PyTorch's launcher (the library's adapter) writes, bit for bit, what Triton's
    launch of the same kernel on the same inputs writes, at widths `d` and rank `r` with a weight set per sequence: an
    adapter whose launch got wrong arguments would otherwise only be timed."""
    generator = torch.Generator(device).manual_seed(0)
    w_down, w_up, *steps = (
        torch.randn(shape, generator=generator, device=device, dtype=dtype) * 0.1
        for shape in [(batch, d, 2 * r), (batch, r, d)] + [(batch, 1, d)] * 6
    )
    outputs, adapters = [], (TritonLaunchedDecodeAdapter(w_down, w_up), fused.DecodeAdapter(w_down, w_up))
    for adapter in adapters:
        outputs.append([adapter(*steps[:3]), adapter(*steps[3:])])  # (the second call is a later launch)
    served = all(out is not None for pair in outputs for out in pair)
    return served and isinstance(adapters[1].launch, fused._TorchLaunch) and all(map(torch.equal, *outputs))


sleep_cycles_per_ms = functools.cache(gpu_sleep_cycles_per_ms)


def host_us_behind_a_sleep(fn, sleep_ms, repeats=5):
    """Host time of a call of `fn`, in us (median of `repeats`), made while the GPU runs a sleep of `sleep_ms` queued
    just before it. A call that queues its work returns as fast as on an idle GPU; one that waits for the GPU (a
    synchronization, or a launch that blocks) takes about the sleep. In a host-bound decoding step such a call would
    make the host wait for the work queued before it (the FFN's GEMMs, at 7B some 75 us a layer at batch 1): a cost
    that the host time of calls back to back does not show when the call's own kernel takes about as long as its
    launch (the one launch: 21 us a call, its kernel 19 us, run 15)."""
    cycles = int(sleep_cycles_per_ms() * sleep_ms)
    fn()
    torch.cuda.synchronize()
    times = []
    for _ in range(repeats):
        torch.cuda._sleep(cycles)
        started = time.perf_counter()
        fn()
        times.append((time.perf_counter() - started) * 1e6)
        torch.cuda.synchronize()
    return statistics.median(times)


def functions_called(fn):
    """How many Python and C functions one call of `fn` calls (`sys.setprofile`'s events, which do not depend on the
    host's speed): what a step does beyond LLaVA's, counted rather than timed."""
    count = 0

    def profile(frame, event, arg):
        nonlocal count
        count += event in ("call", "c_call")

    sys.setprofile(profile)
    try:
        fn()
    finally:
        sys.setprofile(None)
    return count


@torch.no_grad()
def report_waits_for_the_gpu(config, settings, llava, variants, batches, device):
    """`host_us_behind_a_sleep` of each adapter and probe at decoding shapes (behind a 20 ms sleep), and of whole
    decoding steps of LLaVA and HyperLLaVA's variants (behind a 200 ms sleep: longer than a 7B eager step)."""
    d, r, dtype = config.text_config.hidden_size, config.expert_bottleneck_dim, settings["dtype"]
    print("\n## Does a call wait for the GPU? Host time, us: on an idle GPU, and behind a GPU sleep\n")
    print("| call | batch | idle GPU | behind the sleep | sleep | Python and C functions it calls |")
    print("|---|---|---|---|---|---|")

    def row(name, batch, fn, sleep_ms):
        cells = [f"{host_us_behind_a_sleep(fn, ms):.1f}" for ms in (0, sleep_ms)]
        print(f"| {name} | {batch} | {cells[0]} | {cells[1]} | {sleep_ms} ms | {functions_called(fn)} |", flush=True)

    for batch in batches:
        x, residual, ffn_out = (torch.randn(batch, 1, d, device=device, dtype=dtype) for _ in range(3))
        w_down = torch.randn(batch, d, 2 * r, device=device, dtype=dtype) * d**-0.5
        w_up = torch.randn(batch, r, d, device=device, dtype=dtype) * r**-0.5
        calls = {
            "LLaVA's add": lambda: residual + ffn_out,
            "eager adapter": lambda: expert_adapter(x, w_down, w_up, residual, "eager", ffn=lambda _: ffn_out),
        }
        if fused.is_available(device):
            calls["fused op"] = lambda: expert_adapter(x, w_down, w_up, residual, "triton", ffn=lambda _: ffn_out)
        for name, one_launch in (("PyTorch's", fused.DecodeAdapter), ("Triton's", TritonLaunchedDecodeAdapter)):
            decode = one_launch(w_down, w_up)
            if decode(x, residual, ffn_out) is not None:  # (the first call compiles and loads the kernel)
                calls[f"one launch, by {name} launcher"] = functools.partial(decode, x, residual, ffn_out)
        calls.update({f"probe: {name}": probe for name, probe in make_probes(device).items()})
        for name, fn in calls.items():
            row(name, batch, fn, 20)

        inputs = make_batch(config, settings, batch, settings["text_tokens"])
        models = {"LLaVA": lambda: llava, "HyperLLaVA, experts detached": lambda: variants.use(None)}
        models.update(
            {f"HyperLLaVA, {kernel}": lambda kernel=kernel: variants.use(kernel) for kernel in ("eager", "auto")}
        )
        for name, get in models.items():
            model = get()
            cache = getattr(model(**inputs, use_cache=True, logits_to_keep=1), CACHE_ARG)
            token = inputs["input_ids"][:, -1:]

            def decoding_step(model=model, cache=cache, token=token):
                model(input_ids=token, logits_to_keep=1, **{CACHE_ARG: cache})

            row(f"decoding step: {name}", batch, decoding_step, 200)


@contextlib.contextmanager
def layer_clock(model, forwards):
    """`model` with the host time of each of its decoder layers noted at each forward (seconds from the layer's forward
    pre-hook to its forward hook: its ops launched, not waited for), one list a forward appended to `forwards`."""
    layers = model.model.language_model.layers
    started = [0.0]

    def before(module, args):
        if module is layers[0]:
            forwards.append([])
        started[0] = time.perf_counter()

    def after(module, args, output):
        forwards[-1].append(time.perf_counter() - started[0])

    handles = [layer.register_forward_pre_hook(before) for layer in layers]
    handles += [layer.register_forward_hook(after) for layer in layers]
    try:
        yield model
    finally:
        for handle in handles:
            handle.remove()


def step_parts(model, batch, new_tokens, device, expert_layers):
    """Where an eager decoding step's time goes (medians over a `generate` call's steps after the first, seconds): the
    whole step, the expert layers, the other layers, and the rest (embedding, the final norm and head, `generate`'s
    loop)."""
    forwards = []
    with layer_clock(model, forwards):
        _, wall, _ = timed_generate(model, batch, new_tokens, device)
    # forwards[0] is the prefill's; the k-th step (wall[k]) ran forwards[k + 1]. The first step is left out.
    pairs = list(zip(wall[1:], forwards[2:], strict=True))
    expert = [sum(times[i] for i in expert_layers) for _, times in pairs]
    layers = [sum(times) for _, times in pairs]
    return [statistics.median(values) for values in (wall[1:], expert, [a - b for a, b in zip(layers, expert)],
                                                     [step - inside for (step, _), inside in zip(pairs, layers)])]  # fmt: skip


def report_step_parts(config, settings, llava, variants, batches, device, new_tokens=24, repeats=3):
    """`step_parts` of LLaVA and HyperLLaVA's variants, in turns over `repeats` rounds after a warm-up (medians of the
    rounds), each part's difference from LLaVA's beside it: whether the experts' cost is in their layers, and in the
    calls there, or spills over the rest of the step."""
    expert_layers = variants.model.model.language_model.expert_layers
    models = {"LLaVA": lambda: llava, "HyperLLaVA, experts detached": lambda: variants.use(None)}
    kernels = ("eager", "auto") if decode_adapters_available(device) else ("eager",)
    models.update({f"HyperLLaVA, {kernel}": lambda kernel=kernel: variants.use(kernel) for kernel in kernels})
    print(
        f"\n## Where an eager decoding step's host time goes, us (medians of {repeats} rounds of {new_tokens} tokens; "
        f"each layer timed from its pre-hook to its hook; over LLaVA's in brackets)\n"
    )
    print(f"| model | batch | step | the {len(expert_layers)} expert layers | the other layers | outside the layers |")
    print("|---|---|---|---|---|---|")
    for batch_size in batches:
        batch = make_batch(config, settings, batch_size, settings["text_tokens"])
        rounds = {name: [] for name in models}
        for round_ in range(repeats + 1):
            for name, get in models.items():
                parts = step_parts(get(), batch, new_tokens, device, expert_layers)
                if round_:  # (the first round warms up)
                    rounds[name].append(parts)
        medians = {name: [statistics.median(column) for column in zip(*values)] for name, values in rounds.items()}
        for name, parts in medians.items():
            cells = [f"{us * 1e6:.1f} ({(us - base) * 1e6:+.1f})" for us, base in zip(parts, medians["LLaVA"])]
            print(f"| {name} | {batch_size} | {' | '.join(cells)} |", flush=True)


def main(argv=None):
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--size", choices=sorted(SIZES), default="tiny")
    parser.add_argument("--batch", type=int, nargs="+", default=[1, 16], help="batch sizes (1 and 16)")
    parser.add_argument("--repeats", type=int, default=5, help="timed rounds after a warm-up (5)")
    parser.add_argument("--new-tokens", type=int, default=64, help="tokens per call (64)")
    parser.add_argument(
        "--adapters-only",
        action="store_true",
        help="LLaVA and HyperLLaVA's variants alone, no probes: fewer candidates a round, so more rounds in the time",
    )
    parser.add_argument(
        "--lockstep",
        action="store_true",
        help="the candidates take turns every 8 decoding steps, as in bench_overhead.py's lockstep rows: each step is "
        "compared with LLaVA's step of the same index, a fraction of a second away",
    )
    args = parser.parse_args(argv)
    settings = dict(SIZES[args.size])
    device = torch.device(settings["device"])
    if device.type == "cuda" and not torch.cuda.is_available():
        parser.error("--size 7b needs a CUDA GPU (use --size tiny on a CPU)")
    config, llava, hyper = build_models(args.size, settings)
    layers = hyper.model.language_model.expert_layers
    name = torch.cuda.get_device_name(device) if device.type == "cuda" else f"CPU ({os.cpu_count()} cores visible)"
    print(f"# Probes after the FFN of layers {list(layers)}: {name}, {settings['dtype']}, torch {torch.__version__}")

    variants = HyperVariants(hyper)
    if device.type == "cuda":
        report_waits_for_the_gpu(config, settings, llava, variants, args.batch, device)
    # (Fewer tokens and rounds than the probes': at 7B, 4 models a round.)
    report_step_parts(
        config, settings, llava, variants, args.batch, device, min(args.new_tokens, 24), min(args.repeats, 3)
    )
    candidates, probe_seconds = {"llava": lambda: contextlib.nullcontext(llava)}, {}
    for probe_name, probe in ({} if args.adapters_only else make_probes(device)).items():
        name = f"LLaVA + {probe_name}"
        probe_seconds[name] = []
        candidates[name] = functools.partial(probed, llava, layers, probe, probe_seconds[name])
    candidates["HyperLLaVA, experts detached"] = lambda: contextlib.nullcontext(variants.use(None))
    candidates["HyperLLaVA, eager adapter"] = lambda: contextlib.nullcontext(variants.use("eager"))
    if decode_adapters_available(device):
        candidates["HyperLLaVA, auto adapter, Triton's launcher"] = lambda: triton_launched_adapters(variants)
    if decode_adapters_available(device) and hasattr(torch._C, "_StaticCudaLauncher"):
        try:
            same = launch_checked_apart(config, args.batch, device, settings["dtype"])
        except Exception as error:  # (the other candidates still run)
            same = f"False, it failed: {error!r}"
        print(f"# The one launch by PyTorch's launcher writes what Triton's launch of it writes: {same}")
        if same is True:  # (otherwise its step times would be those of a wrong launch)
            candidates["HyperLLaVA, auto adapter (PyTorch's launcher)"] = lambda: contextlib.nullcontext(
                variants.use("auto")
            )

    for batch_size in args.batch:
        batch = make_batch(config, settings, batch_size, settings["text_tokens"])

        def step(_, enter, batch=batch):
            with enter() as model:
                return statistics.median(decode_step_times(model, batch, args.new_tokens, device)[0])

        if args.lockstep:
            rounds = lockstep_rounds(candidates, batch, args.new_tokens, device, args.repeats)
            what = f"steps in lockstep ({args.new_tokens} a round)"
        else:
            rounds = interleaved(candidates, step, args.repeats)
            what = f"median step ({args.new_tokens} new tokens)"
        base = rounds["llava"]
        print(f"\n## Batch {batch_size}, eager decoding, {what}\n")
        print(
            f"| candidate | step (ratio to LLaVA) | over LLaVA's step, per layer of {len(layers)} | host time in the "
            "probe, per call (median) |"
        )
        print("|---|---|---|---|")
        for candidate, values in rounds.items():
            if values is None:
                print(f"| {candidate} | failed | | |")
                continue
            if args.lockstep:  # (the median step-by-step ratio's share of LLaVA's median warm step)
                llava_step = statistics.median(step for steps in base for step in steps[1:])
                over = (statistics.median(lockstep_ratios(values, base)) - 1) * llava_step
                cell = lockstep_cell(values, base)
            else:
                over, cell = statistics.median(values) - statistics.median(base), ratio_cell(values, base)
            per_layer = over / len(layers) * 1e6
            inside = probe_seconds.get(candidate)
            inside = f"{statistics.median(inside) * 1e6:.1f} us" if inside else ""
            print(f"| {candidate} | {cell} | {per_layer:+.1f} us | {inside} |")
            if inside:
                probe_seconds[candidate].clear()  # (the next batch size's calls apart)


if __name__ == "__main__":
    main()
