"""The Triton kernels behind fp8/norm_quant.py, and fp8/gelu_quant.py's GELU kernel, which shares their row-chunk
helpers (their own module so that Triton is imported only when they are used; Triton reads TRITON_INTERPRET when
this module is imported, which the CPU tests use).

All end in the row-wise fp8 quantisation of fp8_linear.quantize_rows: scale = max(row amax, 1e-12) / 448,
fp8 = clamp(value * (1 / scale), -448, 448), computed in fp32 from values that never leave registers.

The two row kernels in use, `norm_modulate_quant_kernel` and `gelu_quant_chunks_kernel`, hold one row per program
as NCHUNK (at most 3) unpadded CHUNK-wide pieces (fp8_norm_quant.row_chunks: 3,072 = 3 x 1,024,
12,288 = 3 x 4,096). The layouts before it (rows padded to a power of two) live in bench/row_quant_padded.py, which
bench/bench_row_quant.py times against these (benchmarks/2026-11-23-h100-power, "The
fp8 row-quantisation kernels: other layouts")."""
import triton
import triton.language as tl


@triton.jit
def _quantize_store(y, m, q_ptrs, s_ptrs, s_mask):
    """Row-wise fp8 of y (ROWS, COLS) fp32, masked lanes already 0: the fp8 rows and one scale per row."""
    scale = tl.maximum(tl.max(tl.abs(y), axis=1), 1e-12) / 448.0
    q = tl.clamp(y * (1.0 / scale)[:, None], -448.0, 448.0)
    tl.store(q_ptrs, q.to(tl.float8e4nv), mask=m)
    tl.store(s_ptrs, scale, mask=s_mask)


# ---- the chunked layout: one row per program, the row as NCHUNK unpadded CHUNK-wide pieces --------------------------
# Each helper handles chunk i (a constexpr) of a row; without EVEN (K not a multiple of CHUNK) the lanes past K are
# masked off, with it there are no masks at all (the full-size model: K = 3,072 = 3 x 1,024).
@triton.jit
def _chunk_lanes(i: tl.constexpr, CHUNK: tl.constexpr):
    return i * CHUNK + tl.arange(0, CHUNK)


@triton.jit
def _load_chunk(row_ptr, i: tl.constexpr, K, CHUNK: tl.constexpr, EVEN: tl.constexpr):
    """Chunk i of a row as fp32; 0 past K."""
    c = _chunk_lanes(i, CHUNK)
    if EVEN:
        v = tl.load(row_ptr + c)
    else:
        v = tl.load(row_ptr + c, mask=c < K, other=0.0)
    return v.to(tl.float32)


@triton.jit
def _store_chunk(row_ptr, v, i: tl.constexpr, K, CHUNK: tl.constexpr, EVEN: tl.constexpr):
    c = _chunk_lanes(i, CHUNK)
    if EVEN:
        tl.store(row_ptr + c, v)
    else:
        tl.store(row_ptr + c, v, mask=c < K)


@triton.jit
def _zero_past_k(v, i: tl.constexpr, K, CHUNK: tl.constexpr, EVEN: tl.constexpr):
    """v with the lanes past K set to 0 (nothing to do when K fills every chunk)."""
    if not EVEN:
        v = tl.where(_chunk_lanes(i, CHUNK) < K, v, 0.0)
    return v


@triton.jit
def _residual_chunk(x, d, g, h_row, i: tl.constexpr, K, CHUNK: tl.constexpr, EVEN: tl.constexpr):
    """h = x + gate * delta for chunk i, rounded once to h's dtype and stored; returned as the rounded value in fp32
    (the norm reads the residual stream the block carries on with)."""
    h = (x + g * d).to(h_row.dtype.element_ty)
    _store_chunk(h_row, h, i, K, CHUNK, EVEN)
    return h.to(tl.float32)


@triton.jit
def _modulate_chunk(xc, rstd, scale_ptr, shift_ptr, i: tl.constexpr, K, CHUNK: tl.constexpr, EVEN: tl.constexpr):
    """Centred chunk i * rstd * (1 + scale) + shift. Past K the centred values, scale and shift are all 0, so the
    result is 0 there and the row amax only sees the row."""
    sc = _load_chunk(scale_ptr, i, K, CHUNK, EVEN)
    sh = _load_chunk(shift_ptr, i, K, CHUNK, EVEN)
    return xc * rstd * (1.0 + sc) + sh


