"""What HyperLLaVA's experts cost over LLaVA-1.5: time ratios for prefill, decoding and a training step, the
training peak-memory ratio, and a microbenchmark of the expert adapter (fused Triton kernel vs eager PyTorch vs
the memory-bandwidth floor).

    python benchmarks/bench_overhead.py --size tiny              # fp32 on CPU, 7B's depth at toy widths, ~5 min on 2 cores
    python benchmarks/bench_overhead.py --size 7b --out 7b.md    # bf16 on CUDA: Vicuna-7B + CLIP ViT-L/14-336

Both models get random weights at the same shapes (the HyperLLaVA experts too, so that they really run). HyperLLaVA
also runs with its experts detached: a control that does LLaVA's computation with HyperLLaVA's code, so that what the
experts cost is told apart from what the rest of the code costs. The models are measured in turn within each repeat,
so that clock and thermal drift hit all alike, and every number is the median over the repeats after a warm-up.
Eager decoding, which the host's load moves most, is also timed in lockstep: the models take turns every few
decoding steps, each continuing its own sequence, and each step is compared with LLaVA's step of the same index.
"""

import argparse
import contextlib
import functools
import os
import statistics
import time
import traceback
import unittest.mock

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TRANSFORMERS_VERBOSITY", "error")

import torch  # noqa: E402
import transformers  # noqa: E402
from torch.autograd import DeviceType  # noqa: E402
from torch.profiler import ProfilerActivity, profile  # noqa: E402
from transformers import CompileConfig, LlavaForConditionalGeneration, LogitsProcessor, LogitsProcessorList  # noqa: E402

from transformers_hyperllava import (  # noqa: E402
    HyperLlavaConfig,
    HyperLlavaForConditionalGeneration,
    modeling_hyperllava,
)
from transformers_hyperllava import fused_expert_hyperllava as fused  # noqa: E402
from transformers_hyperllava.modeling_hyperllava import (  # noqa: E402
    CACHE_ARG,
    HyperExpert,
    decode_adapters_available,
    expert_adapter,
)
from transformers_hyperllava.tiny import tiny_config  # noqa: E402

_COMMON = {"prefill_batch": 8, "text_tokens": 64, "new_tokens": 64, "train_batch": 4}
SIZES = {  # the number of image tokens follows from the config: 576 for CLIP-336, 4 for the tiny one
    "tiny": {**_COMMON, "device": "cpu", "dtype": torch.float32, "train_length": 256, "repeats": 15},
    "7b": {**_COMMON, "device": "cuda", "dtype": torch.bfloat16, "train_length": 1024, "repeats": 5},
}


def vicuna7b_clip336_config() -> HyperLlavaConfig:
    """LLaVA-1.5-7B's shapes (llava-hf/llava-1.5-7b-hf) with HyperLLaVA's default experts."""
    return HyperLlavaConfig(
        text_config={
            "model_type": "llama", "vocab_size": 32064, "hidden_size": 4096, "intermediate_size": 11008,
            "num_hidden_layers": 32, "num_attention_heads": 32, "num_key_value_heads": 32,
            "max_position_embeddings": 4096, "rms_norm_eps": 1e-5, "pad_token_id": 32001,
        },
        vision_config={
            "model_type": "clip_vision_model", "hidden_size": 1024, "intermediate_size": 4096,
            "num_hidden_layers": 24, "num_attention_heads": 16, "image_size": 336, "patch_size": 14,
            "projection_dim": 768,
        },
        image_token_index=32000,
        image_seq_length=576,
        vision_feature_layer=-2,
        vision_feature_select_strategy="default",
        pad_token_id=32001,
    )  # fmt: skip


def depth_7b_tiny_config() -> HyperLlavaConfig:
    """LLaVA-1.5-7B's depth (32 decoder layers, 16 with an expert) and expert sizes at toy widths. On a CPU this
    measures what the experts add in dispatched ops and Python, which is what bounds eager decoding on a GPU."""
    return tiny_config(
        hidden_size=64, num_hidden_layers=32, expert_bottleneck_dim=16, expert_embedding_dim=64,
        hypernetwork_hidden_dim=64,
    )  # fmt: skip


def build_models(size, settings):
    config = vicuna7b_clip336_config() if size == "7b" else depth_7b_tiny_config()
    device, dtype = torch.device(settings["device"]), settings["dtype"]
    if device.type == "cpu":
        # The toy widths gain nothing from intra-op threads, and the threads' wake-ups were most of the run-to-run
        # noise (decoding ratios moving by ±4% between runs on 2 cores, by 1-2% on one thread).
        torch.set_num_threads(1)
    with device:  # random init straight on the GPU: initialising 7B parameters on the CPU takes minutes
        torch.manual_seed(0)
        llava = LlavaForConditionalGeneration._from_config(
            config.to_llava_config(), dtype=dtype, attn_implementation="sdpa"
        )
        torch.manual_seed(0)
        hyper = HyperLlavaForConditionalGeneration._from_config(config, dtype=dtype, attn_implementation="sdpa")
    with torch.no_grad():  # fresh experts compute nothing (zero W_u); random ones make the expert path real work
        for name, param in hyper.named_parameters():
            if "expert" in name:
                param.normal_(0.0, 0.02)
    return config, llava.eval(), hyper.eval()


class HyperVariants:
    """One built HyperLLaVA run as several variants on the same weights: `use("eager")` or `use("auto")` picks the
    adapter, `use(None)` detaches the experts (the control: the model then skips them, as if it had none),
    `use("auto", beside_ffn=False)` has a compiled decoding step compute the adapter after the FFN rather than beside
    it on a second stream, the default (`modeling_hyperllava.ADAPTER_BESIDE_FFN`, a process-wide setting: every `use`
    sets it)."""

    def __init__(self, model):
        self.model = model
        self.experts = {name: module for name, module in model.named_modules() if isinstance(module, HyperExpert)}

    def use(self, kernel, beside_ffn=True):
        modeling_hyperllava.ADAPTER_BESIDE_FFN = beside_ffn
        for name, expert in self.experts.items():
            parent, _, leaf = name.rpartition(".")
            setattr(self.model.get_submodule(parent), leaf, None if kernel is None else expert)
        if kernel is not None:  # the modules that apply an adapter keep their own copy of the setting
            self.model.config.expert_kernel = kernel
            for module in self.model.modules():
                if hasattr(module, "expert_kernel"):
                    module.expert_kernel = kernel
        return self.model


