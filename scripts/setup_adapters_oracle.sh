#!/usr/bin/env bash
# Makes .venv-adapters: the AdapterHub `adapters` package (the oracle of tests/test_adapters_oracle.py)
# with the transformers 4.57 it needs, pinned in tests/adapters_oracle/requirements.txt. It cannot
# share .venv, which has transformers 5. Called by `scripts/setup.sh --test`; idempotent.
set -euo pipefail
cd "$(dirname "$0")/.."

PYTHON=${PYTHON:-python3}
VENV=${ORACLE_VENV:-.venv-adapters}
REQUIREMENTS=tests/adapters_oracle/requirements.txt
STAMP="$VENV/.requirements"

if [[ -x "$VENV/bin/python" ]] && cmp -s "$REQUIREMENTS" "$STAMP"; then
  echo "==> adapters oracle: $VENV is up to date"
  exit 0
fi
echo "==> adapters oracle: setting up $VENV (adapters + transformers 4.57)"
[[ -x "$VENV/bin/python" ]] || "$PYTHON" -m venv "$VENV"
"$VENV/bin/python" -m pip install --quiet --disable-pip-version-check -r "$REQUIREMENTS"
"$VENV/bin/python" -c "import adapters, transformers; print('adapters', adapters.__version__, 'transformers', transformers.__version__)"
cp "$REQUIREMENTS" "$STAMP"