@triton.jit
def _store_fp8_chunk(q_row, y, inv_scale, i: tl.constexpr, K, CHUNK: tl.constexpr, EVEN: tl.constexpr):
    _store_chunk(q_row, tl.clamp(y * inv_scale, -448.0, 448.0).to(tl.float8e4nv), i, K, CHUNK, EVEN)


@triton.jit
def norm_modulate_quant_kernel(x_ptr, t_ptr, d_ptr, mod_ptr, q_ptr, s_ptr, h_ptr, S, S_head, K, x_bs, x_rs, t_bs,
                               t_rs, d_bs, d_rs, mod_bs, shift_at, scale_at, gate_at, eps,
                               CHUNK: tl.constexpr, NCHUNK: tl.constexpr, EVEN: tl.constexpr,
                               HAS_TAIL: tl.constexpr, HAS_DELTA: tl.constexpr):
    """Row program_id(0) of batch element program_id(1): the [x; tail] row (+ gate * delta, written to h),
    LayerNorm without affine, * (1 + scale) + shift, row-wise fp8. shift, scale and gate are K-wide columns of the
    AdaLN output `mod` starting at *_at. Outputs are contiguous (batch, S, K). The row is held as NCHUNK (1 to 3)
    CHUNK-wide pieces, x0..x2 / y0..y2, each in registers from load to store."""
    r, b = tl.program_id(0), tl.program_id(1)
    x_row = x_ptr + b * x_bs + r * x_rs
    if HAS_TAIL:  # rows [0, S_head) from x, the rest from the tail (the single blocks' text + image sequence)
        if r >= S_head:
            x_row = t_ptr + b * t_bs + (r - S_head) * t_rs
    d_row = d_ptr + b * d_bs + r * d_rs
    mod_row = mod_ptr + b * mod_bs
    out = (b * S + r) * K  # q and h rows
    # Each pass issues all its loads before its first reduction: a reduction across warps waits at a barrier, and
    # loads issued after it would wait for memory a second and third time (on an H100, with each chunk's sum right
    # after its load, this kernel took about as long as the padded one).
    # pass 1: the input chunks (with HAS_DELTA the residual update, written to h), then their sum
    x0 = _load_chunk(x_row, 0, K, CHUNK, EVEN)
    if NCHUNK > 1:
        x1 = _load_chunk(x_row, 1, K, CHUNK, EVEN)
    if NCHUNK > 2:
        x2 = _load_chunk(x_row, 2, K, CHUNK, EVEN)
    if HAS_DELTA:  # delta and gate loaded before the first store of h: the compiler keeps a load after a store
        # that may alias it, so a load after the store would wait for memory once more
        d0, g0 = _load_chunk(d_row, 0, K, CHUNK, EVEN), _load_chunk(mod_row + gate_at, 0, K, CHUNK, EVEN)
        if NCHUNK > 1:
            d1, g1 = _load_chunk(d_row, 1, K, CHUNK, EVEN), _load_chunk(mod_row + gate_at, 1, K, CHUNK, EVEN)
        if NCHUNK > 2:
            d2, g2 = _load_chunk(d_row, 2, K, CHUNK, EVEN), _load_chunk(mod_row + gate_at, 2, K, CHUNK, EVEN)
        x0 = _residual_chunk(x0, d0, g0, h_ptr + out, 0, K, CHUNK, EVEN)
        if NCHUNK > 1:
            x1 = _residual_chunk(x1, d1, g1, h_ptr + out, 1, K, CHUNK, EVEN)
        if NCHUNK > 2:
            x2 = _residual_chunk(x2, d2, g2, h_ptr + out, 2, K, CHUNK, EVEN)
    total = tl.sum(x0, axis=0)
    if NCHUNK > 1:
        total += tl.sum(x1, axis=0)
    if NCHUNK > 2:
        total += tl.sum(x2, axis=0)
    mean = total / K
    # pass 2: centred values (0 past K) and the variance, as the padded kernel computes it
    x0 = _zero_past_k(x0 - mean, 0, K, CHUNK, EVEN)
    sq = tl.sum(x0 * x0, axis=0)
    if NCHUNK > 1:
        x1 = _zero_past_k(x1 - mean, 1, K, CHUNK, EVEN)
        sq += tl.sum(x1 * x1, axis=0)
    if NCHUNK > 2:
        x2 = _zero_past_k(x2 - mean, 2, K, CHUNK, EVEN)
        sq += tl.sum(x2 * x2, axis=0)
    # eps as fp32: inductor passes Python floats to user kernels as fp64, which would turn the math below into fp64
    # (and fp64 -> fp8 has no conversion: the compile fails)
    rstd = 1.0 / tl.sqrt(sq / K + tl.cast(eps, tl.float32))
    # pass 3: modulation (loads scale and shift), then the row amax
    y0 = _modulate_chunk(x0, rstd, mod_row + scale_at, mod_row + shift_at, 0, K, CHUNK, EVEN)
    if NCHUNK > 1:
        y1 = _modulate_chunk(x1, rstd, mod_row + scale_at, mod_row + shift_at, 1, K, CHUNK, EVEN)
    if NCHUNK > 2:
        y2 = _modulate_chunk(x2, rstd, mod_row + scale_at, mod_row + shift_at, 2, K, CHUNK, EVEN)
    amax = tl.max(tl.abs(y0), axis=0)
    if NCHUNK > 1:
        amax = tl.maximum(amax, tl.max(tl.abs(y1), axis=0))
    if NCHUNK > 2:
        amax = tl.maximum(amax, tl.max(tl.abs(y2), axis=0))
    # the row-wise fp8 of _quantize_store, chunk by chunk
    scale = tl.maximum(amax, 1e-12) / 448.0
    inv_scale = 1.0 / scale
    _store_fp8_chunk(q_ptr + out, y0, inv_scale, 0, K, CHUNK, EVEN)
    if NCHUNK > 1:
        _store_fp8_chunk(q_ptr + out, y1, inv_scale, 1, K, CHUNK, EVEN)
    if NCHUNK > 2:
        _store_fp8_chunk(q_ptr + out, y2, inv_scale, 2, K, CHUNK, EVEN)
    tl.store(s_ptr + b * S + r, scale)


