"""Row-wise fp8 quantisation of a weight in one pass: the LoRA fp8 merge's re-quantisation (kontext_server/lora/
fp8_merge.py), bit for bit what built the fp8 copy.

Why a kernel: the merge re-quantises the covered weights of the fp8 copy on every change of adapters. In torch ops
(torchao's `_choose_scale_float8` + `_quantize_affine_float8`) that is an abs, an amax, a cast to fp32, a division, a
clamp and a cast, each a pass over the weight, several in fp32; here each row is read once (bf16) and written once
(fp8, plus its scale): one program per row, the row held in registers.

Two roundings, chosen by SCALE_IN_WEIGHT_DTYPE:
- True, torchao's (`Float8Tensor.from_hp` with PerRow on its torch path): scale = amax / 448 rounded to the weight's
  dtype, then to fp32; fp8 = clamp(w / scale, -448, 448);
- False, this repository's `quantize_rows`: scale = max(amax, 1e-12) / 448 in fp32; fp8 = clamp(w * (1 / scale)).
Every division is IEEE round-to-nearest (`div_rn`), as torch's are; the casts round to nearest even, as torch's do.
The merge uses this kernel for a linear only where it reproduces the linear's stored bytes and scales exactly
(checked at install), so a difference in rounding can only make it unused, never wrong.
Limits: 2-D, rows contiguous, K <= 16,384 (the row in one block).
"""
from __future__ import annotations

import torch
import triton
import triton.language as tl

MAX_K = 16384


@triton.jit
def weight_rows_fp8_kernel(w_ptr, q_ptr, s_ptr, K, w_stride, q_stride, BLOCK: tl.constexpr,
                           SCALE_IN_WEIGHT_DTYPE: tl.constexpr):
    row = tl.program_id(0)
    c = tl.arange(0, BLOCK)
    m = c < K
    w = tl.load(w_ptr + row * w_stride + c, mask=m, other=0.0).to(tl.float32)
    amax = tl.max(tl.abs(w), axis=0)
    if SCALE_IN_WEIGHT_DTYPE:
        scale = tl.math.div_rn(amax, 448.0).to(w_ptr.dtype.element_ty).to(tl.float32)
        q = tl.math.div_rn(w, tl.zeros_like(w) + scale)
    else:
        scale = tl.math.div_rn(tl.maximum(amax, 1e-12), 448.0)
        q = w * tl.math.div_rn(1.0, scale)
    q = tl.clamp(q, -448.0, 448.0)
    tl.store(q_ptr + row * q_stride + c, q.to(tl.float8e4nv), mask=m)
    tl.store(s_ptr + row, scale)


def quantize_weight_rows(w: torch.Tensor, scale_in_weight_dtype: bool,
                         out: tuple[torch.Tensor, torch.Tensor] | None = None) -> tuple[torch.Tensor, torch.Tensor]:
    """(fp8 e4m3 rows (N, K), fp32 scales (N, 1)) of a 2-D weight (see the module docstring). `out`: where to write
    them instead (rows with unit column stride; N scales, contiguous, in any shape), e.g. a linear's own storage."""
    if w.dim() != 2 or w.stride(1) != 1:
        raise ValueError(f"a 2-D weight with contiguous rows, not shape {tuple(w.shape)} strides {w.stride()}")
    n, k = w.shape
    if k > MAX_K:
        raise ValueError(f"rows of {k} values: at most {MAX_K}")
    if out is None:
        q = torch.empty(n, k, dtype=torch.float8_e4m3fn, device=w.device)
        s = torch.empty(n, 1, dtype=torch.float32, device=w.device)
    else:
        q, s = out
        if q.shape != w.shape or q.dtype != torch.float8_e4m3fn or q.stride(1) != 1 or s.numel() != n \
                or s.dtype != torch.float32 or not s.is_contiguous():
            raise ValueError("out: fp8 rows of the weight's shape with unit column stride, and N contiguous fp32 "
                             "scales")
    block = triton.next_power_of_2(k)
    weight_rows_fp8_kernel[(n,)](w, q, s, k, w.stride(0), q.stride(0), BLOCK=block,
                                 SCALE_IN_WEIGHT_DTYPE=scale_in_weight_dtype, num_warps=8 if block >= 4096 else 4)
    return q, s
