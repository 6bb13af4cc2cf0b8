#!/usr/bin/env bash
# Create .venv, install the pinned requirements and the project itself (`pip install -e .`: the kontext_server
# package, optimizations/, patches/, utils.py) (idempotent: a second run only checks).
# CPU machines get torch 2.13.0 (CPU build). CUDA users: create .venv and install the CUDA build of torch 2.13.0
# into it first (from PyTorch's CUDA wheel index, matching your driver), then run this script; pip keeps the
# installed torch because the version matches.
set -euo pipefail
cd "$(dirname "$0")"
PYTHON=${PYTHON:-python3}
if [ ! -x .venv/bin/python ]; then
  "$PYTHON" -m venv .venv
fi
stamp=.venv/.requirements.sha256
want=$(cat requirements.txt pyproject.toml | sha256sum | cut -d' ' -f1)
if [ -f "$stamp" ] && [ "$(cat "$stamp")" = "$want" ] && .venv/bin/python -P -c "import diffusers, torch, fastapi, kontext_server" 2>/dev/null; then
  echo "setup: .venv is up to date"
  exit 0
fi
# pip < 26: pip 26 refuses para-attn 0.3.38 (an sdist) because its `dev` extra names a git URL ("Distributions
# from PyPI cannot declare direct URL dependencies"), although that extra is never installed.
.venv/bin/python -m pip install -q --upgrade "pip<26"
.venv/bin/python -m pip install -q -r requirements.txt
.venv/bin/python -m pip install -q --no-deps --no-build-isolation -e .
echo "$want" > "$stamp"
.venv/bin/python -c "import torch, diffusers, transformers; print('setup: torch', torch.__version__, '| diffusers', diffusers.__version__, '| transformers', transformers.__version__, '| cuda', torch.cuda.is_available())"
