#!/usr/bin/env bash
# Runs on a GPU machine, from the repo root, with the wheels from tools/fetch_gpu_wheels.sh in .whl/:
#   bash tools/gpu_session.sh tests                      # GPU tests (pytest -m gpu), figures in $OUT/gpu_checks.json
#        (test files only, one process each; a -k selection: py -m pytest -q -m gpu -s FILE -k EXPR)
#   bash tools/gpu_session.sh bench --workload edit-512  # stage table; markdown on stdout, JSON + PNG in $OUT
#   bash tools/gpu_session.sh profile --workload t2i-1024 --optimizations all --flags --flags use_mxfp4=true
#   bash tools/gpu_session.sh request --workload edit-512 --optimizations all --flags use_mxfp4=true  # whole request
#   bash tools/gpu_session.sh coldstart --optimizations all --warmup 1024x1024,edit:1024x1024 \
#        --hide-packages peft,scipy,sklearn  # tools/cold_start.py (on the image, not installed by our requirements;
#                                            # diffusers and transformers import them at start-up when present)
#   bash tools/gpu_session.sh py bench/bench_gelu_quant.py --out "$OUT/gelu_quant.json"   # any script, same env
#   bash tools/gpu_session.sh py tools/ray_replicas_bench.py --replicas 2 --kill --json-out "$OUT/ray-replicas.json"
#        # Ray Serve replicas (needs .whl/ray: RAY=1 bash tools/fetch_gpu_wheels.sh)
# Several modes in one device call: chain them with `;` (the wheels are installed once per machine).
set -uo pipefail
OUT=${OUT:-/tmp/out}; mkdir -p "$OUT"
[ -f /tmp/site/.installed ] || { python3 -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade \
  --target /tmp/site .whl/*.whl && touch /tmp/site/.installed; } || exit 1
export PYTHONPATH=/tmp/site:$PWD PYTHONUNBUFFERED=1
# WHEEL_OVERLAY=.whl/tf523: wheels that shadow the image's own (e.g. our pinned transformers and its hub), in front.
# Fetched here (registry access) with, for P in "--no-deps transformers==5.23.0 tokenizers==0.23.3 safetensors==0.8.0"
# and "huggingface-hub==2.4.0" (with its dependencies): python3 -m pip download --only-binary=:all: --python-version
# 3.12 --implementation cp --platform manylinux_2_28_x86_64 --platform manylinux_2_17_x86_64 -d .whl/tf523 $P
if [ -n "${WHEEL_OVERLAY:-}" ]; then
  [ -f /tmp/site-overlay/.installed ] || { python3 -m pip install -q --no-index --no-deps --no-compile --no-cache-dir \
    --upgrade --target /tmp/site-overlay "$WHEEL_OVERLAY"/*.whl && touch /tmp/site-overlay/.installed; } || exit 1
  export PYTHONPATH=/tmp/site-overlay:$PYTHONPATH
fi
# .whl/ray (RAY=1 bash tools/fetch_gpu_wheels.sh): ray[serve] for `serve --engine ray` and tools/ray_*_bench.py.
# Installed apart and put after the image's site-packages (a .pth in the user site), so that only what the image
# lacks comes from there; Ray's workers are started with this environment too.
if [ -d .whl/ray ]; then
  [ -f /tmp/site-ray/.installed ] || { python3 -m pip install -q --no-index --no-deps --no-compile --no-cache-dir \
    --upgrade --target /tmp/site-ray .whl/ray/*.whl && touch /tmp/site-ray/.installed; } || exit 1
  usersite=$(python3 -m site --user-site) && mkdir -p "$usersite" && echo /tmp/site-ray > "$usersite/flux-ray.pth"
  export PATH=/tmp/site-ray/bin:$PATH
fi
export FLUX_CACHE_DIR=${FLUX_CACHE_DIR:-/tmp/flux-cache}
export TORCHINDUCTOR_CACHE_DIR=${TORCHINDUCTOR_CACHE_DIR:-/tmp/inductor} FLUX_LOG_LEVEL=WARNING
{ nvidia-smi --query-gpu=name,memory.total,driver_version --format=csv,noheader
  python3 -c "import torch, diffusers, transformers, torchao, huggingface_hub; print('torch', torch.__version__, 'diffusers', diffusers.__version__, 'transformers', transformers.__version__, 'huggingface_hub', huggingface_hub.__version__, 'torchao', torchao.__version__, 'cudnn', torch.backends.cudnn.version())"
} 2>&1 | grep -v Warn | tee -a "$OUT/env.txt"
mode=$1; shift
case "$mode" in
  # One process per test file: on an 80 GB H100 the stage table's service does not fit beside test_gpu.py's.
  tests) for f in "${@:-tests/gpu/test_gpu.py}"; do
           python3 -m pytest -q -m gpu -s -p no:cacheprovider "$f" 2>&1 | tee -a "$OUT/gpu_tests.log"; done ;;
  bench) python3 flux_kontext_optimized.py benchmark --model synthetic-full --out-dir "$OUT" "$@" 2>&1 \
           | grep -v "Warning\|warn(" | tee -a "$OUT/bench.log" ;;
  profile) python3 tools/profile_step.py --out-dir "$OUT" "$@" 2>&1 | grep -v "Warning\|warn(" | tee -a "$OUT/profile.log" ;;
  request) python3 tools/profile_request.py --out-dir "$OUT" "$@" 2>&1 | grep -v "Warning\|warn(" \
           | tee -a "$OUT/request.log" ;;
  coldstart) python3 tools/cold_start.py --json-out "$OUT/cold_start-$(date +%s).json" "$@" 2>&1 \
           | tee -a "$OUT/cold_start.log" ;;
  py) python3 "$@" 2>&1 | grep -v "Warning\|warn(" | tee -a "$OUT/py.log" ;;
  *) echo "usage: $0 tests|bench|profile|request|coldstart|py [args]"; exit 2 ;;
esac
