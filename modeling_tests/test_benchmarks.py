"""What the benchmark scripts do with their measurements (their numbers come from `.ci/run` and GPU runs, not tests)."""

import contextlib
import re
import statistics
import sys
import time
from pathlib import Path
from types import SimpleNamespace

import pytest
import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "benchmarks"))

import bench_overhead  # noqa: E402
import probe_launches  # noqa: E402
from transformers_hyperllava import fused_expert_hyperllava as fused  # noqa: E402


def test_interleaved_takes_turns_and_leaves_a_failing_candidate_out(capsys):
    """One failing adapter must not cost a lent GPU run the other columns: it is left out of later rounds. Each round
    starts one candidate further along, and every value is printed when it is measured."""
    calls = []

    def measure(name, value):
        calls.append(name)
        if name == "broken":
            raise RuntimeError("out of memory")
        return value + len(calls)

    result = bench_overhead.interleaved({"a": 0, "broken": None, "b": 100}, measure, repeats=3, warmup=1)
    assert calls == ["a", "broken", "b", "b", "a", "b", "a", "a", "b"]
    # The warm-up round's values are dropped.
    assert result == {"a": [5, 7, 8], "broken": None, "b": [104, 106, 109]}
    printed = [line for line in capsys.readouterr().out.splitlines() if "round" in line]
    assert printed[:2] == ["  a, round 1 (warm-up): 1", "  b, round 1 (warm-up): 103"]
    assert printed[2:] == [
        "  b, round 2: 104", "  a, round 2: 5", "  b, round 3: 106", "  a, round 3: 7", "  a, round 4: 8",
        "  b, round 4: 109",
    ]  # fmt: skip


def test_a_cell_gives_the_ratio_of_medians_the_quartiles_of_the_ratios_round_by_round_and_of_the_fastest_rounds():
    """A host whose load drifts over a run moves every candidate of a round alike: the round-by-round ratios show how
    far that moved the ratio of the medians; the fastest rounds are those it disturbed least."""
    llava = [1.0, 2.0, 1.0, 4.0, 1.0]  # median 1.0, fastest 1.0
    hyper = [1.1, 2.0, 1.2, 4.4, 0.9]  # median 1.2, fastest 0.9; round by round 1.1, 1.0, 1.2, 1.1, 0.9
    low, _, high = statistics.quantiles([1.1, 1.0, 1.2, 1.1, 0.9], n=4)
    assert bench_overhead.ratio_cell(hyper, llava) == (
        f"1200.000 ms (1.200x; rounds {low:.3f}-{high:.3f}x; fastest 0.900x)"
    )
    assert (low, high) == (0.95, 1.15)
    assert bench_overhead.ratio_cell(hyper[:3], llava[:3], unit=1, suffix=" GiB") == "1.200 GiB (1.200x)"


def test_the_kernel_microbenchmark_times_gpu_work_behind_a_sleep_and_an_l2_flush(monkeypatch):
    """CUDA events recorded around a launch from Python time the launch when the GPU runs faster than the host
    launches (the fused op at decode B=1: 0.13 ms measured against 4.7 us of kernels), and inputs that stay in L2
    between calls beat the HBM floor. Each timed call must be queued behind a GPU sleep and an L2 flush."""
    stream = []

    class Event:
        def __init__(self, enable_timing=False):
            pass

        def record(self):
            stream.append("event")

        def synchronize(self):
            pass

        def elapsed_time(self, end):
            return 2.0

    class Buffer:
        def __init__(self, size, **kwargs):
            self.size = size

        def zero_(self):
            stream.append(f"flush {self.size}")

    monkeypatch.setattr(torch.cuda, "Event", Event)
    monkeypatch.setattr(torch.cuda, "synchronize", lambda *args, **kwargs: None)
    monkeypatch.setattr(torch.cuda, "_sleep", lambda cycles: stream.append("sleep" if cycles > 0 else "no sleep"))
    monkeypatch.setattr(torch.cuda, "current_device", lambda: 0)
    monkeypatch.setattr(torch.cuda, "get_device_properties", lambda device: SimpleNamespace(L2_cache_size=1000))
    monkeypatch.setattr(torch, "empty", Buffer)

    assert bench_overhead.cuda_event_ms(lambda: stream.append("call"), repeats=3) == 2.0
    assert stream[-15:] == ["sleep", "flush 2000", "event", "call", "event"] * 3


