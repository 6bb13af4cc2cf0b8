#!/usr/bin/env bash
# Fetch the Python wheels a GPU machine without registry access lacks into ./.whl (run from the project root, on a
# machine with registry access). Our GPU image already has torch (CUDA build), transformers, accelerate,
# safetensors, pillow, numpy, httpx. Copy .whl to the GPU machine with the repository; tools/gpu_session.sh installs
# it there before anything else.
# Usage: bash tools/fetch_gpu_wheels.sh [extra==version ...]
set -euo pipefail
grep -qx '/.whl/' .git/info/exclude 2>/dev/null || echo '/.whl/' >> .git/info/exclude
mkdir -p .whl
plat=(--only-binary=:all: --python-version 3.12 --implementation cp
      --platform manylinux_2_28_x86_64 --platform manylinux_2_27_x86_64 --platform manylinux_2_24_x86_64
      --platform manylinux_2_17_x86_64 --platform manylinux2014_x86_64 --platform manylinux1_x86_64)
# Pure-Python or abi3 wheels; versions match what the CPU side resolves today. Adjust with care:
# two versions of one package in .whl stop the whole install.
pkgs=(diffusers==0.42.1 torchao==0.18.0 fastapi starlette pydantic pydantic-core annotated-types
      typing-inspection uvicorn python-multipart opentelemetry-api importlib-metadata "$@")
python3 -m pip download -q --no-deps "${plat[@]}" -d .whl "${pkgs[@]}" 2>&1 | grep -v "^WARNING: Location" || true
# para-attn ships only an sdist (pure Python): build its wheel locally.
ls .whl/para_attn-*.whl >/dev/null 2>&1 || python3 -m pip wheel -q --no-deps -w .whl para-attn==0.3.38 2>&1 | grep -v "^WARNING: Location" || true
ls -la .whl
du -sh .whl
