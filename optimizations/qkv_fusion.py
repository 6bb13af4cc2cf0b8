"""QKV fusion: one GEMM for the query/key/value projections instead of three (transformer and VAE).

Load-time and always on once prepared: fusion concatenates weights in place. Numerically it only reorders
float work (tested against the unfused model on `tiny`). diffusers keeps the unfused q/k/v projections next to
the fused ones (~2.1 B parameters on the full transformer); once fused they are never called (the attention
processor takes the fused path), so we free them rather than carry them, and into the fp8 copy.
"""
from __future__ import annotations

from optimizations.base import Components, EXACT, Optimization, linears_uninitialised


class QKVFusion(Optimization):
    name, flag, load_time = "qkv_fusion", "use_qkv_fusion", True
    toggle = False

    def prepare(self, components: Components) -> str:
        if "fp8" in components.variants:
            raise RuntimeError("QKV fusion must be prepared before the low-precision copy is made")
        transformer = components.variants[EXACT]
        with linears_uninitialised():  # every fused weight is copied in (base.linears_uninitialised)
            transformer.fuse_qkv_projections()
            components.pipe.vae.fuse_qkv_projections()
        freed = drop_unfused_projections(transformer)
        return (f"transformer and VAE attention projections fused; {freed / 1e6:.1f} M unfused transformer "
                "parameters freed (load-time, always on)")


UNFUSED = ("to_q", "to_k", "to_v", "add_q_proj", "add_k_proj", "add_v_proj")


def drop_unfused_projections(transformer) -> int:
    """Delete the q/k/v linears that fusion superseded; returns how many parameters that freed."""
    freed = 0
    for module in transformer.modules():
        if not getattr(module, "fused_projections", False):
            continue
        for name in UNFUSED:
            sub = module._modules.get(name)
            if sub is not None:
                freed += sum(p.numel() for p in sub.parameters())
                del module._modules[name]
    return freed