def test_the_forced_kernel_paths_read_view_weights_in_place():
    """The fused op reads each layer's weights in place from the generated (batch, layers, P) tensor; the forced
    "old path" must not time a copy of them that the op does not make."""
    import bench_kernel

    generated = torch.randn(2, 3, 8 * 4 + 2 * 8)  # batch 2, 3 layers, d = 8, r = 2
    w_down = generated[..., : 8 * 4].unflatten(-1, (8, 4))[:, 0]
    w_up = generated[..., 8 * 4 :].unflatten(-1, (2, 8))[:, 0]
    seen = []
    bench_kernel.forced(lambda x, down, up, residual, ffn, out: seen.extend([down, up]))(
        torch.randn(2, 1, 8), w_down, w_up, torch.randn(2, 1, 8)
    )
    assert [t.data_ptr() for t in seen] == [w_down.data_ptr(), w_up.data_ptr()]


def test_the_plain_launch_column_launches_the_decode_kernels_without_dependent_launch(monkeypatch):
    """The microbenchmark's column of plain launches must time kernels compiled and launched without programmatic
    dependent launch, though the device has it and launches kept from earlier calls were made with it; afterwards the
    kept launches serve again."""
    launches = []

    class Recorded:
        def __getitem__(self, grid):
            return lambda *arguments, **options: launches.append((arguments[-1], options.get("launch_pdl", False)))

    x, residual = torch.zeros(1, 1, 64), torch.zeros(1, 1, 64)
    w_down, w_up = torch.zeros(1, 64, 8), torch.zeros(1, 4, 64)
    monkeypatch.setattr(fused, "_dependent_launch", lambda device: True)

    class Kept:  # launches an earlier call kept
        compiled = True

        def __call__(self, *arguments):
            launches.append("kept")

    kept = {fused._call_signature(x, w_down, w_up, residual, None): Kept()}
    monkeypatch.setattr(fused, "_DECODE_LAUNCHES", kept)
    monkeypatch.setattr(fused, "_decode_down_kernel", Recorded())
    monkeypatch.setattr(fused, "_decode_up_kernel", Recorded())
    with bench_overhead.plain_decode_launches():
        fused._launch(x, w_down, w_up, residual, None)
        fused._launch(x, w_down, w_up, residual, None)
    assert launches == [(False, False)] * 4  # (the kernels' last constexpr, the launch option)
    fused._launch(x, w_down, w_up, residual, None)
    assert launches[4:] == ["kept"]


def test_profiled_steps_cover_the_decoding_steps_after_the_first(monkeypatch):
    """The compiled rows' GPU busy time per step divides the profile by `steps`: the profiler must run over exactly
    that many decoding forwards, the prefill and the first step (a CUDA-graph recording) left out."""
    from transformers_hyperllava import HyperLlavaForConditionalGeneration
    from transformers_hyperllava.tiny import tiny_config

    events = []
    model = HyperLlavaForConditionalGeneration(tiny_config()).eval()
    model.register_forward_pre_hook(lambda module, args: events.append("forward"))
    profiler = SimpleNamespace(start=lambda: events.append("start"), stop=lambda: events.append("stop"))
    monkeypatch.setattr(bench_overhead, "synchronize", lambda device: events.append("sync"))
    ids = torch.tensor([[1, 5, 6, 7]])
    steps = bench_overhead.ProfiledSteps(profiler, "cpu", first=2, last=5)
    with torch.no_grad():
        model.generate(input_ids=ids, max_new_tokens=7, min_new_tokens=7, do_sample=False, logits_processor=[steps])
    steps.close()  # (stopped already)
    assert events == ["forward"] * 2 + ["sync", "start"] + ["forward"] * 3 + ["sync", "stop"] + ["forward"] * 2

    events.clear()  # a call that ends before `last` (as one that fails would): close() stops the profiler
    steps = bench_overhead.ProfiledSteps(profiler, "cpu", first=2, last=5)
    with torch.no_grad():
        model.generate(input_ids=ids, max_new_tokens=3, min_new_tokens=3, do_sample=False, logits_processor=[steps])
    steps.close()
    assert events == ["forward"] * 2 + ["sync", "start"] + ["forward"] + ["sync", "stop"]


