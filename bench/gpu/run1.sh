#!/usr/bin/env bash
# GPU run 1 of 2 (about 4 minutes of command time; give the device tool timeout_s=300):
#   build against the machine's torch with every core, then only the GPU tests (CUDA backend,
#   Triton at full size in fp16/bf16/fp32, the model on each GPU backend against eager, the triton
#   backend under Inductor with and without CUDA graphs (tests/test_triton_compile.py); pytest
#   -m gpu, in parallel, no -x), then the model benchmark against HF.
#   Files under $OUT (at most 8): machine.txt build.log tests.log model.csv bench_model.log summary.txt
#
#   OUT=$OUT bench/gpu/run1.sh              # on the GPU machine
#   DRY_RUN=1 OUT=/tmp/g bench/gpu/run1.sh   # here: the same steps, tiny workloads
# Issue run 2 (bench/gpu/run2.sh) next, while the machine is still warm: it reuses this build and
# reruns what failed here. Afterwards append $OUT/*.csv's rows to bench/results/*.csv and commit.
source "$(dirname "$0")/common.sh"

machine_info > "$OUT/machine.txt" 2>&1
cat "$OUT/machine.txt"

# the build gets what the budget allows less 90 s: nothing runs without it (a fresh build's
# slowest torch-header file may take over 2 minutes), and what it leaves goes to the tests
if ! run_step build "$OUT/build.log" 180 90 build_package; then
  finish; echo "build failed: see $OUT/build.log"; exit 1
fi

if [[ $DRY_RUN == 1 ]]; then
  test_args=(--collect-only -q)
  # (the cpu backend only: the Triton interpreter runs the base-size model at seconds per call)
  bench_args=(--quick --device cpu --backends cpu --shapes 1x8 --varlen none --ragged 2x4-8)
else
  # per-test timeout: a hung kernel costs one test, not the run
  test_args=(-n "$(( JOBS < 8 ? JOBS : 8 ))" -q -rfEs --timeout 120)
  bench_args=()
fi
run_step tests "$OUT/tests.log" 120 60 "$PY" -m pytest tests -m "gpu and not build_check" "${test_args[@]}"
tests_rc=$?

run_step bench_model "$OUT/bench_model.log" 75 0 "$PY" bench/bench_model.py --output "$OUT/model.csv" "${bench_args[@]}"
bench_rc=$?

finish || exit 1
exit $(( tests_rc != 0 || bench_rc != 0 ))
