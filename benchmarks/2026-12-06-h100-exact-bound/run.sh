#!/usr/bin/env bash
# The exact tier against its kernel bound, in one process order on one machine (t2i-1024 by default):
#   bash benchmarks/2026-12-06-h100-exact-bound/run.sh [workload]
# 1. the bound: the step's GEMMs and attention alone, 40 replays back to back (bench/probe_kernel_bound.py);
# 2. the exact-tier step as stage 2 of the stage table runs it (compile, no CUDA graphs), 40 calls back to back;
# 3. the same with CUDA graphs, as the server runs an exact request (lossless optimisations prepared are on);
# 4. a 3-call profile of the exact step, by kernel kind, with the top kernels (what is neither GEMM nor attention).
set -uo pipefail
W=${1:-t2i-1024}; OUT=${OUT:-/tmp/out}
OPTS=qkv_fusion,modulation_table,compile,attention
bash tools/gpu_session.sh py bench/probe_kernel_bound.py --workload "$W" --calls 40 --out "$OUT/kernel_bound-$W.json" | tail -15
bash tools/gpu_session.sh py bench/probe_sustained_step.py --model synthetic-full --workload "$W" --optimizations $OPTS \
  --no-compile-vae --calls 40 --gapped-calls 3 --out "$OUT/sustained-$W-exact.json" | tail -12
bash tools/gpu_session.sh py bench/probe_sustained_step.py --model synthetic-full --workload "$W" \
  --optimizations $OPTS,cuda_graphs --flags use_cuda_graphs=true --no-compile-vae --calls 40 --gapped-calls 3 \
  --out "$OUT/sustained-$W-exact-graphs.json" | tail -12
bash tools/gpu_session.sh profile --model synthetic-full --workload "$W" --optimizations $OPTS --no-compile-vae \
  --calls 3 --top 30 | tail -50