class FakeClock:
    def __init__(self):
        self.now = 0.0

    def perf_counter(self):
        return self.now

    def thread_time(self):  # (a thread that ran half the time)
        return self.now / 2


def test_lockstep_turns_continue_each_candidates_sequence_and_time_a_block_of_steps(monkeypatch, capsys):
    """Eager decoding's lockstep rows: the candidates take turns, a `generate` call each, every turn continuing the
    candidate's own sequence and cache by an untimed step and a block of timed ones; so a host load that changes from
    turn to turn, or a slow first step after each turn (cold caches), leaves the step-by-step ratios exact. A call
    that fails is left out and the others finish."""
    clock, calls, readied = FakeClock(), [], []
    monkeypatch.setattr(bench_overhead, "time", clock)
    monkeypatch.setattr(bench_overhead, "synchronize", lambda device: None)
    block, new_tokens = 4, 10  # three turns
    prompt = {"input_ids": torch.tensor([[7, 8, 9]]), "attention_mask": torch.ones(1, 3, dtype=torch.long)}
    cache_arg = bench_overhead.CACHE_ARG

    class StandIn:
        def __init__(self, name, cost, fails_in_turn=None):
            self.name, self.cost, self.fails_in_turn, self.turn = name, cost, fails_in_turn, 0

        def generate(
            self, max_new_tokens, min_new_tokens, do_sample, logits_processor, return_dict_in_generate, **inputs
        ):
            calls.append((self.name, inputs))
            assert max_new_tokens == min_new_tokens == block + 1 and not do_sample and return_dict_in_generate
            if self.turn == self.fails_in_turn:
                raise RuntimeError("out of memory")
            for token in range(max_new_tokens):
                # The host's load changes from turn to turn; each turn's first forward runs cold, and so does the
                # sequence's first decoding step (per-sequence work).
                clock.now += self.cost * (1 + self.turn) + 5.0 * (token == 0) + 3.0 * (token == 1 and self.turn == 0)
                for processor in logits_processor:
                    processor(None, None)
            sequences = torch.cat([inputs["input_ids"], torch.full((1, max_new_tokens), self.turn)], dim=1)
            self.turn += 1
            return SimpleNamespace(sequences=sequences, **{cache_arg: object()})

    @contextlib.contextmanager
    def ready(model):  # (readying a model, and putting it back, is no part of its steps)
        readied.append(model.name)
        clock.now += 100.0
        yield model
        clock.now += 100.0

    models = {
        "llava": StandIn("llava", 1.0),
        "broken": StandIn("broken", 1.0, fails_in_turn=1),
        "hyper": StandIn("hyper", 1.2),
    }
    candidates = {name: lambda model=model: ready(model) for name, model in models.items()}
    steps = bench_overhead.lockstep_decode_steps(candidates, prompt, new_tokens, "cpu", block=block)
    # Turn by turn in the candidates' order; "broken" fails in its second turn, the others go on.
    assert [name for name, _ in calls] == ["llava", "broken", "hyper"] * 2 + ["llava", "hyper"]
    assert steps["broken"] is None
    output = capsys.readouterr()
    assert "RuntimeError: out of memory" in output.err
    # A first turn starts from the prompt, every later one continues the turn before: its tokens and its cache.
    for name in ("llava", "hyper"):
        inputs = [inputs for called, inputs in calls if called == name]
        assert inputs[0] == prompt
        for turn, continued in enumerate(inputs[1:], 1):
            made = torch.arange(turn).repeat_interleave(block + 1)[None]
            assert torch.equal(continued["input_ids"], torch.cat([prompt["input_ids"], made], dim=1))
            assert torch.equal(continued["attention_mask"], torch.ones_like(continued["input_ids"]))
        assert (
            len({id(inputs[cache_arg]) for inputs in inputs[1:]}) == 2
        )  # each turn's, as the turn before returned it
    assert len(steps["llava"]) == len(steps["hyper"]) == 3 * block
    assert steps["llava"][0] == 1.0 + 3.0  # the first decoding step, apart
    ratios = [hyper / llava for hyper, llava in zip(steps["hyper"][1:], steps["llava"][1:], strict=True)]
    assert ratios == pytest.approx([1.2] * (3 * block - 1))
    # The log gives each call's median warm step and its thread CPU time.
    warm = statistics.median(steps["hyper"][1:])
    assert f"  hyper, lockstep: median warm step {warm:.6g} s, thread CPU time {warm / 2:.6g} s" in output.out
    # Each call readied its model at each of its turns.
    assert readied.count("llava") == readied.count("hyper") == 3 and readied.count("broken") == 2