def make_batch(config, settings, batch, text_tokens, seed=0):
    """`batch` prompts: <bos>, one image's placeholder tokens, then random text, `image_tokens + text_tokens` long."""
    generator = torch.Generator().manual_seed(seed)
    # Ordinary words: ids above the tiny vocabulary's special tokens and, at 7B, below the added <image>/<pad>.
    first_special = config.image_token_index if config.image_token_index > 5 else config.text_config.vocab_size
    words = torch.randint(5, first_special, (batch, text_tokens - 1), generator=generator)
    image = torch.full((batch, config.image_seq_length), config.image_token_index)
    input_ids = torch.cat([torch.ones(batch, 1, dtype=torch.long), image, words], dim=1)  # 1 = <s>
    image_size = config.vision_config.image_size
    pixel_values = torch.randn(batch, 3, image_size, image_size, generator=generator)
    device = settings["device"]
    return {
        "input_ids": input_ids.to(device),
        "attention_mask": torch.ones_like(input_ids).to(device),
        "pixel_values": pixel_values.to(device, settings["dtype"]),
    }


def synchronize(device):
    if torch.device(device).type == "cuda":
        torch.cuda.synchronize(device)


def wall_time(fn, device):
    synchronize(device)
    start = time.perf_counter()
    fn()
    synchronize(device)
    return time.perf_counter() - start


def interleaved(candidates, measure, repeats, warmup=1):
    """`measure(name, candidate)` in `repeats` rounds, the candidates taking turns within each round (each round
    starting one further along, so that none always runs after the same one): each candidate's values, round by round.
    Every value is printed as it is measured, so that a run cut short keeps them in its log. A candidate that fails is
    logged and left out of later rounds (None: its cell reads "failed"), so that one failing adapter does not cost a
    lent GPU run the others' numbers."""
    samples = {name: [] for name in candidates}
    failed = set()
    names = list(candidates)
    for round_ in range(warmup + repeats):
        for name in names[round_ % len(names) :] + names[: round_ % len(names)]:
            if name in failed:
                continue
            try:
                value = measure(name, candidates[name])
            except Exception:  # any failure: logged in full, "failed" in the report
                traceback.print_exc()
                failed.add(name)
                continue
            print(f"  {name}, round {round_ + 1}{' (warm-up)' if round_ < warmup else ''}: {value:.6g}", flush=True)
            if round_ >= warmup:
                samples[name].append(value)
    return {name: None if name in failed else values for name, values in samples.items()}


def ratio_cell(values, base, unit=1e3, suffix=" ms"):
    """A table cell: the median of a candidate's rounds and its ratio to the median of LLaVA's, and with four rounds or
    more the quartiles of the round-by-round ratios (each round's value over LLaVA's in that round): how far the ratio
    moves with the host's load, which drifts over a run and hits all the candidates of a round alike; and the ratio of
    the fastest rounds, the ones the host disturbed least (an H200 host's load moved the control's median to 1.068x
    with its fastest round at 0.998x, docs/performance.md)."""
    median = statistics.median(values)
    cell = f"{median * unit:.3f}{suffix} ({median / statistics.median(base):.3f}x"
    if len(values) >= 4:
        low, _, high = statistics.quantiles([value / llava for value, llava in zip(values, base, strict=True)], n=4)
        cell += f"; rounds {low:.3f}-{high:.3f}x; fastest {min(values) / min(base):.3f}x"
    return cell + ")"


class DecodeClock(LogitsProcessor):
    """Notes when each token's logits exist, after a synchronisation (which Transformers 5.17's loop makes at every
    CUDA step anyway): the gaps are the decoding steps, and the prefill comes before the first note. Also the calling
    thread's CPU time at each note: an eager step is bound by it, and it leaves out the time the thread did not run
    (another process on the host)."""

    def __init__(self, device):
        self.device, self.times, self.cpu_times = device, [], []

    def __call__(self, input_ids, scores):
        synchronize(self.device)
        self.times.append(time.perf_counter())
        self.cpu_times.append(time.thread_time())
        return scores


def timed_generate(model, inputs, new_tokens, device, **generate_kwargs):
    """One greedy `generate` call that makes `new_tokens` tokens: its output, and its decoding steps (the first
    forward, the prefill, excluded) in seconds each, by the wall clock and in the calling thread's CPU time."""
    clock = DecodeClock(device)
    with torch.no_grad():
        output = model.generate(
            **inputs, max_new_tokens=new_tokens, min_new_tokens=new_tokens, do_sample=False,
            logits_processor=LogitsProcessorList([clock]), **generate_kwargs,
        )  # fmt: skip
    wall, cpu = (
        [later - earlier for earlier, later in zip(times, times[1:])] for times in (clock.times, clock.cpu_times)
    )
    return output, wall, cpu


def decode_step_times(model, batch, new_tokens, device, **generate_kwargs):
    """The decoding steps of one `generate` call (the prefill excluded), in seconds each: by the wall clock, and in the
    calling thread's CPU time."""
    return timed_generate(model, batch, new_tokens, device, **generate_kwargs)[1:]


def decode_step_seconds(model, batch, new_tokens, device, **generate_kwargs):
    """The decoding steps of one `generate` call, in seconds each by the wall clock (the prefill excluded)."""
    return decode_step_times(model, batch, new_tokens, device, **generate_kwargs)[0]


def decode_seconds_per_token(model, batch, new_tokens, device, **generate_kwargs):
    """The median decoding step of one `generate` call: robust to the odd step that a garbage collection or another
    process on the host stretches, which a mean over the call would spread over every token."""
    return statistics.median(decode_step_seconds(model, batch, new_tokens, device, **generate_kwargs))


LOCKSTEP_BLOCK = 8  # timed decoding steps per turn


