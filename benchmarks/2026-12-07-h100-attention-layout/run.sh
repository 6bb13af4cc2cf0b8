#!/usr/bin/env bash
# The attention output's layout, A/B in one machine session, interleaved (t2i-1024 by default):
#   BASE=/path/to/tree-before [ROUNDS="1 2"] [PROFILE=1] bash benchmarks/2026-12-07-h100-attention-layout/run.sh [workload]
# BASE is a copy of the repository before the change (the q/k/v kernel writing (batch, heads, seq, head_dim) memory,
# attention through diffusers' cuDNN backend). Each tree runs, twice in the order base, new, base, new:
# the exact-tier step with CUDA graphs as the server runs it, 40 calls back to back (bench/probe_sustained_step.py),
# and the fp8 step (the fast tier's transformer) the same way, each tree with its own compile caches. Then a 3-call
# profile of the new tree's exact step (without CUDA graphs, so that kernels are listed one by one).
set -uo pipefail
W=${1:-t2i-1024}; OUT=${OUT:-/tmp/out}; NEW=$PWD
EXACT=qkv_fusion,modulation_table,compile,attention,cuda_graphs
FP8=$EXACT,low_precision
for round in ${ROUNDS:-1 2}; do
  for tree in base new; do
    dir=$NEW; [ "$tree" = base ] && dir=$BASE
    export FLUX_CACHE_DIR=/tmp/flux-cache-$tree TORCHINDUCTOR_CACHE_DIR=/tmp/inductor-$tree  # no shared caches
    (cd "$dir" && bash tools/gpu_session.sh py bench/probe_sustained_step.py --model synthetic-full --workload "$W" \
      --optimizations $EXACT --flags use_cuda_graphs=true --no-compile-vae --calls 40 --gapped-calls 3 \
      --out "$OUT/$tree-$round-exact-$W.json" | tail -4)
    (cd "$dir" && bash tools/gpu_session.sh py bench/probe_sustained_step.py --model synthetic-full --workload "$W" \
      --optimizations $FP8 --flags use_cuda_graphs=true use_mxfp4=true --no-compile-vae --calls 40 --gapped-calls 3 \
      --out "$OUT/$tree-$round-fp8-$W.json" | tail -4)
  done
done
[ "${PROFILE:-1}" = 1 ] || exit 0
FLUX_CACHE_DIR=/tmp/flux-cache-new TORCHINDUCTOR_CACHE_DIR=/tmp/inductor-new bash tools/gpu_session.sh profile --model synthetic-full --workload "$W" \
  --optimizations qkv_fusion,modulation_table,compile,attention --no-compile-vae --calls 3 --top 30 | tail -45