@triton.jit
def _gelu_chunk(x_row, i: tl.constexpr, K, CHUNK: tl.constexpr, EVEN: tl.constexpr):
    """tanh-GELU of chunk i of a row in fp32; 0 past K (GELU(0) = 0, so the row amax only sees the row).
    0.5 x (1 + tanh(u)) == x * sigmoid(2u), u = sqrt(2/pi) (x + 0.044715 x^3): the padded kernel's expression, as
    literals (Triton does not read Python globals that are not constexpr)."""
    x = _load_chunk(x_row, i, K, CHUNK, EVEN)
    return x * tl.sigmoid(2.0 * 0.7978845608028654 * (x + 0.044715 * x * x * x))


@triton.jit
def gelu_quant_chunks_kernel(x_ptr, q_ptr, s_ptr, K, stride_x, stride_q, CHUNK: tl.constexpr, NCHUNK: tl.constexpr,
                             EVEN: tl.constexpr):
    """fp8/gelu_quant.py's kernel: row program_id(0) of x (M, K), tanh-GELU, row-wise fp8 into q (M, K) and its
    scale into s (M, 1). The row is held as NCHUNK (1 to 3) CHUNK-wide pieces, y0..y2, in registers from load to
    store. The same fp32 operations as the padded kernel (bench/row_quant_padded.py), and the amax is a
    maximum, exact in any order: the same bits."""
    row = tl.program_id(0)
    x_row, q_row = x_ptr + row * stride_x, q_ptr + row * stride_q
    y0 = _gelu_chunk(x_row, 0, K, CHUNK, EVEN)  # all the loads, then the reductions (see the norm kernel)
    if NCHUNK > 1:
        y1 = _gelu_chunk(x_row, 1, K, CHUNK, EVEN)
    if NCHUNK > 2:
        y2 = _gelu_chunk(x_row, 2, K, CHUNK, EVEN)
    amax = tl.max(tl.abs(y0), axis=0)
    if NCHUNK > 1:
        amax = tl.maximum(amax, tl.max(tl.abs(y1), axis=0))
    if NCHUNK > 2:
        amax = tl.maximum(amax, tl.max(tl.abs(y2), axis=0))
    scale = tl.maximum(amax, 1e-12) / 448.0
    inv_scale = 1.0 / scale
    _store_fp8_chunk(q_row, y0, inv_scale, 0, K, CHUNK, EVEN)
    if NCHUNK > 1:
        _store_fp8_chunk(q_row, y1, inv_scale, 1, K, CHUNK, EVEN)
    if NCHUNK > 2:
        _store_fp8_chunk(q_row, y2, inv_scale, 2, K, CHUNK, EVEN)
    tl.store(s_ptr + row, scale)


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