def lockstep_decode_steps(candidates, batch, new_tokens, device, block=LOCKSTEP_BLOCK):
    """Each candidate's decoding steps (seconds each, the prefill excluded; `new_tokens` of them, rounded up to whole
    turns) from `generate` calls that take turns in the order of `candidates` (name -> a function that returns a
    context manager that readies the model and gives it, entered for each of its turns): each turn continues the
    candidate's sequence, and its cache, by `block` + 1 tokens and times the last `block` steps. A candidate's k-th
    step runs next to the others' k-th steps, a fraction of a second apart where whole calls in turn are seconds apart:
    the step-by-step ratios leave out the host's drift, which moved LLaVA's eager step over 25-37 ms within one H200
    run (docs/performance.md).

    A turn's first token is made untimed (the first turn's is the prefill's): that step runs on a host whose caches the
    others' steps filled (24% longer for LLaVA's tiny model on a CPU when every step passed the turn, while the variants
    of one HyperLLaVA, one model with other settings, stayed warm for each other). The turns run in this thread, one
    `generate` call each: on the H200 machine's host a `generate` in a thread of its own did three times the host work
    per step (run 13). A candidate that fails is logged and left out (None); the others go on."""
    inputs = dict.fromkeys(candidates, batch)  # what each one's next turn continues: the prompt, then its sequence
    steps = {name: [] for name in candidates}
    cpu_steps = {name: [] for name in candidates}
    for _ in range(-(-new_tokens // block)):
        for name, enter in candidates.items():
            if steps[name] is None:
                continue
            try:
                with enter() as model:
                    output, wall, cpu = timed_generate(
                        model, inputs[name], block + 1, device, return_dict_in_generate=True
                    )
            except Exception:  # any failure: logged in full, "failed" in the report
                traceback.print_exc()
                steps[name] = None
                continue
            steps[name] += wall
            cpu_steps[name] += cpu
            # (The benchmark's prompts have no padding: every position is attended to.)
            sequences = output.sequences
            inputs[name] = {
                "input_ids": sequences,
                "attention_mask": torch.ones_like(sequences),
                CACHE_ARG: getattr(output, CACHE_ARG),
            }
    # In the log: the steps' thread CPU time, the time the thread ran, which tells a step that waited (another
    # process took the host) from one that worked longer.
    for name in [name for name in candidates if steps[name] is not None]:
        cpu, wall = (statistics.median(times[1:]) for times in (cpu_steps[name], steps[name]))
        print(f"  {name}, lockstep: median warm step {wall:.6g} s, thread CPU time {cpu:.6g} s")
    return steps


def lockstep_rounds(candidates, batch, new_tokens, device, repeats, warmup=1):
    """`lockstep_decode_steps` in `warmup + repeats` rounds, each starting one candidate further along (so that none
    always steps after the same one): each candidate's steps, round by round (the warm-up's dropped; None for one
    that failed in any round)."""
    names = list(candidates)
    rounds = {name: [] for name in names}
    for round_ in range(warmup + repeats):
        order = names[round_ % len(names) :] + names[: round_ % len(names)]
        live = [name for name in order if rounds[name] is not None]
        steps = lockstep_decode_steps({name: candidates[name] for name in live}, batch, new_tokens, device)
        for name in live:
            if steps[name] is None:
                rounds[name] = None
            elif round_ >= warmup:
                rounds[name].append(steps[name])
                print(f"  {name}, lockstep round {round_ + 1}: median step {statistics.median(steps[name]):.6g} s")
    return rounds


def lockstep_ratios(rounds, base):
    """A candidate's step-by-step ratios from its lockstep rounds and LLaVA's: each warm step (every one but the first
    decoding step) over LLaVA's step of the same round and index."""
    return [
        step / llava
        for steps, llava_steps in zip(rounds, base, strict=True)
        for step, llava in zip(steps[1:], llava_steps[1:], strict=True)
    ]


def lockstep_cell(rounds, base):
    """A table cell for a candidate's lockstep rounds against LLaVA's: its median warm step, the median and quartiles
    of the step-by-step ratios (`lockstep_ratios`), and the ratio of the rounds' median first decoding steps (where
    per-sequence work shows)."""
    low, middle, high = statistics.quantiles(lockstep_ratios(rounds, base), n=4)
    median_step = statistics.median(step for steps in rounds for step in steps[1:])
    first = statistics.median(steps[0] for steps in rounds) / statistics.median(steps[0] for steps in base)
    return f"{median_step * 1e3:.3f} ms ({middle:.3f}x; steps {low:.3f}-{high:.3f}x; first step {first:.3f}x)"


class ProfiledSteps(LogitsProcessor):
    """Runs `profiler` from the logits of a call's token `first` to those of token `last` (without one, the caller
    stops it): over `last - first` decoding steps. From the second token on, the prefill and the first decoding step
    (a per-call cost: a CUDA-graph recording, when the call's new static cache has new addresses) stay out."""

    def __init__(self, profiler, device, first=2, last=None):
        self.profiler, self.device, self.first, self.last, self.calls = profiler, device, first, last, 0

    def __call__(self, input_ids, scores):
        self.calls += 1
        if self.calls in (self.first, self.last):
            synchronize(self.device)
            (self.profiler.start if self.calls == self.first else self.profiler.stop)()
        return scores

    def close(self):
        """Stops the profiler if it still runs (no `last`, or a call that ended early: an error)."""
        if self.first <= self.calls and (self.last is None or self.calls < self.last):
            synchronize(self.device)
            self.profiler.stop()


def profile_decoding(model, batch, new_tokens, device, activities, steps=None, **generate_kwargs):
    """The profiler of one `generate` call from its second token's logits, over `steps` decoding steps (or to the
    call's end)."""
    profiler = profile(activities=activities)
    profiled = ProfiledSteps(profiler, device, last=None if steps is None else 2 + steps)
    try:
        with torch.no_grad():
            model.generate(
                **batch, max_new_tokens=new_tokens, min_new_tokens=new_tokens, do_sample=False,
                logits_processor=LogitsProcessorList([profiled]), **generate_kwargs,
            )  # fmt: skip
    finally:
        profiled.close()  # (left running, the profiler would slow what runs next)
    return profiler


def decode_busy_seconds_per_step(model, batch, new_tokens, steps=16, **generate_kwargs):
    """The GPU's busy time per decoding step of one `generate` call, from the profiler over `steps` steps after the
    first: what the experts add to a compiled step's GPU work, which the step's wall clock (a few ms, moving with the
    host by more than the 1% target) cannot resolve."""
    profiler = profile_decoding(model, batch, new_tokens, "cuda", [ProfilerActivity.CUDA], steps, **generate_kwargs)
    return device_busy_us(profiler)[1] * 1e-6 / steps


def compile_on_any_device(*models):
    """`generate` compiles the decoding step on accelerators only; this lets it on a CPU too (without CUDA graphs)."""
    for model in models:
        model.generation_config.compile_config = CompileConfig()
        model.generation_config.compile_config._compile_all_devices = True  # the switch Transformers provides


def train_step(model, batch):
    model(**batch).loss.backward()
    model.zero_grad(set_to_none=True)


def train_seconds(model, batch, device):
    """One forward + backward with activation checkpointing, as a training loop runs it (on a warm caching allocator:
    the peak-memory step empties the cache, this does not)."""
    return wall_time(lambda: train_step(model, batch), device)


def is_device_activity(event):
    """A kernel, copy or memset on the GPU. Not a user annotation: the profiler gives the GPU span of an annotated
    range (a compiled region, a graph call) a CUDA device type too, and such a span covers many kernels and gaps."""
    return event.device_type == DeviceType.CUDA and not event.is_user_annotation


def device_busy_us(profiler):
    """Count of device activities and the time (us) during which at least one ran: the union of their intervals."""
    intervals = sorted(
        (event.time_range.start, event.time_range.end) for event in profiler.events() if is_device_activity(event)
    )
    busy, current_end = 0.0, float("-inf")
    for start, end in intervals:
        busy += max(0.0, end - max(start, current_end))
        current_end = max(current_end, end)
    return len(intervals), busy


def train_busy_seconds(model, batch):
    """The GPU's busy time in one training step, from the profiler: the wall clock moves with the host's load (LLaVA's
    step took 501 ms in one H200 run and 537 ms in the next)."""
    with profile(activities=[ProfilerActivity.CUDA]) as profiler:
        train_step(model, batch)
        torch.cuda.synchronize()
    return device_busy_us(profiler)[1] * 1e-6


def train_peak_bytes(model, batch, device):
    """The peak memory of one training step, as if the model were alone on the device."""
    torch.cuda.empty_cache()
    before = torch.cuda.memory_allocated(device)
    torch.cuda.reset_peak_memory_stats(device)
    train_step(model, batch)
    # The other model is resident too: count only this step's memory plus this model's own weights.
    own = sum(p.numel() * p.element_size() for p in model.parameters())
    return torch.cuda.max_memory_allocated(device) - before + own


def set_checkpointing(model, enabled):
    # Transformers 5.23 renamed gradient_checkpointing_* to activation_checkpointing_*; earlier releases have only the
    # old names.
    new_names = hasattr(model, "activation_checkpointing_enable")
    if not enabled:
        (model.activation_checkpointing_disable if new_names else model.gradient_checkpointing_disable)()
    elif new_names:
        model.activation_checkpointing_enable({"use_reentrant": False})
    else:
        model.gradient_checkpointing_enable({"use_reentrant": False})


def prepare_training(model):
    model.train()
    set_checkpointing(model, True)
    model.model.vision_tower.requires_grad_(False)  # frozen in both stages of the LLaVA-1.5 recipe


def training_batch(config, settings):
    batch = make_batch(config, settings, settings["train_batch"], settings["train_length"] - config.image_seq_length)
    labels = batch["input_ids"].clone()
    labels[:, : config.image_seq_length + 1 + 32] = -100  # the image and a short question are the prompt
    batch["labels"] = labels
    return batch


def adapter_call(adapter, inputs, grad=None):
    """A call without arguments: the adapter's forward, or forward + backward when `grad` is given."""
    if grad is None:
        return lambda: adapter(*inputs)
    return lambda: torch.autograd.grad(adapter(*inputs), inputs, grad)


def peak_bandwidth(device):
    """Peak HBM bandwidth in bytes/s, from the memory clock and bus width (double data rate)."""
    props = torch.cuda.get_device_properties(device)
    clock_khz, bus_bits = getattr(props, "memory_clock_rate", 0), getattr(props, "memory_bus_width", 0)
    if clock_khz and bus_bits:
        return 2 * clock_khz * 1e3 * bus_bits / 8, "memory clock x bus width"
    # Older torch lacks those fields: a large device-to-device copy gets close to the peak.
    data = torch.empty(1 << 30, dtype=torch.uint8, device=device)
    copy_time = min(wall_time(lambda: data.clone(), device) for _ in range(5))
    return 2 * data.numel() / copy_time, "measured 1 GiB copy"


def gpu_sleep_cycles_per_ms():
    """Clock cycles that `torch.cuda._sleep` (a spin loop) waits per millisecond on this GPU."""
    cycles = 10_000_000
    start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
    torch.cuda._sleep(1000)  # (its first launch loads the kernel)
    start.record()
    torch.cuda._sleep(cycles)
    end.record()
    end.synchronize()
    return cycles / start.elapsed_time(end)


def cuda_event_ms(fn, repeats=50):
    """GPU time of one call of `fn`, in ms (CUDA events; median of `repeats`). Each timed call is queued behind a GPU
    sleep longer than the host takes to launch it, so that the events time the GPU's work, not the host's launches
    (with the GPU idle between the events while the host launches, a decode-shape call measured its Python launch,
    ~0.1 ms, against ~5 us of kernels), and behind a write of twice the L2 cache, so that its inputs come from HBM as
    the bandwidth floor assumes (a decode call's few MiB would otherwise stay in L2 from one call to the next)."""
    fn()
    torch.cuda.synchronize()
    host_ms = []
    for _ in range(3):
        started = time.perf_counter()
        fn()  # launches only: the GPU runs it after this returns
        host_ms.append((time.perf_counter() - started) * 1e3)
        torch.cuda.synchronize()
    properties = torch.cuda.get_device_properties(torch.cuda.current_device())
    flush = torch.empty(2 * getattr(properties, "L2_cache_size", 50 * 2**20), dtype=torch.uint8, device="cuda")
    sleep_cycles = int(gpu_sleep_cycles_per_ms() * (2 * max(host_ms) + 0.2))
    times = []
    for _ in range(repeats):
        start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
        torch.cuda._sleep(sleep_cycles)  # the GPU waits while the host queues the flush, the events and the call
        flush.zero_()
        start.record()
        fn()
        end.record()
        end.synchronize()
        times.append(start.elapsed_time(end))
    return statistics.median(times)


def host_microseconds_per_call(fn, calls=100, repeats=20):
    """Host time of one call of `fn`, in us: `calls` calls queued back to back without waiting for the GPU (fewer
    kernels than its launch queue holds, so none waits for a free slot), median of `repeats`. The bound of an eager
    decoding step, whose GPU is idle most of the time."""
    fn()
    torch.cuda.synchronize()
    times = []
    for _ in range(repeats):
        started = time.perf_counter()
        for _ in range(calls):
            fn()
        times.append((time.perf_counter() - started) / calls * 1e6)
        torch.cuda.synchronize()
    return statistics.median(times)


class _Forgetful(dict):
    """A `_DECODE_LAUNCHES` that keeps nothing: every decode call then goes through Triton's own launcher."""

    def __setitem__(self, key, value):
        pass


class TritonLaunchedDecodeAdapter(fused.DecodeAdapter):
    """Eager decoding's one launch a layer with its later launches by Triton's compiled kernel's own launcher, as the
    library launched them before commit de6e9ec (since then by PyTorch's launcher): for comparison."""

    def _later_launches(self, compiled, grid):
        return compiled[grid]


def adapter_host_time(settings, report):
    """What a language-expert layer's adapter costs the host in an eager decoding step, against the add of LLaVA's
    layer that it takes the place of (the FFN's output to the residual)."""
    device, dtype, d, r = settings["device"], settings["dtype"], 4096, 16
    report.line(
        "\nHost time per call of a language-expert layer's adapter at decoding shapes, us (100 calls queued back to "
        "back, median of 20), against the add of LLaVA's layer it replaces; no autograd, as in `generate`:\n"
    )
    report.table(
        [
            "case",
            "LLaVA's add",
            "eager adapter",
            "fused op, every call through Triton's launcher",
            "fused op, direct launches",
            "custom op (a compiled graph's call), direct launches",
            "fork and join beside the FFN (a compiled graph's calls), with LLaVA's add",
            "one launch (eager decoding's \"auto\"): h + FFN(x) + E(x), in place of LLaVA's add",
            "the same, its later launches by Triton's launcher (the library's before commit de6e9ec)",
        ]
    )
    for name, batch in (("decode B=1", 1), ("decode B=16, per-sample weights", 16)):
        x, residual, ffn_out = (torch.randn(batch, 1, d, device=device, dtype=dtype) for _ in range(3))
        w_down = torch.randn(batch, d, 2 * r, device=device, dtype=dtype) * d**-0.5
        w_up = torch.randn(batch, r, d, device=device, dtype=dtype) * r**-0.5

        def adapter(kernel):
            return lambda: expert_adapter(x, w_down, w_up, residual, kernel, ffn=lambda _: ffn_out)

        def beside_the_ffn():
            # What a compiled graph without CUDA graphs (`torch.compile`'s default mode) calls for the adapter beside
            # the FFN, the default there: the two ops around the FFN, then the sum, into whose kernel Inductor fuses
            # the adapter's output (with the next RMSNorm), as it does LLaVA's add.
            adapter = torch.ops.hyperllava.expert_adapter_fork(x, w_down, w_up)
            torch.ops.hyperllava.expert_adapter_join(adapter, ffn_out, [x, w_down, w_up])
            return residual + ffn_out

        with torch.no_grad():
            cells = [
                host_microseconds_per_call(lambda: residual + ffn_out),
                host_microseconds_per_call(adapter("eager")),
            ]
            with unittest.mock.patch.object(fused, "_DECODE_LAUNCHES", _Forgetful()):
                cells.append(host_microseconds_per_call(adapter("triton")))
            cells.append(host_microseconds_per_call(adapter("triton")))
            # What a compiled graph without CUDA graphs calls at every step: the op's dispatch, then the kept launches.
            cells.append(
                host_microseconds_per_call(
                    lambda: torch.ops.hyperllava.expert_adapter(x, w_down, w_up, residual, ffn_out)
                )
            )
            cells.append(host_microseconds_per_call(beside_the_ffn))
            for one_launch in (fused.DecodeAdapter, TritonLaunchedDecodeAdapter):
                decode = one_launch(w_down, w_up)
                if decode(x, residual, ffn_out) is None:  # (else the cell would time the eager adapter)
                    raise RuntimeError("the one launch does not serve a decoding step's call")
                cells.append(
                    host_microseconds_per_call(
                        lambda decode=decode: expert_adapter(
                            x, w_down, w_up, residual, "auto", ffn=lambda _: ffn_out, decode=decode
                        )
                    )
                )
        report.row([name, *(f"{us:.1f}" for us in cells)])


def kernel_microbenchmark(settings, report):
    device, dtype = settings["device"], settings["dtype"]
    bandwidth, source = peak_bandwidth(device)
    report.line(
        f"\nExpert adapter, d=4096, r=16, {dtype}; floor = bytes moved / {bandwidth / 1e12:.2f} TB/s ({source}). "
        "GPU time per call, the host's launch hidden behind a GPU sleep and the L2 cache flushed before each call. "
        "The fused forward rows run without autograd, so they launch the kernels directly; fwd+bwd goes through the "
        "custom op."
    )
    dependent = fused._dependent_launch(torch.device(device))
    report.line(
        "Decode rows on Hopper and later: also the fused op with plain launches, without programmatic dependent launch "
        f"(the default here: {'on' if dependent else 'off'})."
    )
    report.table(["case", "fused ms", "fused, plain launches ms", "eager ms", "floor ms", "fused / floor",
                  "eager / fused"])  # fmt: skip
    cases = [
        ("decode B=1", 1, 1, 4096, 4096, 1, False),
        ("decode B=16, per-sample weights", 16, 1, 4096, 4096, 16, False),
        ("decode B=16, shared weights", 16, 1, 4096, 4096, 1, False),
        ("visual expert 'first' (8 images)", 8, 576, 1024, 4096, 8, False),
        ("prefill B=8 T=640", 8, 640, 4096, 4096, 8, False),
        ("train fwd+bwd B=4 T=1024", 4, 1024, 4096, 4096, 4, True),
    ]
    r = 16
    for name, batch, length, d_in, d_out, weight_batch, backward in cases:
        x = torch.randn(batch, length, d_in, device=device, dtype=dtype)
        w_down = torch.randn(weight_batch, d_in, 2 * r, device=device, dtype=dtype) * d_in**-0.5
        w_up = torch.randn(weight_batch, r, d_out, device=device, dtype=dtype) * r**-0.5
        residual = torch.randn(batch, length, d_out, device=device, dtype=dtype)
        element = x.element_size()
        moved = (x.numel() + 2 * residual.numel() + w_down.numel() + w_up.numel()) * element
        grad = None
        if backward:
            for tensor in (x, w_down, w_up, residual):
                tensor.requires_grad_()
            grad = torch.randn_like(residual)
            # Backward reads x, grad_out, the weights and writes grad_x and the weight gradients (grad_residual
            # is grad_out itself): a lower bound that ignores any recomputation.
            moved += (2 * x.numel() + residual.numel() + 2 * (w_down.numel() + w_up.numel())) * element
        inputs = (x, w_down, w_up, residual)
        with contextlib.nullcontext() if backward else torch.no_grad():
            fused_ms = cuda_event_ms(adapter_call(fused.fused_expert_adapter, inputs, grad))
            plain = "—"
            if dependent and fused.beats_eager(x, w_up):
                with plain_decode_launches():
                    plain = f"{cuda_event_ms(adapter_call(fused.fused_expert_adapter, inputs, grad)):.4f}"
            eager_ms = cuda_event_ms(adapter_call(expert_adapter, inputs, grad))
        floor_ms = moved / bandwidth * 1e3
        report.row([name, f"{fused_ms:.4f}", plain, f"{eager_ms:.4f}", f"{floor_ms:.4f}", f"{fused_ms / floor_ms:.1f}x",
                    f"{eager_ms / fused_ms:.2f}x"])  # fmt: skip


@contextlib.contextmanager
def plain_decode_launches():
    """The fused op's decode kernels launched without programmatic dependent launch, as before Hopper (and none of
    the launches kept so far, which were made with it)."""
    with (
        unittest.mock.patch.object(fused, "_dependent_launch", lambda device: False),
        unittest.mock.patch.object(fused, "_DECODE_LAUNCHES", {}),
    ):
        yield


class Report:
    """Prints as it goes (a run cut short keeps what it measured) and mirrors everything into --out."""

    def __init__(self, path):
        self.path, self.lines = path, []

    def line(self, text):
        print(text, flush=True)
        self.lines.append(text)
        if self.path:
            temporary = f"{self.path}.tmp"
            with open(temporary, "w", encoding="utf-8") as file:
                file.write("\n".join(self.lines) + "\n")
            os.replace(temporary, self.path)

    def table(self, header):
        self.line("| " + " | ".join(header) + " |")
        self.line("|" + "---|" * len(header))

    def row(self, cells):
        self.line("| " + " | ".join(cells) + " |")


@contextlib.contextmanager
def section(report, name, table_row=True):
    """One workload: if it fails, the report says so and the run goes on (a lent GPU run should give all it can)."""
    try:
        yield
    except Exception as error:  # any failure: logged in full, summarised in the report
        traceback.print_exc()
        message = f"failed: {type(error).__name__}: {str(error)[:300]}"
        if table_row:
            report.row([name, message])
        else:
            report.line(f"\n{name}: {message}")


def fused_kernel_works(device, dtype):
    """Whether the fused adapter runs here and agrees with the eager one (a small check before timing it)."""
    generator = torch.Generator().manual_seed(0)
    inputs = [
        torch.randn(shape, generator=generator).to(device, dtype)
        for shape in ((2, 3, 64), (2, 64, 32), (2, 16, 48), (2, 3, 48))
    ]
    want = expert_adapter(*(t.float() for t in inputs))  # the eager adapter (its default)
    got = fused.fused_expert_adapter(*inputs).float()  # through the custom op (autograd on)
    with torch.no_grad():
        direct = fused.fused_expert_adapter(*inputs).float()  # launched directly, as in eager decoding
    return all(bool((out - want).abs().max() <= 3e-2 * want.abs().max()) for out in (got, direct))


def main(argv=None):
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--size", choices=sorted(SIZES), default="tiny")
    parser.add_argument("--out", help="also write the report (markdown) to this file")
    parser.add_argument("--repeats", type=int, help="timed rounds per measurement (default: 15 tiny, 5 7b)")
    rows = parser.add_mutually_exclusive_group()
    rows.add_argument("--skip-compile", action="store_true", help="skip the static-cache + torch.compile decode")
    rows.add_argument(
        "--only-compiled",
        action="store_true",
        help="only the kernel microbenchmark and the static-cache + torch.compile decode, every candidate at batch 1 "
        "and 16 (about 5 minutes on an H200)",
    )
    rows.add_argument(
        "--only-eager-decode",
        action="store_true",
        help="only the eager decoding rows and the adapter's host time per call (about 5 minutes on an H200)",
    )
    parser.add_argument(
        "--decode-batch", type=int, nargs="+", default=[1, 16], help="the eager decoding rows' batch sizes (1 and 16)"
    )
    args = parser.parse_args(argv)
    if min(args.decode_batch) < 1:
        parser.error(f"--decode-batch sizes must be at least 1, got {args.decode_batch}")
    settings = dict(SIZES[args.size])
    settings["repeats"] = args.repeats or settings["repeats"]
    device, dtype, repeats = settings["device"], settings["dtype"], settings["repeats"]
    if device == "cuda" and not torch.cuda.is_available():
        parser.error("--size 7b needs a CUDA GPU (use --size tiny on a CPU)")
    report = Report(args.out)
    device_name = torch.cuda.get_device_name(device) if device == "cuda" else f"CPU ({os.cpu_count()} cores visible)"
    report.line(
        f"# HyperLLaVA overhead, size {args.size}: {device_name}, {dtype}, torch {torch.__version__}, "
        f"transformers {transformers.__version__}"
    )

    started = time.perf_counter()
    config, llava, hyper = build_models(args.size, settings)
    counts = hyper.parameter_counts()
    report.line(
        f"\nBuilt both models in {time.perf_counter() - started:.0f} s. HyperLLaVA parameters: {counts['total']:,} "
        f"(experts {counts['expert']:,}, {100 * counts['expert'] / counts['total']:.2f}%)."
    )
    # The adapters timed outside compiled graphs, and the one compiled decoding uses (the default, "auto"). Outside a
    # compiled graph "auto" runs the eager adapter or, in eager decoding on an NVIDIA GPU, one launch a layer (timed as
    # "auto" where it can); the fused op launched directly is timed as "triton".
    kernels, compiled_kernel = ["eager"], "eager"
    if not fused.is_available(device):
        report.line("The fused expert kernel needs CUDA and Triton: HyperLLaVA runs its eager adapter only.")
    else:
        with section(report, "Fused expert kernel check", table_row=False):
            if not fused_kernel_works(device, dtype):
                raise RuntimeError("its output differs from the eager adapter's")
            kernels.append("triton")
            compiled_kernel = "auto"
    if decode_adapters_available(device):
        kernels.append("auto")

    variants = HyperVariants(hyper)
    # LLaVA, HyperLLaVA without its experts (the control), then with them, once per adapter implementation.
    candidates = {"llava": lambda: llava, "no experts": lambda: variants.use(None)}
    candidates.update({kernel: lambda kernel=kernel: variants.use(kernel) for kernel in kernels})
    labels = {"llava": "LLaVA", "no experts": "HyperLLaVA, experts detached (control)"}
    labels.update({kernel: f"HyperLLaVA ({kernel} adapter)" for kernel in [*kernels, compiled_kernel]})
    if "auto" in kernels:
        labels["auto"] = "HyperLLaVA (auto: in eager decoding, one launch a layer)"
    header = ["workload", *(labels[name] for name in candidates)]
    # (Eager decoding is host-bound, and noisy: its rows' host CPU time is the steadier measure.)
    # (Lockstep rounds of 64 steps each: on the 2-core CPU the control's median step ratio came within 0.3% of 1 in 3
    # rounds, with the steps' quartiles 5% apart; 5 narrow it further.)
    rounds = {"prefill": repeats, "decode": 5, "decode lockstep": 5, "train": repeats}
    rounds["compiled decode"] = 7  # (cheap once compiled)
    if device == "cuda":
        rounds["compiled decode GPU busy"] = rounds["train GPU busy"] = 3

    def record(workload, values, unit=1e3, suffix=" ms"):
        """One row: `values` holds each candidate's rounds (or one value)."""
        rounds = {
            name: value if value is None or isinstance(value, list) else [value] for name, value in values.items()
        }
        base = rounds["llava"]
        if base is None:
            raise RuntimeError("LLaVA's run failed (see the log): no ratios")
        cells = [workload, f"{statistics.median(base) * unit:.3f}{suffix}"]
        cells += [
            "failed" if rounds[name] is None else ratio_cell(rounds[name], base, unit, suffix)
            for name in rounds
            if name != "llava"
        ]
        report.row(cells)

    rounds_text = ", ".join(f"{workload} {count}" for workload, count in rounds.items())
    without = "; the GPU-busy rows without one" if device == "cuda" else ""
    report.line(
        f"\nMedians of interleaved rounds after a warm-up{without} ({rounds_text}); ratio = HyperLLaVA / LLaVA, the "
        "ratio of the medians; 'rounds': the quartiles of the ratios round by round."
        + " 'Steps in lockstep': the candidates take turns every few decoding steps; ratio = the median of the "
        "step-by-step ratios, 'steps' their quartiles, the first decoding step (the rounds' medians) apart.\n"
    )
    if not args.only_compiled:  # (else straight to the compiled decode)
        report.table(header)

    if not (args.only_compiled or args.only_eager_decode):
        prefill = make_batch(config, settings, settings["prefill_batch"], settings["text_tokens"])
        name = f"prefill, batch {settings['prefill_batch']} x {prefill['input_ids'].shape[1]} tokens"
        with section(report, name):

            def prefill_time(_, get_model):
                model = get_model()
                with torch.no_grad():
                    return wall_time(lambda: model(**prefill, logits_to_keep=1), device)

            record(name, interleaved(candidates, prefill_time, rounds["prefill"]))

    if not args.only_compiled:
        for batch_size in args.decode_batch:
            decode = make_batch(config, settings, batch_size, settings["text_tokens"])
            name = f"decode, batch {batch_size}, eager, per token ({settings['new_tokens']} new)"
            cpu = {}  # each candidate's host CPU time per token, every round's

            def eager_decode(candidate, get_model, decode=decode, cpu=cpu):
                wall, thread = decode_step_times(get_model(), decode, settings["new_tokens"], device)
                cpu.setdefault(candidate, []).append(statistics.median(thread))
                return statistics.median(wall)

            with section(report, name):
                per_round = interleaved(candidates, eager_decode, rounds["decode"])
                record(name, per_round)
                # The wall clock of a host-bound step moves with the host's load (LLaVA's batch-1 step took 22-36 ms in
                # one H200 run); the thread's CPU time leaves out the time it did not run. (The warm-up round dropped, as
                # `interleaved` drops it; a candidate that failed has none.)
                cpu_rounds = {name: None if per_round[name] is None else cpu[name][1:] for name in candidates}
                record(f"decode, batch {batch_size}, eager, host CPU time per token", cpu_rounds)
            name = f"decode, batch {batch_size}, eager, per token, steps in lockstep"
            with section(report, name):
                turns = {name: lambda get=get: contextlib.nullcontext(get()) for name, get in candidates.items()}
                steps = lockstep_rounds(turns, decode, settings["new_tokens"], device, rounds["decode lockstep"])
                if steps["llava"] is None:
                    raise RuntimeError("LLaVA's run failed (see the log): no ratios")
                llava_steps = [step for round_ in steps["llava"] for step in round_[1:]]
                cells = [name, f"{statistics.median(llava_steps) * 1e3:.3f} ms"]
                cells += [
                    "failed" if steps[other] is None else lockstep_cell(steps[other], steps["llava"])
                    for other in candidates
                    if other != "llava"
                ]
                report.row(cells)

    if not (args.only_compiled or args.only_eager_decode):
        name = f"train step (fwd+bwd, checkpointing), batch {settings['train_batch']} x {settings['train_length']}"
        with section(report, name):
            train = training_batch(config, settings)
            for model in (llava, hyper):
                prepare_training(model)

            trained = interleaved(candidates, lambda _, get: train_seconds(get(), train, device), rounds["train"])
            record(name, trained)
            if device == "cuda":
                peaks = {candidate: train_peak_bytes(get(), train, device) for candidate, get in candidates.items()}
                name = "train peak memory (GiB), each model as if alone on the device"
                record(name, peaks, 2**-30, " GiB")
            else:
                report.line("\nTraining peak memory: skipped (measured with the CUDA caching allocator; none on CPU).")
        variants.use(kernels[0])
        for model in (llava, hyper):
            set_checkpointing(model, False)
            model.eval()

    # Before the compiled decode: that one takes minutes, and a run cut short should keep these numbers.
    if "triton" not in kernels:
        report.line("\nExpert adapter microbenchmark: skipped (the fused kernel needs CUDA and Triton).")
    else:
        if not args.only_eager_decode:
            with section(report, "Expert adapter microbenchmark", table_row=False):
                kernel_microbenchmark(settings, report)
        with section(report, "Expert adapter host time", table_row=False):
            adapter_host_time(settings, report)

    if args.skip_compile or args.only_eager_decode:
        report.line("\nDecode with a static cache + torch.compile: skipped.")
    else:
        if device != "cuda":
            compile_on_any_device(llava, hyper)
        graphs = "with CUDA graphs" if device == "cuda" else "no CUDA graphs on a CPU"
        capture = " + CUDA graph capture" if device == "cuda" else ""
        # The default adapter only: compiling takes most of this section's time, and the eager adapter inside the
        # graph was measured in the H200 runs (docs/performance.md).
        compiled = {name: candidates[name] for name in ("llava", "no experts")}
        compiled[compiled_kernel] = lambda: variants.use(compiled_kernel)
        if compiled_kernel == "auto":  # (the default adapter beside the FFN, on a second stream) and the one after it
            labels["auto"] = "HyperLLaVA (auto adapter, beside the FFN)"
            compiled["after"] = lambda: variants.use("auto", beside_ffn=False)
            labels["after"] = "HyperLLaVA (auto adapter, after the FFN)"
        # At batch 16 only in a run of these rows alone: its compilation would take a lent GPU's full run past its 10
        # minutes.
        at_16 = {name: get for name, get in compiled.items() if name != "after" or args.only_compiled}
        batch_sizes = {1: compiled, 16: at_16}

        def compiled_decode(candidate, get_model, decode, first_call):
            call_started = time.perf_counter()
            per_token = decode_seconds_per_token(
                get_model(), decode, settings["new_tokens"], device, cache_implementation="static"
            )
            first_call.setdefault(candidate, time.perf_counter() - call_started)  # the first compiles and captures
            return per_token

        # Batch 16 last: a run cut short by a timeout keeps batch 1's table.
        for batch_size, models in batch_sizes.items():
            # Each batch size gets its own static graphs, as in a server that decodes at one batch size (a second
            # batch size would otherwise get Dynamo's automatic dynamic shapes: graphs with a symbolic batch).
            torch._dynamo.reset()
            report.line(
                f"\nDecode, batch {batch_size}, static cache + torch.compile (generate compiles the step, {graphs}):\n"
            )
            report.table(["workload", *(labels[name] for name in models)])
            decode = make_batch(config, settings, batch_size, settings["text_tokens"])
            first_call = {}
            name = f"decode, batch {batch_size}, static + compile, per token"
            timed = {}
            with section(report, name):
                measure = functools.partial(compiled_decode, decode=decode, first_call=first_call)
                timed = interleaved(models, measure, rounds["compiled decode"])
                record(name, timed)
            if device == "cuda":  # (the profiler may stay attached: batch 16's rows come after batch 1's profiles)
                name = f"decode, batch {batch_size}, static + compile, GPU busy per step"
                with section(report, name):
                    busy = interleaved(
                        {candidate: models[candidate] for candidate in models if timed.get(candidate)},
                        lambda _, get, decode=decode: decode_busy_seconds_per_step(
                            get(), decode, settings["new_tokens"], cache_implementation="static"
                        ),
                        rounds["compiled decode GPU busy"],
                        warmup=0,  # (every model compiled and ran above; one that failed there is left out)
                    )
                    record(name, {candidate: busy.get(candidate) for candidate in models})
            firsts = ", ".join(f"{labels[candidate]} {seconds:.0f} s" for candidate, seconds in first_call.items())
            report.line(f"\nFirst call (compilation{capture}): {firsts}.")

    if device == "cuda" and not (args.only_compiled or args.only_eager_decode):
        # Last: the profiler can leave its instrumentation attached for the rest of the process.
        report.line("\nTraining step, GPU busy time (the union of its kernels' intervals, from the profiler):\n")
        report.table(header)
        name = f"train step, batch {settings['train_batch']} x {settings['train_length']}, GPU busy"
        with section(report, name):
            for model in (llava, hyper):
                prepare_training(model)
            # No warm-up round: every model's step ran warm in the training rows above (and each profiled step costs
            # a lent GPU's run about a second).
            busy = interleaved(
                candidates, lambda _, get: train_busy_seconds(get(), train), rounds["train GPU busy"], warmup=0
            )
            record(name, busy)

    report.line(f"\nTotal {time.perf_counter() - started:.0f} s.")


if __name__ == "__main__":
    main()
