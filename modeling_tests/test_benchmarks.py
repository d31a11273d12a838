"""What the benchmark scripts do with their measurements (their numbers come from `.ci/run` and GPU runs, not tests)."""

import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "benchmarks"))

import bench_overhead  # noqa: E402


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
    # The warm-up round's values are dropped: a's are 5, 7, 8 and b's 104, 106, 109.
    assert result == {"a": 7, "broken": None, "b": 106}
    printed = [line for line in capsys.readouterr().out.splitlines() if "round" in line]
    assert printed[:2] == ["  a, round 1 (warm-up): 1", "  b, round 1 (warm-up): 103"]
    assert printed[2:] == [
        "  b, round 2: 104", "  a, round 2: 5", "  b, round 3: 106", "  a, round 3: 7", "  a, round 4: 8",
        "  b, round 4: 109",
    ]  # fmt: skip
