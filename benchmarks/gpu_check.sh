#!/usr/bin/env bash
# The one check for a lent GPU (H100/H200): the fused expert kernel's tests on CUDA, then the 7B overhead benchmark.
# Needs no network and installs nothing (the package is used from this working tree). At most 9.8 minutes: the tests'
# and the benchmark's timeouts (each step has 10 s more to stop). The whole benchmark no longer fits in them (run 7
# took 477 s in all, with less in it): a run cut short keeps what it measured, and BENCH_ARGS picks a part. Where a compiled decoding
# step's time goes is `benchmarks/profile_decode.py --size 7b` (about 3 minutes), run on its own when that is the
# question.
#
#   OUT=/some/folder bash benchmarks/gpu_check.sh
#   BENCH_ARGS=--only-compiled OUT=/some/folder bash benchmarks/gpu_check.sh   # the kernel microbenchmark and the
#       compiled decoding rows alone, every candidate at batch 1 and 16: about 7 minutes in all, which leaves a lent
#       GPU's 15 minutes room for `profile_decode.py` after it
#   BENCH_ARGS=--only-eager-decode OUT=/some/folder bash benchmarks/gpu_check.sh   # the eager decoding rows and the
#       adapter's host time per call alone (run 14: 157 s without the rows in lockstep, which since session 28 run on
#       a GPU too, in one thread: about 5 minutes with them); add "--decode-batch 16" for batch 16's rows alone
#
# Writes under $OUT: env.log, test_fused_expert.log, bench_7b.md (the report, written as it goes) and bench_7b.log
# (with every measurement as it is taken).
set -u
: "${OUT:?set OUT to the folder for the logs}"
cd "$(dirname "$0")/.."
mkdir -p "$OUT"
export PYTHONPATH="$PWD/src${PYTHONPATH:+:$PYTHONPATH}"
# Unbuffered, and SIGINT at a timeout: a step cut short still leaves what it printed and where it was.
export HF_HUB_OFFLINE=1 TRANSFORMERS_VERBOSITY=error PYTHONUNBUFFERED=1
PYTHON="${PYTHON:-$(command -v python || command -v python3)}"
failed=0

{
    nvidia-smi
    "$PYTHON" -c 'import sys, torch, transformers; print(sys.version); print("torch", torch.__version__, "cuda",
torch.version.cuda, "| transformers", transformers.__version__)'
    "$PYTHON" -c 'import triton; print("triton", triton.__version__)'
    "$PYTHON" -c 'import pytest; print("pytest", pytest.__version__)'
} >"$OUT/env.log" 2>&1
cat "$OUT/env.log"

# Compiling the kernels for every tested shape and dtype dominates this step (86 s on an H200 in run 7, with the
# model-level tests: three of them compile a tiny model's decoding step with Inductor, one of them new since).
# Among them eager decoding with one launch a layer, against the eager adapter (run 12: 101 s in all, with the CUDA
# graphs' tests since removed). Then a model split
# over the GPU and the CPU (a second device, which no CPU-only run has) against the unsplit one.
# Not the tests that compile launches for A100 and H100 without running them: the CPU runs them as well (45 s).
echo "== fused kernel tests (CUDA), eager decoding's one launch, a model split over GPU and CPU"
timeout -s INT -k 10 170 "$PYTHON" -m pytest modeling_tests/test_fused_expert.py -q -rs -p no:cacheprovider \
    -k "not compiles_for_the_gpu and not read_what_the_kernel_before_wrote" \
    modeling_tests/test_loading.py::test_a_model_split_over_gpu_and_cpu_gives_the_same_logits_and_tokens \
    >"$OUT/test_fused_expert.log" 2>&1 || failed=1
tail -n 15 "$OUT/test_fused_expert.log"

# Two 7B models in bf16 (~28 GB) plus a training step's gradients. Near the end the static-cache decode compiles
# LLaVA, the control, the default adapter (beside the FFN) and the adapter after the FFN at batch 1, then the first
# three at batch 16, each followed by its GPU busy time per step (profiled); the training step's GPU busy time is
# profiled last. A run cut short by the timeout still leaves the numbers before in bench_7b.md (345 s on an H200 in
# run 7; since then 4 more compiled rounds per batch size and the compiled rows' GPU busy time, about 50 s more, a
# fourth compiled candidate, about 40 s, 2 eager decoding rounds fewer, about 30 s less, and since session 28 the eager
# rows in lockstep, about 2 minutes: the whole benchmark needs more than the 410 s here, and BENCH_ARGS picks a part).
echo "== 7B overhead benchmark"
timeout -s INT -k 10 410 "$PYTHON" benchmarks/bench_overhead.py --size 7b --out "$OUT/bench_7b.md" ${BENCH_ARGS:-} \
    >"$OUT/bench_7b.log" 2>&1 || failed=1
cat "$OUT/bench_7b.md" 2>/dev/null || tail -n 40 "$OUT/bench_7b.log"
[ "$failed" = 0 ] || { echo "== something failed or timed out: see the logs in $OUT"; tail -n 20 "$OUT/bench_7b.log"; }
exit "$failed"
