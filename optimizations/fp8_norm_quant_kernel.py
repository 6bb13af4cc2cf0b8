"""The Triton kernels behind fp8_norm_quant.py (their own module so that Triton is imported only when they are used;
Triton reads TRITON_INTERPRET when this module is imported, which the CPU tests use).

Both end in the row-wise fp8 quantisation of fp8_linear.quantize_rows: scale = max(row amax, 1e-12) / 448,
fp8 = clamp(value * (1 / scale), -448, 448), computed in fp32 from values that never leave registers."""
import triton
import triton.language as tl


@triton.jit
def _quantize_store(y, m, q_ptrs, s_ptrs, s_mask):
    """Row-wise fp8 of y (ROWS, COLS) fp32, masked lanes already 0: the fp8 rows and one scale per row."""
    scale = tl.maximum(tl.max(tl.abs(y), axis=1), 1e-12) / 448.0
    q = tl.clamp(y * (1.0 / scale)[:, None], -448.0, 448.0)
    tl.store(q_ptrs, q.to(tl.float8e4nv), mask=m)
    tl.store(s_ptrs, scale, mask=s_mask)


@triton.jit
def norm_modulate_quant_kernel(x_ptr, t_ptr, d_ptr, mod_ptr, q_ptr, s_ptr, h_ptr, S, S_head, K, x_bs, x_rs, t_bs,
                               t_rs, d_bs, d_rs, mod_bs, shift_at, scale_at, gate_at, eps,
                               BLOCK_K: tl.constexpr, ROWS: tl.constexpr, HAS_TAIL: tl.constexpr,
                               HAS_DELTA: tl.constexpr):
    """ROWS rows of one batch element: [x; tail] rows (+ gate * delta, written to h), LayerNorm without affine,
    * (1 + scale) + shift, row-wise fp8. shift, scale and gate are K-wide columns of the AdaLN output `mod` starting
    at *_at. Outputs are contiguous (batch, S, K)."""
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


@triton.jit
def quantize_heads_kernel(o_ptr, q_ptr, s_ptr, S, H, o_bs, o_ss, o_hs,
                          D: tl.constexpr, HP: tl.constexpr, BLOCK_T: tl.constexpr):
    """BLOCK_T tokens of one batch element of an attention output o (batch, S, H, D) in any memory layout (cuDNN's
    is (batch, H, S, D)): each token's H * D features as one row, row-wise fp8, written as contiguous rows."""
    pid, b = tl.program_id(0), tl.program_id(1)
    t = pid * BLOCK_T + tl.arange(0, BLOCK_T)
    c = tl.arange(0, HP * D)  # HP = H rounded up to a power of two; the extra heads are masked off
    head, d = c // D, c % D
    t_ok = t < S
    m = t_ok[:, None] & (head < H)[None, :]
    x = tl.load(o_ptr + b * o_bs + t[:, None] * o_ss + (head * o_hs + d)[None, :], mask=m, other=0.0)
    _quantize_store(x.to(tl.float32), m, q_ptr + (b * S + t)[:, None] * (H * D) + c[None, :], s_ptr + b * S + t, t_ok)
