#!/usr/bin/env bash
# Runs on a GPU machine (the device tool), from the repo root, with the wheels from ../shared/gpu/wheels.sh in .whl/:
#   bash tools/gpu_session.sh tests                      # GPU tests (pytest -m gpu), figures in $OUT/gpu_checks.json
#   bash tools/gpu_session.sh bench --workload edit-512  # stage table; markdown on stdout, JSON + PNG in $OUT
set -uo pipefail
OUT=${OUT:-/tmp/out}; mkdir -p "$OUT"
python3 -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade --target /tmp/site .whl/*.whl \
  || exit 1
export PYTHONPATH=/tmp/site:$PWD PYTHONUNBUFFERED=1 FLUX_CACHE_DIR=${FLUX_CACHE_DIR:-/tmp/flux-cache}
export TORCHINDUCTOR_CACHE_DIR=${TORCHINDUCTOR_CACHE_DIR:-/tmp/inductor} FLUX_LOG_LEVEL=WARNING
{ nvidia-smi --query-gpu=name,memory.total,driver_version --format=csv,noheader
  python3 -c "import torch, diffusers, transformers, torchao; print('torch', torch.__version__, 'diffusers', diffusers.__version__, 'transformers', transformers.__version__, 'torchao', torchao.__version__, 'cudnn', torch.backends.cudnn.version())"
} 2>&1 | grep -v Warn | tee -a "$OUT/env.txt"
mode=$1; shift
case "$mode" in
  tests) python3 -m pytest -q -m gpu tests/test_gpu.py -s -p no:cacheprovider "$@" 2>&1 | tee "$OUT/gpu_tests.log" ;;
  bench) python3 flux_kontext_optimized.py benchmark --model synthetic-full --out-dir "$OUT" "$@" 2>&1 \
           | grep -v "Warning\|warn(" | tee "$OUT/bench.log" ;;
  *) echo "usage: $0 tests|bench [args]"; exit 2 ;;
esac
