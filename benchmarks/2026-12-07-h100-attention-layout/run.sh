#!/usr/bin/env bash
# The attention output's layout, A/B in one machine session, interleaved (t2i-1024 by default):
#   [ROUNDS="1 2"] [TIERS="exact fp8"] [PROFILE=1] bash benchmarks/2026-12-07-h100-attention-layout/run.sh [workload]
# FLUX_ATTENTION_SEQ_MAJOR=0 (the default: q/k/v in (batch, heads, seq, head_dim) memory, attention through diffusers'
# cuDNN backend, its output copied for the out-projection) against =1 (seq-major memory, cuDNN on strided views, no
# copy). Each, in the order 0, 1 per round: the exact-tier step with CUDA graphs as the server runs it, 40 calls back
# to back (bench/probe_sustained_step.py), then the fp8 step (the fast tier's transformer) the same way; the switch
# is part of the compile-cache key, so each setting compiles its own graphs. Then a 3-call profile of the exact step
# with the switch on (without CUDA graphs, so that kernels are listed one by one).
set -uo pipefail
W=${1:-t2i-1024}; OUT=${OUT:-/tmp/out}
EXACT=qkv_fusion,modulation_table,compile,attention,cuda_graphs
FP8=$EXACT,low_precision
for round in ${ROUNDS:-1 2}; do
  for on in 0 1; do
    case " ${TIERS:-exact fp8} " in *" exact "*)
    FLUX_ATTENTION_SEQ_MAJOR=$on bash tools/gpu_session.sh py bench/probe_sustained_step.py --model synthetic-full \
      --workload "$W" --optimizations $EXACT --flags use_cuda_graphs=true --no-compile-vae --calls 40 --gapped-calls 3 \
      --out "$OUT/seq-major-$on-$round-exact-$W.json" | tail -4 ;; esac
    case " ${TIERS:-exact fp8} " in *" fp8 "*)
    FLUX_ATTENTION_SEQ_MAJOR=$on bash tools/gpu_session.sh py bench/probe_sustained_step.py --model synthetic-full \
      --workload "$W" --optimizations $FP8 --flags use_cuda_graphs=true use_mxfp4=true --no-compile-vae --calls 40 \
      --gapped-calls 3 --out "$OUT/seq-major-$on-$round-fp8-$W.json" | tail -4 ;; esac
  done
done
[ "${PROFILE:-1}" = 1 ] || exit 0
FLUX_ATTENTION_SEQ_MAJOR=1 bash tools/gpu_session.sh profile --model synthetic-full --workload "$W" \
  --optimizations qkv_fusion,modulation_table,compile,attention --no-compile-vae --calls 3 --top 30 | tail -45
