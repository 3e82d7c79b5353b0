#!/usr/bin/env bash
# Create (or refresh) the project's virtual environment in .venv from nothing but the checkout.
# Idempotent: a second call with unchanged requirements returns in a second.
set -euo pipefail
cd "$(dirname "$0")/.."
VENV="${EPEE_VENV:-.venv}"
PYTHON="${PYTHON:-python3}"

if ! "$PYTHON" -c 'import sys; sys.exit(0 if sys.version_info[:2] >= (3, 11) else 1)'; then
  echo "epee-beam needs Python >= 3.11; $PYTHON is $("$PYTHON" --version 2>&1)" >&2
  exit 1
fi
[ -x "$VENV/bin/python" ] || "$PYTHON" -m venv "$VENV"

stamp="$VENV/.epee-installed"
if [ ! -f "$stamp" ] || [ requirements.txt -nt "$stamp" ] || [ setup.py -nt "$stamp" ]; then
  echo "setting up $VENV (first run takes a minute)" >&2
  "$VENV/bin/python" -m pip install -q --disable-pip-version-check --upgrade pip 2>&1 | grep -v "is ignored" || true
  # torch first, spelled exactly so: it takes the CPU wheel already on the machine; any other
  # spelling, or letting a dependency pull torch, downloads gigabytes of CUDA packages.
  "$VENV/bin/python" -m pip install -q torch==2.13.0 2>&1 | grep -v "is ignored" || true
  "$VENV/bin/python" -m pip install -q -r requirements.txt 2>&1 | grep -v "is ignored" || true
  "$VENV/bin/python" -m pip install -q --no-deps --no-build-isolation -e . 2>&1 | grep -v "is ignored" || true
  "$VENV/bin/python" -c "import torch, transformers, apache_beam, epee" \
    || { echo "environment set-up failed: see the pip output above" >&2; exit 1; }
  touch "$stamp"
fi
