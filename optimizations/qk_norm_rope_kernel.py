"""The Triton kernel behind qk_norm_rope.py (its own module so that Triton is imported only when it is used; Triton
reads TRITON_INTERPRET when this module is imported, which the CPU tests use)."""
import triton
import triton.language as tl


@triton.jit
def _norm_rope(x_img, x_txt, w_img_ptr, w_txt_ptr, off_img, off_txt, off_img_p, off_txt_p, m_img, m_txt,
               is_txt, d, d_p, cos, sin, eps, D: tl.constexpr, HAS_TXT: tl.constexpr):
    x = tl.load(x_img + off_img, mask=m_img, other=0.0).to(tl.float32)
    xp = tl.load(x_img + off_img_p, mask=m_img, other=0.0).to(tl.float32)  # RoPE pair partner (d ^ 1)
    w = tl.load(w_img_ptr + d).to(tl.float32)[None, :]
    wp = tl.load(w_img_ptr + d_p).to(tl.float32)[None, :]
    if HAS_TXT:
        x += tl.load(x_txt + off_txt, mask=m_txt, other=0.0).to(tl.float32)
        xp += tl.load(x_txt + off_txt_p, mask=m_txt, other=0.0).to(tl.float32)
        w = tl.where(is_txt[:, None], tl.load(w_txt_ptr + d).to(tl.float32)[None, :], w)
        wp = tl.where(is_txt[:, None], tl.load(w_txt_ptr + d_p).to(tl.float32)[None, :], wp)
    dt = x_img.dtype.element_ty  # the model's dtype: bf16 on GPU, fp32 for the tiny model on CPU
    rstd = 1.0 / tl.sqrt(tl.sum(x * x, axis=1) / D + eps)
    # torch.nn.RMSNorm (FluxAttention's): fp32 math, one rounding to dtype; apply_rotary_emb: fp32 math -> dtype
    y = (x * rstd[:, None] * w).to(dt).to(tl.float32)
    yp = (xp * rstd[:, None] * wp).to(dt).to(tl.float32)
    sign = tl.where(d % 2 == 0, -1.0, 1.0)[None, :]
    return (y * cos + sign * yp * sin).to(dt)

@triton.jit
def qk_norm_rope_kernel(q_img, k_img, v_img, q_txt, k_txt, v_txt, wq_img, wk_img, wq_txt, wk_txt, cos_ptr,
                        sin_ptr, q_out, k_out, v_out, S, S_txt, H, img_bs, img_rs, txt_bs, txt_rs, eps,
                        D: tl.constexpr, BLOCK_T: tl.constexpr, HAS_TXT: tl.constexpr):
    pid_t, h, b = tl.program_id(0), tl.program_id(1), tl.program_id(2)
    t = pid_t * BLOCK_T + tl.arange(0, BLOCK_T)  # token in the concatenated [text, image] sequence
    d = tl.arange(0, D)
    d_p = d ^ 1
    t_ok = t < S
    is_txt = t < S_txt
    m_img = (t_ok & (t >= S_txt))[:, None]
    m_txt = (t_ok & is_txt)[:, None]
    row_img = (b * img_bs + (t - S_txt) * img_rs)[:, None] + h * D  # rows of text tokens are masked off
    row_txt = (b * txt_bs + t * txt_rs)[:, None] + h * D
    off_img, off_img_p = row_img + d[None, :], row_img + d_p[None, :]
    off_txt, off_txt_p = row_txt + d[None, :], row_txt + d_p[None, :]
    cs = t[:, None] * D + d[None, :]
    cos = tl.load(cos_ptr + cs, mask=t_ok[:, None], other=0.0)
    sin = tl.load(sin_ptr + cs, mask=t_ok[:, None], other=0.0)
    out = ((b * S + t) * H + h)[:, None] * D + d[None, :]
    m_out = t_ok[:, None]
    q = _norm_rope(q_img, q_txt, wq_img, wq_txt, off_img, off_txt, off_img_p, off_txt_p, m_img, m_txt, is_txt,
                   d, d_p, cos, sin, eps, D, HAS_TXT)
    tl.store(q_out + out, q, mask=m_out)
    k = _norm_rope(k_img, k_txt, wk_img, wk_txt, off_img, off_txt, off_img_p, off_txt_p, m_img, m_txt, is_txt,
                   d, d_p, cos, sin, eps, D, HAS_TXT)
    tl.store(k_out + out, k, mask=m_out)
    v = tl.load(v_img + off_img, mask=m_img, other=0.0)
    if HAS_TXT:
        v += tl.load(v_txt + off_txt, mask=m_txt, other=0.0)
    tl.store(v_out + out, v, mask=m_out)
