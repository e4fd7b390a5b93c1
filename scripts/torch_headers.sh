#!/usr/bin/env bash
# Unpacks the C++ headers of torch VERSION (default: the oldest torch the package supports, the
# GPU machine's 2.11.0) into build/torch-headers/VERSION, for tests/test_cuda_backend.py's syntax
# check of the CUDA launchers: they must compile against every supported torch, not only the pinned
# one (torch 2.13 accepts `t.sum({0, 2})`, 2.11 finds it ambiguous). Only the wheel's
# torch/include/ is kept (pip download of one ~0.5 GB wheel, cached by pip). Idempotent.
set -euo pipefail
cd "$(dirname "$0")/.."
VERSION=${1:-2.11.0}
PY=${PY:-.venv/bin/python}
DEST=build/torch-headers/$VERSION
if [[ -f "$DEST/.complete" ]]; then
  echo "==> torch $VERSION headers: $DEST is up to date"
  exit 0
fi
echo "==> torch $VERSION headers: downloading the wheel (headers only are kept) into $DEST"
tmp=$(mktemp -d)
trap 'rm -rf "$tmp"' EXIT
"$PY" -m pip download --quiet --disable-pip-version-check --no-deps --only-binary=:all: \
  --python-version 3.12 --platform manylinux_2_28_x86_64 -d "$tmp" "torch==$VERSION"
rm -rf "$DEST"
mkdir -p "$DEST"
"$PY" - "$tmp"/torch-*.whl "$DEST" <<'PYEOF'
import sys, zipfile
wheel, dest = sys.argv[1], sys.argv[2]
with zipfile.ZipFile(wheel) as z:
    names = [n for n in z.namelist() if n.startswith("torch/include/")]
    z.extractall(dest, names)
print(f"{len(names)} header files")
PYEOF
touch "$DEST/.complete"
