#!/usr/bin/env bash
# Call 1 of the 2026-11-24 "kernel bound" session, on one machine. Run from the repo root on the GPU machine:
#   bash benchmarks/2026-11-24-h100-bound/bound_and_pdl.sh
# 1. GEMMs + attention alone (tools/probe_kernel_bound.py), the three workloads, sustained;
# 2. the exact tier's whole step at t2i-1024, sustained (tools/probe_sustained_step.py), A B A: the default, then
#    inductor's programmatic dependent launch (TORCHINDUCTOR_ENABLE_PDL=1, own cache directories), then the default;
# 3. the kernel bound at t2i-1024 again, last, to see the machine's drift over the call.
set -uo pipefail
OPTS=qkv_fusion,modulation_table,compile,attention
stamp() { echo "== $(date +%T) $*"; }
bound() {  # $1: label, then workloads
  local label=$1; shift
  stamp "kernel bound $label"
  bash tools/gpu_session.sh py tools/probe_kernel_bound.py --workload "$@" --calls 40 --out "$OUT/kernel_bound-$label.json" \
    | grep -E "^\||GEMMs"
}
step() {  # $1: label; the environment decides the variant
  stamp "exact step $1"
  bash tools/gpu_session.sh py tools/probe_sustained_step.py --workload t2i-1024 --optimizations $OPTS --no-compile-vae \
    --calls 40 --gapped-calls 3 --out "$OUT/sustained-t2i-1024-$1.json" | grep -E "^\| (sustained|gapped)|applied"
}
bash tools/gpu_session.sh py -c "import torch._inductor.config as c; print('inductor triton.enable_pdl:', getattr(c.triton, 'enable_pdl', 'absent'))"
bound 1 edit-512 t2i-1024 edit-1024
step default-1
TORCHINDUCTOR_ENABLE_PDL=1 FLUX_CACHE_DIR=/tmp/flux-cache-pdl TORCHINDUCTOR_CACHE_DIR=/tmp/inductor-pdl step pdl-1
step default-2
bound 2 t2i-1024
stamp done
