"""T5's relative position bias, made contiguous once, so that SDPA can use a fused kernel on the GPU.

Upstream bug (transformers 5.17; fixed by 5.23, which requirements.txt pins)
-----------------------------------------------------------------------------
`T5Attention.compute_bias` returns `embedding(buckets).permute([2, 0, 1]).unsqueeze(0)`: shape (1, heads, q, k) with
strides (.., 1, k * heads, heads). T5 passes it to SDPA as the additive mask. transformers 5.17's
`create_position_bias_mask` hands that view on unchanged, and PyTorch's fused GPU kernels require the mask's last
dimension to have stride 1 ("All fused kernels require the last dimension of the input to have stride 1 ...
Attn_mask.stride(-1): 64"). So every layer ran the math backend, which upcasts bf16 to fp32: on the H100 0.65 ms
per layer against 0.096 ms for the memory-efficient kernel on the same values (`bench/probe_t5_attention.py`,
benchmarks/2026-11-23-h100-late/t5_attention.json), ~13 ms of FLUX's 512-token T5 call. transformers 5.23 adds a
`.contiguous()` in `create_position_bias_mask`, which copies the 64 x 512 x 512 mask again in every one of the 24
layers.

The fix
-------
The encoder's first layer computes the bias and every later layer reuses it, so making `compute_bias`'s result
contiguous copies it once per call. Same values; on 5.23 the per-layer `.contiguous()` then does nothing, so the
output is bit-identical there (tests/patches/test_patches.py). Patched per model instance, not on the class.

Remove once the oldest transformers we support builds the bias contiguous (the test of `compute_bias`'s stride
without the patch starts failing then).
"""
from __future__ import annotations

import types

import torch


def _contiguous_compute_bias(self, *args, **kwargs) -> torch.Tensor:
    return type(self).compute_bias(self, *args, **kwargs).contiguous()


def apply(t5_encoder) -> int:
    """Patch every T5 attention module of `t5_encoder` that computes a relative bias. Returns how many."""
    patched = 0
    for module in t5_encoder.modules():
        if not getattr(module, "has_relative_attention_bias", False) or not hasattr(module, "compute_bias"):
            continue
        if "compute_bias" in vars(module):  # already patched
            continue
        # A bound method, not a closure: deepcopy rebinds it to the copy (a closure would keep the original's weights)
        module.compute_bias = types.MethodType(_contiguous_compute_bias, module)
        patched += 1
    return patched
