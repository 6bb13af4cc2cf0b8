"""para-attn 0.3.38's context-parallel attention rejects the `enable_gqa` keyword that diffusers 0.42.1 passes to SDPA.

The bug: para-attn's `UnifiedAttnMode` (a TorchFunctionMode) catches every `F.scaled_dot_product_attention` call and
hands its keyword arguments to `ulysses_attn_func` / `ring_attn_func`, whose signatures predate SDPA's `enable_gqa`
(torch 2.5). diffusers 0.42.1's native and cuDNN attention backends always pass it (`enable_gqa=False` for FLUX), so
every attention call under context parallelism fails: "ulysses_attn_func() got an unexpected keyword argument
'enable_gqa'".
The fix: wrap the two module-level functions `UnifiedAttnMode` calls so that `enable_gqa=False` (SDPA's default, what
FLUX passes) is dropped. `enable_gqa=True` (fewer key / value heads than query heads) raises NotImplementedError: the
all-to-all splits query and key / value heads alike, so grouped-query attention is not supported there.
The test (tests/patches/test_para_attn_enable_gqa.py) fails without it; when para-attn accepts the keyword, the
check of upstream's behaviour there fails and this patch can go.
"""
from __future__ import annotations

import functools

PATCHED = "_flux_enable_gqa_patched"


def _dropping_enable_gqa(fn):
    @functools.wraps(fn)
    def wrapper(*args, enable_gqa: bool = False, **kwargs):
        if enable_gqa:
            raise NotImplementedError(f"{fn.__name__}: enable_gqa=True (grouped-query attention) is not supported "
                                      "under context parallelism")
        return fn(*args, **kwargs)

    setattr(wrapper, PATCHED, True)
    wrapper.original = fn
    return wrapper


def apply() -> int:
    """Patch para-attn's attention functions in place (idempotent). Returns how many were patched now."""
    from para_attn import para_attn_interface as pai

    n = 0
    for name in ("ulysses_attn_func", "ring_attn_func"):
        fn = getattr(pai, name)
        if not getattr(fn, PATCHED, False):
            setattr(pai, name, _dropping_enable_gqa(fn))
            n += 1
    return n
