#!/usr/bin/env bash
# The exact tier's step with and without the bf16 single blocks' proj_out split (FLUX_BF16_SPLIT_PROJ_OUT), on one
# machine, processes interleaved A B A B so that drift between them shows; then a profile of the split (B).
# Run from the repo root on the GPU machine:  bash benchmarks/2026-11-24-h100-split/ab_exact_step.sh [workload]
set -uo pipefail
W=${1:-t2i-1024}
OPTS=qkv_fusion,modulation_table,compile,attention
probe() {  # $1: label; the environment decides the variant
  bash tools/gpu_session.sh py tools/probe_sustained_step.py --workload "$W" --optimizations $OPTS --no-compile-vae \
    --calls 40 --gapped-calls 3 --out "$OUT/sustained-$W-$1.json" | grep -E "^\| (sustained|gapped)|applied"
}
for rep in 1 2; do
  FLUX_BF16_SPLIT_PROJ_OUT=0 probe "concat-$rep"
  probe "split-$rep"
done
bash tools/gpu_session.sh profile --workload "$W" --optimizations $OPTS --no-compile-vae --calls 3 \
  | grep -v "^\s*$" | head -40
rm -f "$OUT"/*.trace.json  # hundreds of MB; the summary JSON keeps the kernel table
