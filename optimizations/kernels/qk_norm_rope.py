"""The Triton kernel behind qk_norm_rope.py (its own module so that Triton is imported only when it is used; Triton
reads TRITON_INTERPRET when this module is imported, which the CPU tests use)."""
import triton
import triton.language as tl


@triton.jit
def _load_rows(x_img, x_txt, off_img, off_txt, m_img, m_txt, HAS_TXT: tl.constexpr):
    """(BLOCK_T, D) rows of one head: image tokens from x_img, text tokens (the first S_txt) from x_txt."""
    x = tl.load(x_img + off_img, mask=m_img, other=0.0)
    if HAS_TXT:
        x += tl.load(x_txt + off_txt, mask=m_txt, other=0.0)  # the masks are disjoint: a select, exact
    return x


@triton.jit
def _norm_rope(x_img, x_txt, w_img_ptr, w_txt_ptr, off_img, off_txt, m_img, m_txt, is_txt, d, cos_e, cos_o, sin_e,
               sin_o, eps, BLOCK_T: tl.constexpr, D: tl.constexpr, HAS_TXT: tl.constexpr):
    dt = x_img.dtype.element_ty  # the model's dtype: bf16 on GPU, fp32 for the tiny model on CPU
    x = _load_rows(x_img, x_txt, off_img, off_txt, m_img, m_txt, HAS_TXT).to(tl.float32)
    w = tl.load(w_img_ptr + d).to(tl.float32)[None, :]
    if HAS_TXT:
        w = tl.where(is_txt[:, None], tl.load(w_txt_ptr + d).to(tl.float32)[None, :], w)
    # eps as fp32: inductor passes Python floats to user kernels as fp64, which made this math fp64 in the compiled
    # model (found when the fp8 norm kernel, which casts to fp8, failed to compile that way)
    rstd = 1.0 / tl.sqrt(tl.sum(x * x, axis=1) / D + tl.cast(eps, tl.float32))
    # torch.nn.RMSNorm (FluxAttention's): fp32 math, one rounding to dtype
    y = (x * rstd[:, None] * w).to(dt).to(tl.float32)
    # RoPE on interleaved pairs (x[2i], x[2i+1]), as diffusers' apply_rotary_emb: fp32 math, one rounding
    ye, yo = tl.split(tl.reshape(y, (BLOCK_T, D // 2, 2)))
    out = tl.join(ye * cos_e - yo * sin_e, yo * cos_o + ye * sin_o)
    return tl.reshape(out, (BLOCK_T, D)).to(dt)


@triton.jit
def qk_norm_rope_kernel(q_img, k_img, v_img, q_txt, k_txt, v_txt, wq_img, wk_img, wq_txt, wk_txt, cos_ptr, sin_ptr,
                        q_out, k_out, v_out, S, S_txt, img_bs, img_rs, txt_bs, txt_rs, out_bs, out_ts, out_hs,
                        eps, D: tl.constexpr, BLOCK_T: tl.constexpr, HAS_TXT: tl.constexpr):
    pid_t, h, b = tl.program_id(0), tl.program_id(1), tl.program_id(2)
    t = pid_t * BLOCK_T + tl.arange(0, BLOCK_T)  # token in the concatenated [text, image] sequence
    d = tl.arange(0, D)
    t_ok = t < S
    is_txt = t < S_txt
    m_img = (t_ok & (t >= S_txt))[:, None]
    m_txt = (t_ok & is_txt)[:, None]
    off_img = (b * img_bs + (t - S_txt) * img_rs)[:, None] + h * D + d[None, :]  # text rows are masked off
    off_txt = (b * txt_bs + t * txt_rs)[:, None] + h * D + d[None, :]
    cs = t[:, None] * D + d[None, :]
    cos_e, cos_o = tl.split(tl.reshape(tl.load(cos_ptr + cs, mask=t_ok[:, None], other=0.0), (BLOCK_T, D // 2, 2)))
    sin_e, sin_o = tl.split(tl.reshape(tl.load(sin_ptr + cs, mask=t_ok[:, None], other=0.0), (BLOCK_T, D // 2, 2)))
    out = (b * out_bs + h * out_hs + t * out_ts)[:, None] + d[None, :]  # the launch's layout; head_dim stride 1
    m_out = t_ok[:, None]
    q = _norm_rope(q_img, q_txt, wq_img, wq_txt, off_img, off_txt, m_img, m_txt, is_txt, d, cos_e, cos_o, sin_e,
                   sin_o, eps, BLOCK_T, D, HAS_TXT)
    tl.store(q_out + out, q, mask=m_out)
    k = _norm_rope(k_img, k_txt, wk_img, wk_txt, off_img, off_txt, m_img, m_txt, is_txt, d, cos_e, cos_o, sin_e,
                   sin_o, eps, BLOCK_T, D, HAS_TXT)
    tl.store(k_out + out, k, mask=m_out)
    tl.store(v_out + out, _load_rows(v_img, v_txt, off_img, off_txt, m_img, m_txt, HAS_TXT), mask=m_out)
