#!/usr/bin/env bash
# The prepared GPU check, for a machine with CUDA and no package registry (the device tool's
# H100/H200: torch 2.11 + CUDA 13, triton, transformers and tokenizers preinstalled):
#   builds the package and its extension against the machine's torch, runs the test suite on the
#   GPU, runs a compute-sanitizer memcheck pass over each CUDA kernel (bench/cuda_memcheck.py)
#   and the benchmarks (model; fused linear + activation; per op, where bench/bench_ops.py
#   exists), and leaves logs and result rows under $OUT (default bench/results/gpu).
#   Every step runs under a timeout cut from one budget, so the whole script ends within
#   BUDGET_S seconds (default 470, inside the 8 minutes it is allowed).
#
#   OUT=/some/dir bench/gpu_check.sh
# Afterwards, append $OUT/*.csv's rows to the matching bench/results/*.csv and commit them.
set -uo pipefail
cd "$(dirname "$0")/.."
OUT=${OUT:-bench/results/gpu}
PY=${PYTHON:-python3}
BUDGET_S=${BUDGET_S:-470}
mkdir -p "$OUT"
export PYTHONUNBUFFERED=1
deadline=$((SECONDS + BUDGET_S))

# step_limit WANT RESERVE: WANT seconds, or less so that RESERVE seconds stay for later steps
step_limit() {
  local left=$((deadline - SECONDS - $2))
  (( left < $1 )) && echo $(( left > 10 ? left : 10 )) || echo "$1"
}

{ date -u +%FT%TZ; nvidia-smi; "$PY" -c "import torch, sys; print(sys.version); print('torch', torch.__version__, 'cuda', torch.version.cuda, torch.cuda.get_device_name())"; "$PY" -c "import triton; print('triton', triton.__version__)"; } \
  > "$OUT/machine.txt" 2>&1
cat "$OUT/machine.txt"

echo "==> build"
if ! timeout "$(step_limit 120 320)" "$PY" -m pip install --no-build-isolation --no-deps --no-index -e . > "$OUT/build.log" 2>&1; then
  tail -40 "$OUT/build.log"; echo "build failed"; exit 1
fi
"$PY" -c "import distilbert_fast as d; print(d.BUILD_INFO, d.ops.registered_backends())"

echo "==> tests (GPU where CUDA is present; fixtures missing here are skipped)"
timeout "$(step_limit 200 210)" "$PY" -m pytest tests -q -x -rs 2>&1 | tee "$OUT/tests.log"
tests_rc=${PIPESTATUS[0]}

echo "==> compute-sanitizer memcheck of the cuda kernels"
memcheck_rc=0
SANITIZER=$(command -v compute-sanitizer || ls "${CUDA_HOME:-/usr/local/cuda}/bin/compute-sanitizer" 2>/dev/null)
if [ -z "$SANITIZER" ]; then
  echo "compute-sanitizer not found: memcheck skipped" | tee "$OUT/memcheck.log"
elif ! "$PY" -c "import sys, distilbert_fast as d; sys.exit('cuda' not in d.ops.registered_backends())"; then
  echo "the cuda backend is not built: memcheck skipped" | tee "$OUT/memcheck.log"
else
  # memory errors only: torch's own probing CUDA API calls would count as errors otherwise
  timeout "$(step_limit 90 180)" "$SANITIZER" --tool memcheck --report-api-errors no --error-exitcode 1 \
    --log-file "$OUT/memcheck.log" "$PY" bench/cuda_memcheck.py
  memcheck_rc=$?
  tail -5 "$OUT/memcheck.log"
fi

echo "==> model benchmark"
timeout "$(step_limit 90 120)" "$PY" bench/bench_model.py --output "$OUT/model.csv" 2>&1 | tee "$OUT/bench_model.log"
bench_rc=${PIPESTATUS[0]}

echo "==> fused linear + activation benchmark"
timeout "$(step_limit 45 75)" "$PY" bench/bench_linear_activation.py --output "$OUT/linear_activation.csv" 2>&1 \
  | tee "$OUT/bench_linear_activation.log"
linact_rc=${PIPESTATUS[0]}

ops_rc=0
if [[ -f bench/bench_ops.py ]]; then
  echo "==> per-op benchmark"
  timeout "$(step_limit 75 0)" "$PY" bench/bench_ops.py --output "$OUT/ops.csv" 2>&1 | tee "$OUT/bench_ops.log"
  ops_rc=${PIPESTATUS[0]}
fi

echo "tests rc=$tests_rc memcheck rc=$memcheck_rc bench rc=$bench_rc linear_activation rc=$linact_rc ops rc=$ops_rc (${SECONDS}s)"
exit $(( tests_rc != 0 || memcheck_rc != 0 || bench_rc != 0 || linact_rc != 0 || ops_rc != 0 ))