def test_lockstep_turns_decode_what_one_generate_call_decodes():
    """The turns continue HyperLLaVA's sequences with their caches, and with them the language expert's weights
    generated at the prefill: their tokens are those of one `generate` call."""
    from transformers_hyperllava import HyperLlavaForConditionalGeneration
    from transformers_hyperllava.tiny import tiny_config

    torch.manual_seed(0)
    model = HyperLlavaForConditionalGeneration(tiny_config()).eval()
    with torch.no_grad():  # (fresh experts compute nothing: zero W_u)
        for name, parameter in model.named_parameters():
            if "expert" in name:
                parameter.normal_(0.0, 0.5)
    prompt = bench_overhead.make_batch(model.config, {"device": "cpu", "dtype": torch.float32}, 2, 5)
    block, turns = 3, 3
    outputs = []

    def generate(**kwargs):  # (each turn's output recorded)
        outputs.append(type(model).generate(model, **kwargs))
        return outputs[-1]

    model.generate = generate
    candidates = {"hyper": lambda: contextlib.nullcontext(model)}
    steps = bench_overhead.lockstep_decode_steps(candidates, prompt, turns * block, "cpu", block=block)
    assert len(outputs) == turns and len(steps["hyper"]) == turns * block
    sequences = outputs[-1].sequences
    with torch.no_grad():
        whole = type(model).generate(
            model, **prompt, max_new_tokens=turns * (block + 1), min_new_tokens=turns * (block + 1), do_sample=False
        )
    assert torch.equal(sequences, whole)
    assert len(set(sequences[:, prompt["input_ids"].shape[1] :].flatten().tolist())) > 2  # (not one token repeated)


def test_a_lockstep_cell_gives_the_median_and_quartiles_of_the_warm_steps_ratios_and_the_first_steps_ratio():
    """The lockstep rows pair each warm step with LLaVA's step of the same round and index, and give the first
    decoding step, where per-sequence work shows, apart."""
    steps = 2 * bench_overhead.LOCKSTEP_BLOCK
    llava = [[1.0 + index % 3 for index in range(steps)], [2.0 + index % 2 for index in range(steps)]]
    hyper = [[1.1 * step for step in llava[0]], [1.2 * step for step in llava[1]]]
    llava[0][0], llava[1][0], hyper[0][0], hyper[1][0] = 9.0, 7.0, 18.0, 21.0  # the first decoding steps
    hyper[1][3] = 1.15 * llava[1][3]  # one warm step's ratio 1.15
    cell = bench_overhead.lockstep_cell(hyper, llava)
    ratios = [1.1] * (steps - 1) + [1.15 if index == 3 else 1.2 for index in range(1, steps)]
    low, middle, high = statistics.quantiles(ratios, n=4)
    median_step = statistics.median([hyper[round_][index] for round_ in (0, 1) for index in range(1, steps)])
    first = statistics.median([18.0, 21.0]) / statistics.median([9.0, 7.0])
    assert cell == f"{median_step * 1e3:.3f} ms ({middle:.3f}x; steps {low:.3f}-{high:.3f}x; first step {first:.3f}x)"
    assert first == 19.5 / 8 and 1.1 < middle < 1.2


