"""What the benchmark scripts do with their measurements (their numbers come from `.ci/run` and GPU runs, not tests)."""

import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "benchmarks"))

import bench_overhead  # noqa: E402


def test_interleaved_takes_turns_and_leaves_a_failing_candidate_out():
    """One failing adapter must not cost a lent GPU run the other columns: it is left out of later rounds."""
    calls = []

    def measure(name, value):
        calls.append(name)
        if name == "broken":
            raise RuntimeError("out of memory")
        return value + len(calls)

    result = bench_overhead.interleaved({"a": 0, "broken": None, "b": 100}, measure, repeats=3, warmup=1)
    assert calls == ["a", "broken", "b", "a", "b", "a", "b", "a", "b"]
    # The warm-up round's values are dropped: a's are 4, 6, 8 and b's 105, 107, 109.
    assert result == {"a": 6, "broken": None, "b": 107}
