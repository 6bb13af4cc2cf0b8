"""The fp8 row-quantisation kernels' layouts before the chunked ones in production: each row padded to the next
power of two (3,072 -> 4,096 lanes for the norm, 12,288 -> 16,384 for the GELU). Kept here, out of the production
modules, so bench/bench_row_quant.py and bench/bench_norm_quant.py can time the layouts against each other and the
tests can check both compute the same bits.
"""
from __future__ import annotations

import functools

import triton
import triton.language as tl

from optimizations.fp8.norm_quant import _next_power_of_2, _norm_operands
from optimizations.kernels.fp8_row_quant import _quantize_store
from optimizations.qk_norm_rope import triton_cdiv

# The padded norm kernel's rows per program and warps (the configuration in use before the chunked layout).
PADDED_NORM_ROWS, PADDED_NORM_WARPS = 1, 4


@triton.jit
def norm_modulate_quant_padded_kernel(x_ptr, t_ptr, d_ptr, mod_ptr, q_ptr, s_ptr, h_ptr, S, S_head, K, x_bs, x_rs,
                                      t_bs, t_rs, d_bs, d_rs, mod_bs, shift_at, scale_at, gate_at, eps,
                                      BLOCK_K: tl.constexpr, ROWS: tl.constexpr, HAS_TAIL: tl.constexpr,
                                      HAS_DELTA: tl.constexpr):
    """What norm_modulate_quant_kernel computes, for ROWS rows of one batch element per program, each row padded to
    BLOCK_K lanes (a power of two)."""
    pid, b = tl.program_id(0), tl.program_id(1)
    r = pid * ROWS + tl.arange(0, ROWS)
    c = tl.arange(0, BLOCK_K)
    r_ok = r < S
    c_ok = c < K
    m = r_ok[:, None] & c_ok[None, :]
    if HAS_TAIL:  # rows [0, S_head) from x, the rest from the tail (the single blocks' text + image sequence)
        in_head = (r < S_head)[:, None]
        x = tl.load(x_ptr + b * x_bs + r[:, None] * x_rs + c[None, :], mask=m & in_head, other=0.0)
        x += tl.load(t_ptr + b * t_bs + (r - S_head)[:, None] * t_rs + c[None, :], mask=m & ~in_head, other=0.0)
    else:
        x = tl.load(x_ptr + b * x_bs + r[:, None] * x_rs + c[None, :], mask=m, other=0.0)
    out = (b * S + r)[:, None] * K + c[None, :]
    x = x.to(tl.float32)
    if HAS_DELTA:  # the residual update before the norm: h = x + gate * delta, one rounding to the model's dtype
        d = tl.load(d_ptr + b * d_bs + r[:, None] * d_rs + c[None, :], mask=m, other=0.0).to(tl.float32)
        g = tl.load(mod_ptr + b * mod_bs + gate_at + c, mask=c_ok, other=0.0).to(tl.float32)
        h = (x + g[None, :] * d).to(h_ptr.dtype.element_ty)
        tl.store(h_ptr + out, h, mask=m)
        x = h.to(tl.float32)
    mean = tl.sum(x, axis=1) / K
    xc = tl.where(m, x - mean[:, None], 0.0)
    # eps as fp32: inductor passes Python floats to user kernels as fp64, which would turn the math below into fp64
    # (and fp64 -> fp8 has no conversion: the compile fails)
    rstd = 1.0 / tl.sqrt(tl.sum(xc * xc, axis=1) / K + tl.cast(eps, tl.float32))
    sc = tl.load(mod_ptr + b * mod_bs + scale_at + c, mask=c_ok, other=0.0).to(tl.float32)
    sh = tl.load(mod_ptr + b * mod_bs + shift_at + c, mask=c_ok, other=0.0).to(tl.float32)
    y = tl.where(m, xc * rstd[:, None] * (1.0 + sc[None, :]) + sh[None, :], 0.0)
    _quantize_store(y, m, q_ptr + out, s_ptr + b * S + r, r_ok)


def launch_norm_modulate_quant_padded(kernel, x, tail, delta, mod, shift_chunk: int, scale_chunk: int,
                                      gate_chunk: int, eps: float, rows: int = PADDED_NORM_ROWS,
                                      num_warps: int = PADDED_NORM_WARPS):
    """launch_norm_modulate_quant for the padded layout before it (`norm_modulate_quant_padded_kernel`): `rows` rows
    per program, each padded to a power of two. Same arguments and results; for the benchmark tools."""
    outputs, args = _norm_operands(x, tail, delta, mod, shift_chunk, scale_chunk, gate_chunk, eps)
    b, s, k = outputs[0].shape
    kernel[(triton_cdiv(s, rows), b)](*args, BLOCK_K=_next_power_of_2(k), ROWS=rows, HAS_TAIL=tail is not None,
                                      HAS_DELTA=delta is not None, num_warps=num_warps)
    return outputs


@functools.cache
def _gelu_quant_rows_kernel():
    """The Triton kernel before the chunked one, kept for bench/bench_row_quant.py (its "padded, before" layout): one
    program per row, the whole row in registers padded to BLOCK lanes (a power of two: 12,288 becomes 16,384).
    Computes what the chunked kernel computes, bit for bit."""
    import triton
    import triton.language as tl

    @triton.jit
    def gelu_quant_rows(x_ptr, q_ptr, s_ptr, K, stride_x, stride_q, BLOCK: tl.constexpr):
        row = tl.program_id(0)
        offs = tl.arange(0, BLOCK)
        mask = offs < K
        x = tl.load(x_ptr + row * stride_x + offs, mask=mask, other=0.0).to(tl.float32)
        # tanh-GELU: 0.5 x (1 + tanh(u)) == x * sigmoid(2u), u = sqrt(2/pi) (x + 0.044715 x^3). Literals, not the
        # module's constants: Triton does not read Python globals that are not constexpr.
        y = x * tl.sigmoid(2.0 * 0.7978845608028654 * (x + 0.044715 * x * x * x))
        scale = tl.maximum(tl.max(tl.abs(y), axis=0), 1e-12) / 448.0
        q = tl.clamp(y * (1.0 / scale), -448.0, 448.0)
        tl.store(q_ptr + row * stride_q + offs, q.to(tl.float8e4nv), mask=mask)
        tl.store(s_ptr + row, scale)

    return gelu_quant_rows