def test_a_decoding_steps_cpu_time_leaves_out_time_the_thread_did_not_run():
    """The eager rows' second measure is the host thread's CPU time per step: a step in which the thread waits (here
    a sleep, standing in for another process taking the host) is longer by the wall clock only."""
    import time

    from transformers_hyperllava import HyperLlavaForConditionalGeneration
    from transformers_hyperllava.tiny import tiny_config

    model = HyperLlavaForConditionalGeneration(tiny_config()).eval()
    calls = []

    def forward_waits_once(module, args):
        calls.append(None)
        if len(calls) == 3:  # the second decoding step
            time.sleep(0.2)

    model.register_forward_pre_hook(forward_waits_once)
    wall, cpu = bench_overhead.decode_step_times(model, {"input_ids": torch.tensor([[1, 5, 6, 7]])}, 5, "cpu")
    assert len(wall) == len(cpu) == 4
    assert wall[1] >= 0.2 and cpu[1] < 0.1


def test_only_the_after_the_ffn_variant_switches_the_default_off(monkeypatch):
    """The switch is process-wide, and the variants take turns on one model: each `use` sets it, so that the variant
    timed after the "after" one runs beside the FFN again, as by default."""
    from transformers_hyperllava import HyperLlavaForConditionalGeneration, modeling_hyperllava
    from transformers_hyperllava.tiny import tiny_config

    monkeypatch.setattr(modeling_hyperllava, "ADAPTER_BESIDE_FFN", True)
    variants = bench_overhead.HyperVariants(HyperLlavaForConditionalGeneration(tiny_config()))
    seen = []
    for kernel, settings in [("auto", {"beside_ffn": False}), ("auto", {}), (None, {}), ("eager", {})]:
        model = variants.use(kernel, **settings)
        seen.append((modeling_hyperllava.ADAPTER_BESIDE_FFN, model.config.expert_kernel))
    assert seen == [(False, "auto"), (True, "auto"), (True, "auto"), (True, "eager")]


def test_the_adapter_clock_times_each_adapter_call_without_its_ffn_and_counts_launches_through_triton(monkeypatch):
    """`profile_decode.py --eager` compares the host time of a step's adapter calls with what they take alone: one
    value per call of a language-expert layer, the FFN that the call runs left out; and it counts the decode launches
    that go through Triton's launcher (a new `_DecodeLaunches`)."""
    import profile_decode

    from transformers_hyperllava import HyperLlavaForConditionalGeneration
    from transformers_hyperllava.tiny import tiny_config

    model = HyperLlavaForConditionalGeneration(tiny_config()).eval()  # (text only: no visual expert call)
    expert_layers = model.config.language_expert_layer_indices
    # A slow FFN: 50 ms a call, far more than the tiny adapter takes, its first calls included (a prefill's first ops
    # took 16 ms on a loaded 2-core CI machine).
    for index in expert_layers:
        mlp = model.model.language_model.layers[index].mlp
        monkeypatch.setattr(mlp, "forward", lambda x, forward=mlp.forward: (time.sleep(0.05), forward(x))[1])
    ids = torch.tensor([[1, 5, 6, 7]])
    with profile_decode.adapter_clock() as clock, torch.no_grad():
        model.generate(input_ids=ids, max_new_tokens=4, min_new_tokens=4, do_sample=False)
        x, residual = torch.randn(1, 1, 32), torch.randn(1, 1, 32)
        fused._DecodeLaunches(x, torch.randn(1, 32, 8), torch.randn(1, 4, 32), residual, None)
    assert len(clock["seconds"]) == 4 * len(expert_layers)  # the prefill and 3 decoding steps
    assert max(clock["seconds"]) < 0.05
    assert clock["through triton"] == 1
    assert fused._DecodeLaunches.__name__ == "_DecodeLaunches"  # (put back)


