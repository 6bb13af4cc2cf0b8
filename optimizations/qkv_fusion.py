"""QKV fusion: one GEMM for the query/key/value projections instead of three (transformer and VAE).

Load-time and always on once prepared: fusion concatenates weights in place. Numerically it only reorders
float work (tested against the unfused model on `tiny`). On the transformer, diffusers keeps the unfused
projections too, so fusion costs ~2.1 B extra parameters of memory on the full model.
"""
from __future__ import annotations

from .base import Optimization


class QKVFusion(Optimization):
    name, flag, load_time = "qkv_fusion", "use_qkv_fusion", True
    toggle = False

    def prepare(self, service) -> str:
        if service.fp8_prepared:
            raise RuntimeError("QKV fusion must be prepared before the low-precision copy is made")
        service.transformer_variants["bf16"].fuse_qkv_projections()
        service.pipe.vae.fuse_qkv_projections()
        return "transformer and VAE attention projections fused (load-time, always on)"
