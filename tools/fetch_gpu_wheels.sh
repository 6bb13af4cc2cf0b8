#!/usr/bin/env bash
# Fetch the Python wheels a GPU machine without registry access lacks into ./.whl (run from the project root, on a
# machine with registry access). Our GPU image already has torch (CUDA build), transformers, accelerate,
# safetensors, pillow, numpy, httpx. Copy .whl to the GPU machine with the repository; tools/gpu_session.sh installs
# it there before anything else.
# Usage: bash tools/fetch_gpu_wheels.sh [extra==version ...]
#        RAY=1 bash tools/fetch_gpu_wheels.sh   # also ray[serve] for `serve --engine ray`, in .whl/ray (below)
set -euo pipefail
grep -qx '/.whl/' .git/info/exclude 2>/dev/null || echo '/.whl/' >> .git/info/exclude
mkdir -p .whl
plat=(--only-binary=:all: --python-version 3.12 --implementation cp
      --platform manylinux_2_28_x86_64 --platform manylinux_2_27_x86_64 --platform manylinux_2_24_x86_64
      --platform manylinux_2_17_x86_64 --platform manylinux2014_x86_64 --platform manylinux1_x86_64)
# Pure-Python or abi3 wheels; versions match what the CPU side resolves today. Adjust with care:
# two versions of one package in .whl stop the whole install.
pkgs=(diffusers==0.42.1 torchao==0.18.0 fastapi starlette pydantic pydantic-core annotated-types
      typing-inspection uvicorn python-multipart opentelemetry-api importlib-metadata
      pillow==13.0.0  # requirements.txt's pin (the image has its own Pillow)
      sageattention==1.0.6 nvidia-cudnn-frontend==1.32.0  # bench/bench_attention_candidates.py only
      "$@")
python3 -m pip download -q --no-deps "${plat[@]}" -d .whl "${pkgs[@]}" 2>&1 | grep -v "^WARNING: Location" || true
# para-attn ships only an sdist (pure Python): build its wheel locally, with a pip older than 26 (pip 26 refuses the
# sdist for the git URL in its `dev` extra; setup_flux_optimized.sh gives .venv such a pip).
wheel_py=python3; [ -x .venv/bin/python ] && wheel_py=.venv/bin/python
ls .whl/para_attn-*.whl >/dev/null 2>&1 || "$wheel_py" -m pip wheel -q --no-deps -w .whl para-attn==0.3.38 2>&1 | grep -v "^WARNING: Location" || true
# RAY=1: ray[serve] (requirements.txt's pin) with its dependencies resolved for the GPU image's Python, in .whl/ray.
# A package .whl/ already holds is dropped from .whl/ray (ours win); gpu_session.sh puts .whl/ray's packages after
# the image's own, so the image's numpy, protobuf and the rest stay the ones it was built with.
if [ "${RAY:-0}" = 1 ]; then
  ray_pin=$(grep -E '^ray\[serve\]==' requirements.txt)
  mkdir -p .whl/ray
  python3 -m pip download -q "${plat[@]}" -d .whl/ray "$ray_pin" 2>&1 | grep -v "^WARNING: Location" || true
  norm() { basename "$1" | cut -d- -f1 | tr 'A-Z.-' 'a-z__'; }
  for ours in .whl/*.whl; do
    for theirs in .whl/ray/*.whl; do
      [ "$(norm "$ours")" = "$(norm "$theirs")" ] && rm -f "$theirs"
    done
  done
  ls .whl/ray | wc -l
fi
ls -la .whl
du -sh .whl