@pytest.mark.parametrize("batches", [(), (16,)], ids=["default", "batch-16"])
def test_only_eager_decode_times_the_eager_decoding_rows_alone(batches, monkeypatch, capsys):
    """`--only-eager-decode`: the eager decoding rows at batch 1 and 16, or at those of `--decode-batch` (wall clock,
    host CPU time, and steps in lockstep), and no prefill, training or compiled rows; where the fused kernels serve
    eager decoding, "auto" (one launch a layer) among the candidates."""
    monkeypatch.setitem(bench_overhead.SIZES, "tiny", {**bench_overhead.SIZES["tiny"], "new_tokens": 3})
    timed = []
    decode = bench_overhead.decode_step_times

    def counted(model, batch, *args, **kwargs):
        timed.append((model.config.model_type, len(batch["input_ids"]), getattr(model.config, "expert_kernel", None)))
        return decode(model, batch, *args, **kwargs)

    monkeypatch.setattr(bench_overhead, "decode_step_times", counted)
    monkeypatch.setattr(bench_overhead, "decode_adapters_available", lambda device: True)
    # (Restored after the benchmark's variants set it.)
    monkeypatch.setattr(bench_overhead.modeling_hyperllava, "ADAPTER_BESIDE_FFN", True)
    options = ["--decode-batch", *map(str, batches)] if batches else []
    bench_overhead.main(["--size", "tiny", "--only-eager-decode", *options])
    batches = batches or (1, 16)
    lines = [line for line in capsys.readouterr().out.splitlines() if line.startswith("| ")]
    rows = [line.split(" | ")[0] for line in lines]
    assert rows[1:] == [
        f"| decode, batch {batch}, eager{what}"
        for batch in batches
        for what in (", per token (3 new)", ", host CPU time per token", ", per token, steps in lockstep")
    ]
    # LLaVA, the control, the eager adapter and "auto", 6 rounds each (a warm-up and 5) at each batch size.
    assert sorted(set(timed)) == sorted(
        (kind, batch, kernel)
        for batch in batches
        for kind, kernel in [("llava", None), ("hyperllava", "eager"), ("hyperllava", "auto")]
    )
    assert len(timed) == len(batches) * 4 * 6
    # The lockstep rows: a cell for each HyperLLaVA (the control, the eager adapter, "auto"), none failed.
    assert all(line.count("x; steps ") == 3 for line in lines if "lockstep" in line)


def test_a_probe_runs_after_each_probed_layers_ffn_and_changes_no_output():
    """The probes time a launch inside LLaVA's step: each must run once per probed layer and forward, leave the
    logits alone (a forward hook's return value would replace the FFN's output; the PyTorch op's probe returns its
    output tensor), have each call's host time noted, and be gone afterwards."""
    from transformers import LlavaForConditionalGeneration

    from transformers_hyperllava.tiny import tiny_config

    config = tiny_config(num_hidden_layers=4)
    torch.manual_seed(0)
    llava = LlavaForConditionalGeneration(config.to_llava_config()).eval()
    input_ids = torch.randint(5, 60, (2, 7))
    op = probe_launches.make_probes(torch.device("cpu"))["PyTorch op"]
    calls = []

    def probe():
        calls.append(len(calls))
        return op()

    with torch.no_grad():
        expected = llava(input_ids=input_ids).logits
        seconds = []
        with probe_launches.probed(llava, [1, 3], probe, seconds) as model:
            assert torch.equal(model(input_ids=input_ids).logits, expected)
        assert len(calls) == len(seconds) == 2
        llava(input_ids=input_ids)
    assert len(calls) == len(seconds) == 2


