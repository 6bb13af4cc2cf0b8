#!/usr/bin/env bash
# Call 3 of the 2026-11-24 "kernel bound" session: did TORCHINDUCTOR_ENABLE_PDL=1 reach the compiled kernels, and
# does it change the exact tier's step at edit-512? Run from the repo root on the GPU machine:
#   bash benchmarks/2026-11-24-h100-bound/pdl_check.sh
set -uo pipefail
OPTS=qkv_fusion,modulation_table,compile,attention
stamp() { echo "== $(date +%T) $*"; }
step() {  # $1: label; the environment decides the variant
  stamp "exact step edit-512 $1"
  bash tools/gpu_session.sh py tools/probe_sustained_step.py --workload edit-512 --optimizations $OPTS --no-compile-vae \
    --calls 40 --gapped-calls 3 --out "$OUT/sustained-edit-512-$1.json" | grep -E "^\| (sustained|gapped)|applied"
}
step default-a
TORCHINDUCTOR_ENABLE_PDL=1 FLUX_CACHE_DIR=/tmp/flux-cache-pdl TORCHINDUCTOR_CACHE_DIR=/tmp/inductor-pdl step pdl-a
step default-b
TORCHINDUCTOR_ENABLE_PDL=1 FLUX_CACHE_DIR=/tmp/flux-cache-pdl TORCHINDUCTOR_CACHE_DIR=/tmp/inductor-pdl step pdl-b
stamp "generated Triton sources that use PDL (gdc_wait / launch_pdl), per cache directory"
for d in /tmp/inductor /tmp/inductor-pdl; do
  echo "$d: $(grep -rlE 'gdc_wait|launch_pdl.: True|launch_pdl=True' $d --include=*.py 2>/dev/null | wc -l) of $(find $d -name '*.py' | wc -l) .py files"
done | tee "$OUT/pdl_grep.txt"
stamp done
