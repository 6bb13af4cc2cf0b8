#!/usr/bin/env bash
# Call 2 of the 2026-11-24 "kernel bound" session, on a second machine. Run from the repo root on the GPU machine:
#   bash benchmarks/2026-11-24-h100-bound/bound_replicate.sh
# The bf16 kernel bound of the three workloads again (another machine), the fp8 copy's (fp8 GEMMs + bf16 attention),
# and the exact tier's whole step at edit-512 between two bounds of that workload.
set -uo pipefail
stamp() { echo "== $(date +%T) $*"; }
bound() {  # $1: label, $2: dtype, then workloads
  local label=$1 dtype=$2; shift 2
  stamp "kernel bound $label"
  bash tools/gpu_session.sh py tools/probe_kernel_bound.py --dtype "$dtype" --workload "$@" --calls 40 \
    --out "$OUT/kernel_bound-$label.json" | grep -E "^\||GEMMs"
}
bound 3 bf16 edit-512 t2i-1024 edit-1024
bound fp8-1 fp8 edit-512 t2i-1024 edit-1024
stamp "exact step edit-512"
bash tools/gpu_session.sh py tools/probe_sustained_step.py --workload edit-512 \
  --optimizations qkv_fusion,modulation_table,compile,attention --no-compile-vae --calls 40 --gapped-calls 3 \
  --out "$OUT/sustained-edit-512-default.json" | grep -E "^\| (sustained|gapped)|applied"
bound 4 bf16 edit-512
stamp done