@pytest.mark.parametrize(
    "flags", [[], ["--adapters-only"], ["--lockstep"]], ids=["with-probes", "adapters-only", "lockstep"]
)
def test_the_probe_report_gives_each_candidates_step_cost_per_layer_and_each_probes_own_time(flags, capsys):
    """On a CPU: LLaVA alone, the probes that need no GPU (none with `--adapters-only`) and HyperLLaVA's variants,
    each with its step over LLaVA's per probed layer (in lockstep: its median step-by-step ratio's share of LLaVA's
    median warm step), and the probes with their calls' own host time (the candidates' cells read off the table)."""
    probe_launches.main(["--size", "tiny", "--batch", "1", "--repeats", "1", "--new-tokens", "3", *flags])
    lines = capsys.readouterr().out.splitlines()
    candidates = next(i for i, line in enumerate(lines) if line.startswith("| candidate |"))
    # First where a step's time goes (`step_parts`): each model's parts, each beside its difference from LLaVA's.
    parts = [line.split(" | ") for line in lines[:candidates] if line.startswith(("| LLaVA | 1 |", "| HyperLLaVA, "))]
    assert [row[0] for row in parts] == ["| LLaVA", "| HyperLLaVA, experts detached", "| HyperLLaVA, eager"]
    for row in parts:
        values = [re.fullmatch(r"([\d.]+) \(([+-][\d.]+)\)", cell.removesuffix(" |")).groups() for cell in row[2:]]
        assert len(values) == 4 and all(float(us) > 0 for us, _ in values)
        if row[0] == "| LLaVA":
            assert all(over == "+0.0" for _, over in values)
    lines = lines[candidates:]
    rows = [line.split(" | ") for line in lines if line.startswith("| ")]
    table = {row[0].removeprefix("| "): row[1:] for row in rows[1:]}  # (after the header)
    probes = [] if "--adapters-only" in flags else ["LLaVA + hook alone", "LLaVA + PyTorch op"]
    hyper = ["HyperLLaVA, experts detached", "HyperLLaVA, eager adapter"]
    assert list(table) == ["llava", *probes, *hyper]
    assert table["llava"][1] == "+0.0 us"
    llava_ms = float(table["llava"][0].split(" ms")[0])
    for name in probes + hyper:
        step_ms, ratio = table[name][0].split(" ms (")
        # What the cells' rounding allows: the steps printed to 0.0005 ms, the ratio to 0.0005, the cost to 0.05 us.
        if "--lockstep" in flags:
            over = float(ratio.split("x;")[0]) - 1
            over_ms, within_ms = over * llava_ms, 0.0005 * llava_ms + abs(over) * 0.0005
            assert "; steps " in ratio
        else:
            over_ms, within_ms = float(step_ms) - llava_ms, 2 * 0.0005
        assert float(table[name][1].removesuffix(" us")) == pytest.approx(
            over_ms / 16 * 1e3, abs=within_ms / 16 * 1e3 + 0.051
        )
    for name in probes:
        assert float(table[name][2].removesuffix(" us |")) > 0
    assert all(table[name][2] == " |" for name in hyper)


def test_pytorchs_launcher_gets_an_argument_for_each_parameter_of_the_compiled_empty_kernel():
    """The probes that launch the empty kernel by PyTorch's launcher must hand it one argument per parameter of the
    kernel Triton compiled (the PTX's parameter list, Triton's scratch buffers' among them), typed as addresses (as the
    adapter passes them) or as tensors: the driver reads as many as the kernel has. Compiled for an H100/H200 (sm_90),
    with no GPU needed."""
    pytest.importorskip("triton")
    from conftest import LAUNCHER_KINDS, compile_for, ptx_parameters

    tensors = [torch.zeros(16) for _ in range(6)]
    compiled = compile_for(90, probe_launches.empty_kernel(), tensors, fused._OPTIONS)
    parameters = ptx_parameters(compiled)
    for launch, kind in ((fused._TorchLaunch, "K"), (probe_launches.TensorsTorchLaunch, "O")):
        launched = launch(compiled, (1, 1, 1), 6, ())
        assert [LAUNCHER_KINDS[letter] for letter in launched.types] == parameters
        assert launched.types[:6] == kind * 6
        assert len(launched.tail) == len(parameters) - 6 and set(launched.tail) <= {None}  # (null: no scratch used)


