#!/usr/bin/env bash
# Creates .venv and installs evclip_jax with its test extras (torch CPU 2.13.0 for parity tests).
set -euo pipefail
cd "$(dirname "$0")/.."
PY=${PYTHON:-python3}
[ -x .venv/bin/python ] || "$PY" -m venv .venv
.venv/bin/python -m pip install -q --upgrade pip
.venv/bin/python -m pip install -q -e ".[test]"
