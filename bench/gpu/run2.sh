#!/usr/bin/env bash
# GPU run 2 of 2 (about 4 minutes of command time; give the device tool timeout_s=300), issued
# while the machine is still warm after run 1 (a fresh machine rebuilds first):
#   compute-sanitizer memcheck of every CUDA kernel (bench/cuda_memcheck.py), the op benchmarks
#   (one shape per op and dtype, no torch.compile), the fused linear + activation benchmark, and
#   a rerun of the tests that failed in run 1 (pytest --last-failed, with full tracebacks).
#   Files under $OUT (at most 8): memcheck.log ops.csv bench_ops.log linear_activation.csv
#   bench_linear_activation.log rerun.log summary.txt
source "$(dirname "$0")/common.sh"

if ! "$PY" -c "import distilbert_fast" 2>/dev/null; then
  if ! run_step build "$OUT/rerun.log" 150 90 build_package; then
    finish; echo "build failed: see $OUT/rerun.log"; exit 1
  fi
fi

memcheck_rc=0
SANITIZER=$(command -v compute-sanitizer || ls "${CUDA_HOME:-/usr/local/cuda}/bin/compute-sanitizer" 2>/dev/null)
if [[ $DRY_RUN == 1 ]]; then
  # no GPU here: the script must still run and say the backend is absent (exit 2)
  run_step memcheck "$OUT/memcheck.log" 60 150 "$PY" bench/cuda_memcheck.py
  (( $? == 2 )) || memcheck_rc=1
elif [[ -z "$SANITIZER" ]]; then
  echo "compute-sanitizer not found: memcheck skipped" | tee "$OUT/memcheck.log"
else
  # memory errors only: torch's own probing CUDA API calls would count as errors otherwise
  run_step memcheck "$OUT/memcheck.log" 90 150 "$SANITIZER" --tool memcheck --report-api-errors no \
    --error-exitcode 1 "$PY" bench/cuda_memcheck.py
  memcheck_rc=$?
fi

if [[ $DRY_RUN == 1 ]]; then
  ops_args=(--quick --device cpu --no-compile)
  linact_args=(--device cpu --tokens 64 --in-features 32 --out-features 48 --repeats 3 --max-time 0.2 --no-record)
else
  # one shape per op, both half dtypes and float32
  ops_args=(--no-compile --dtypes float16,bfloat16,float32 --rounds 3 --max-time 0.2
            --residual-layernorm 8192x768 --bias-activation 8192x3072
            --masked-attention 32x12x128x64 --linear-activation 8192x768x3072)
  linact_args=()
fi
run_step bench_ops "$OUT/bench_ops.log" 75 75 "$PY" bench/bench_ops.py --output "$OUT/ops.csv" "${ops_args[@]}"
ops_rc=$?
run_step bench_linear_activation "$OUT/bench_linear_activation.log" 45 30 \
  "$PY" bench/bench_linear_activation.py --output "$OUT/linear_activation.csv" "${linact_args[@]}"
linact_rc=$?

# the tests run 1 left failing (pytest's cache survives on a warm machine), one at a time
if [[ $DRY_RUN == 1 ]]; then rerun_args=(--collect-only -q); else rerun_args=(-q -rfEs --timeout 120 --tb=long); fi
run_step rerun "$OUT/rerun.log" 60 0 "$PY" -m pytest tests -m "gpu and not build_check" --last-failed \
  --last-failed-no-failures none "${rerun_args[@]}"
rerun_rc=$?
(( rerun_rc == 5 )) && rerun_rc=0  # nothing failed in run 1: nothing to rerun

finish || exit 1
exit $(( memcheck_rc != 0 || ops_rc != 0 || linact_rc != 0 || rerun_rc != 0 ))