def test_the_launch_check_runs_in_a_process_of_its_own_and_fails_where_nothing_was_compiled():
    """The check that the one launch by PyTorch's launcher writes what Triton's launch writes runs in a spawned process
    (a faulting launch there leaves this process's CUDA context alone): on a CPU, where Triton compiles no kernel for
    the adapter to launch, it must come back False, not True and not an error."""
    from transformers_hyperllava.tiny import tiny_config

    assert probe_launches.launch_checked_apart(tiny_config(), [1, 2], torch.device("cpu"), torch.float32) is False


def test_a_call_that_waits_for_the_gpu_takes_the_sleep_queued_before_it_and_its_functions_are_counted(monkeypatch):
    """`host_us_behind_a_sleep` must queue the GPU sleep before its clock starts and wait for the GPU only after it
    stops: a call that waits for the GPU then takes the sleep, one that only queues work takes its own time. Here the
    GPU is a clock (the sleep ends `ms` after it is queued; a synchronization waits for that), the calls are a wait
    and a no-op. `functions_called` counts each Python and C function a call makes, the call itself among them."""
    sleep_ends = [0.0]

    def sleep(cycles):  # (one cycle a microsecond, below)
        sleep_ends[0] = time.perf_counter() + cycles * 1e-6

    def synchronize():
        while time.perf_counter() < sleep_ends[0]:
            pass

    monkeypatch.setattr(torch.cuda, "_sleep", sleep)
    monkeypatch.setattr(torch.cuda, "synchronize", synchronize)
    monkeypatch.setattr(probe_launches, "sleep_cycles_per_ms", lambda: 1000.0)
    assert probe_launches.host_us_behind_a_sleep(synchronize, 30) >= 30_000
    assert probe_launches.host_us_behind_a_sleep(lambda: None, 30) < 3_000
    assert probe_launches.host_us_behind_a_sleep(synchronize, 0) < 3_000

    def twice():
        return len(str(once())), once()

    def once():
        return 1

    assert probe_launches.functions_called(twice) == 5  # twice, once, str, len, once


def test_a_steps_parts_put_each_layers_time_with_the_expert_layers_or_the_others_and_the_rest_outside(monkeypatch):
    """`step_parts` splits an eager decoding step's time into the expert layers', the other layers' and the rest: a
    layer made 40 ms slower must add exactly that to its own part and to the step, and nothing to the others; and the
    hooks must be gone afterwards. On a clock that only the slowed layers move (the host's own time would make the
    parts move by milliseconds)."""
    settings = dict(bench_overhead.SIZES["tiny"])
    config, llava, _ = bench_overhead.build_models("tiny", settings)
    batch = bench_overhead.make_batch(config, settings, 1, 8)
    layers = llava.model.language_model.layers
    expert_layers = list(range(16, 32))
    now = [0.0]
    monkeypatch.setattr(time, "perf_counter", lambda: now[0])

    def slowed(layer):
        forward = layer.forward

        def slow_forward(*args, **kwargs):
            now[0] += 0.04
            return forward(*args, **kwargs)

        monkeypatch.setattr(layer, "forward", slow_forward)

    base = probe_launches.step_parts(llava, batch, 5, "cpu", expert_layers)
    assert base == [0, 0, 0, 0]
    # A layer slow in the first decoding step only, which step_parts leaves out (each step paired with its own forward;
    # 3 tokens: one step counted, so no median hides it).
    calls, forward = [], layers[5].forward

    def slow_first_step(*args, **kwargs):
        calls.append(len(calls))
        now[0] += 0.04 if len(calls) == 2 else 0  # (the first call is the prefill's)
        return forward(*args, **kwargs)

    monkeypatch.setattr(layers[5], "forward", slow_first_step)
    assert probe_launches.step_parts(llava, batch, 3, "cpu", expert_layers) == [0, 0, 0, 0]
    slowed(layers[20])
    assert probe_launches.step_parts(llava, batch, 5, "cpu", expert_layers) == pytest.approx([0.04, 0.04, 0, 0])
    slowed(layers[3])
    assert probe_launches.step_parts(llava, batch, 5, "cpu", expert_layers) == pytest.approx([0.08, 0.04, 0.04, 0])
    assert all(not layer._forward_pre_hooks and not layer._forward_hooks for layer in layers)
