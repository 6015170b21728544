#!/usr/bin/env bash
# Creates .venv and installs evclip_jax with its test extras (torch CPU 2.13.0 for parity tests).
set -euo pipefail
cd "$(dirname "$0")/.."
PY=${PYTHON:-python3}
[ -x .venv/bin/python ] || "$PY" -m venv .venv
.venv/bin/python -m pip install -q --upgrade pip
.venv/bin/python -m pip install -q -e ".[test]"
# open_clip (the tokenizer of OpenAI checkpoint files, and the tests' reference) without its
# dependencies: it declares torchvision, which has no build for our CPU torch and which neither
# its tokenizer nor its ViT CLIP code calls (pyproject.toml, extra "openclip").
.venv/bin/python -m pip install -q --no-deps "open_clip_torch>=3.0,<4"
