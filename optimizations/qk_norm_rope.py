"""q/k RMSNorm + RoPE + text/image concatenation in one Triton pass, in front of attention (both variants).

diffusers' FluxAttnProcessor RMS-normalises q and k per head (norm_q / norm_k, and norm_added_q / norm_added_k for
the text tokens of the double blocks), concatenates text and image tokens, applies the rotary embedding and hands
q, k, v to SDPA. Compiled, inductor emitted that as ~5 kernels per block: a looped reduction for the norm, pointwise
kernels for RoPE (which reads each element's pair partner), the concatenations and a contiguous copy of v; 3.3 ms
of an fp8 step at edit-512 on an H100 against ~1.2 ms to read q, k, v once and write them once (BENCHMARKS.md,
2026-11-22 profile). Here one program takes BLOCK_T tokens of one head: it reads the q, k and v rows straight from
the projections' outputs (fused to_qkv views or separate tensors; text rows from the context projections), and
writes q, k, v once, in the (batch, heads, seq, head_dim) memory SDPA takes after diffusers' permute. Its output
comes back in that layout too, and inductor copies it into (batch, seq, heads * head_dim) rows for the out-projection.
With FLUX_ATTENTION_SEQ_MAJOR=1 (off: no reliable gain measured on an H100) the kernel writes (batch, seq, heads,
head_dim) memory instead and the processor calls cuDNN SDPA on (batch, heads, seq, head_dim) views of it itself
(diffusers' cuDNN backend would make them contiguous); cuDNN writes its output in the query's layout, so that copy
goes.

Numerics follow the eager code: torch.nn.RMSNorm (fp32 math, one rounding to the model's dtype), then diffusers'
apply_rotary_emb (fp32 math, one rounding). Lossless in the sense of the other fusions (float reordering only); tests
compare it with diffusers' processor. On CPU (tests) the same kernel runs in Triton's interpreter.
"""
from __future__ import annotations

import functools

import torch

from kontext_server import settings
from optimizations.compiling.cache import switched_off

# Tokens per program and warps: a program holds BLOCK_T x head_dim values of q, k and v for one head.
# Chosen with bench/bench_qk_norm_rope.py on an H100 (BENCHMARKS.md).
BLOCK_T, NUM_WARPS = 16, 4


@functools.cache
def _kernel():
    from optimizations.kernels.qk_norm_rope import qk_norm_rope_kernel

    return qk_norm_rope_kernel


def launch(kernel, q_img, k_img, v_img, q_txt, k_txt, v_txt, wq_img, wk_img, wq_txt, wk_txt, cos, sin,
           heads: int, eps: float, block_t: int = BLOCK_T, num_warps: int = NUM_WARPS, seq_major: bool = False):
    """Run `kernel` (the Triton kernel, or torch.library's wrap_triton of it) and return q, k, v of shape
    (batch, seq, heads, head_dim), in (batch, heads, seq, head_dim) memory or, `seq_major`, their own. q/k/v_img:
    (batch, image seq, heads * head_dim) views sharing one set of strides (last stride 1); *_txt likewise for the
    text tokens, or None (single blocks: text is already in the sequence)."""
    b, s_img, inner = q_img.shape
    d = inner // heads
    has_txt = q_txt is not None
    s_txt = q_txt.shape[1] if has_txt else 0
    s = s_txt + s_img
    for t in (q_img, k_img, v_img) + ((q_txt, k_txt, v_txt) if has_txt else ()):
        if t.stride(-1) != 1:
            raise ValueError("q/k/v rows must be contiguous in their last dimension")
    if k_img.stride() != q_img.stride() or v_img.stride() != q_img.stride():
        raise ValueError("image q/k/v must share strides (views of one fused projection, or three like tensors)")
    if has_txt and (k_txt.stride() != q_txt.stride() or v_txt.stride() != q_txt.stride()):
        raise ValueError("text q/k/v must share strides")
    if cos.shape != (s, d) or cos.dtype != torch.float32:
        raise ValueError(f"rotary cos/sin must be float32 of shape ({s}, {d}), got {tuple(cos.shape)} {cos.dtype}")
    # Written in (batch, heads, seq, head_dim) memory, the layout cuDNN / flash attention take after diffusers'
    # permute. Written in the returned shape's own contiguous layout, diffusers' backend copied all three again before
    # attention (1.96 ms per step at edit-512 on an H100), unless the processor calls SDPA itself (`seq_major`).
    shape = (b, s, heads, d) if seq_major else (b, heads, s, d)
    out = [torch.empty(shape, dtype=q_img.dtype, device=q_img.device) for _ in range(3)]
    out = [o if seq_major else o.transpose(1, 2) for o in out]  # (batch, seq, heads, head_dim) views
    txt = (q_txt, k_txt, v_txt) if has_txt else (q_img, k_img, v_img)  # unread when there is no text source
    w_txt = (wq_txt, wk_txt) if has_txt else (wq_img, wk_img)
    grid = (triton_cdiv(s, block_t), heads, b)
    kernel[grid](q_img, k_img, v_img, *txt, wq_img, wk_img, *w_txt, cos.contiguous(), sin.contiguous(), *out,
                 s, s_txt, q_img.stride(0), q_img.stride(1), txt[0].stride(0), txt[0].stride(1),
                 out[0].stride(0), out[0].stride(1), out[0].stride(2), eps,
                 D=d, BLOCK_T=block_t, HAS_TXT=has_txt, num_warps=num_warps)
    return tuple(out)


def triton_cdiv(a: int, b: int) -> int:
    return -(-a // b)


@functools.cache
def _op():
    """The kernel as a torch op (traceable by torch.compile: the compiled blocks call it directly)."""
    from torch.library import triton_op, wrap_triton

    kernel = _kernel()

    @triton_op("flux_kontext::qk_norm_rope", mutates_args={})
    def qk_norm_rope(q_img: torch.Tensor, k_img: torch.Tensor, v_img: torch.Tensor, q_txt: torch.Tensor | None,
                     k_txt: torch.Tensor | None, v_txt: torch.Tensor | None, wq_img: torch.Tensor,
                     wk_img: torch.Tensor, wq_txt: torch.Tensor | None, wk_txt: torch.Tensor | None,
                     cos: torch.Tensor, sin: torch.Tensor, heads: int, eps: float, seq_major: bool = False
                     ) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        return launch(wrap_triton(kernel), q_img, k_img, v_img, q_txt, k_txt, v_txt, wq_img, wk_img, wq_txt,
                      wk_txt, cos, sin, heads, eps, seq_major=seq_major)

    return qk_norm_rope


def qkv_for_attention(attn, hidden_states, encoder_hidden_states, image_rotary_emb, seq_major: bool = False):
    """What FluxAttnProcessor computes before its attention call, by the fused kernel: q, k, v of shape
    (batch, text + image seq, heads, head_dim), normalised and rotated, and the number of text tokens in front (None
    when the text is already in the sequence: single blocks). Needs the op registered (`_op()`). The inputs may be
    tensors or, in the fp8 copy, fp8 rows (fp8_linear.Fp8Rows): they are only handed to the projections."""
    from diffusers.models.transformers.transformer_flux import _get_qkv_projections

    q, k, v, eq, ek, ev = _get_qkv_projections(attn, hidden_states, encoder_hidden_states)
    has_txt = attn.added_kv_proj_dim is not None and encoder_hidden_states is not None
    cos, sin = image_rotary_emb
    # Called through torch.ops: the op is registered when a processor is built (outside any compiled region), since
    # dynamo cannot trace the registration (torch.library.triton_op is marked as skipped).
    q, k, v = torch.ops.flux_kontext.qk_norm_rope(
        q, k, v, eq if has_txt else None, ek if has_txt else None, ev if has_txt else None,
        attn.norm_q.weight, attn.norm_k.weight, attn.norm_added_q.weight if has_txt else None,
        attn.norm_added_k.weight if has_txt else None, cos, sin, attn.heads, _rms_norm_eps(attn.norm_q, q.dtype),
        seq_major)
    return q, k, v, (eq.shape[1] if has_txt else None)


class FusedQKNormRopeProcessor:
    """diffusers 0.42.1's FluxAttnProcessor with the q/k norm, concatenation and RoPE done by the fused kernel.
    Stateless; one instance serves all attention modules of a transformer (set_attention_backend sets its backend)."""

    _attention_backend = None
    _parallel_config = None

    def __init__(self):
        _op()  # registers torch.ops.flux_kontext.qk_norm_rope
        self.seq_major = not switched_off(settings.ATTENTION_SEQ_MAJOR)

    def __call__(self, attn, hidden_states, encoder_hidden_states=None, attention_mask=None,
                 image_rotary_emb=None):
        from diffusers.models.attention_dispatch import AttentionBackendName, dispatch_attention_fn

        query, key, value, n_txt = qkv_for_attention(attn, hidden_states, encoder_hidden_states, image_rotary_emb,
                                                     self.seq_major)
        if self.seq_major and self._attention_backend == AttentionBackendName._NATIVE_CUDNN \
                and self._parallel_config is None:
            out = cudnn_attention(query, key, value, attention_mask)
        else:
            out = dispatch_attention_fn(query, key, value, attn_mask=attention_mask, backend=self._attention_backend,
                                        parallel_config=self._parallel_config)
        return self.project_out(attn, out.to(query.dtype), n_txt)

    def project_out(self, attn, out: torch.Tensor, n_txt: int | None):
        """The attention output (batch, seq, heads, head_dim) as diffusers' processor returns it: through the output
        projections as (image, text) for the double blocks (`n_txt` text tokens first), flattened for the single
        blocks (n_txt None; their block projects it)."""
        hidden_states = out.flatten(2, 3)
        if n_txt is None:
            return hidden_states
        encoder_hidden_states, hidden_states = hidden_states.split_with_sizes(
            [n_txt, hidden_states.shape[1] - n_txt], dim=1)
        hidden_states = attn.to_out[1](attn.to_out[0](hidden_states.contiguous()))
        encoder_hidden_states = attn.to_add_out(encoder_hidden_states.contiguous())
        return hidden_states, encoder_hidden_states


def cudnn_attention(query, key, value, attn_mask=None):
    """diffusers' `_native_cudnn` backend (torch's SDPA, cuDNN only) without its `.contiguous()` on the inputs:
    (batch, seq, heads, head_dim) in and out. cuDNN takes the strided (batch, heads, seq, head_dim) views and allocates
    its output in the query's layout, so the result is (batch, seq, heads, head_dim) memory: flattening the heads for
    the out-projection is a view. Under context parallelism para-attn intercepts this SDPA call as it does
    diffusers'."""
    from torch.nn.attention import SDPBackend, sdpa_kernel

    with sdpa_kernel(SDPBackend.CUDNN_ATTENTION):
        out = torch.nn.functional.scaled_dot_product_attention(
            query.transpose(1, 2), key.transpose(1, 2), value.transpose(1, 2), attn_mask=attn_mask)
    return out.transpose(1, 2)


def _rms_norm_eps(norm, dtype: torch.dtype) -> float | None:
    """eps of a weighted torch.nn.RMSNorm over the last dimension (what FluxAttention uses), else None. The kernel
    rounds as torch's does: fp32 throughout, one rounding to the input dtype (diffusers' own RMSNorm rounds twice)."""
    if not isinstance(norm, torch.nn.RMSNorm) or norm.weight is None or len(norm.normalized_shape) != 1:
        return None
    return norm.eps if norm.eps is not None else torch.finfo(dtype).eps


def unsupported_reason(transformer) -> str | None:
    """None when every attention module of `transformer` fits the kernel's assumptions, else why not."""
    from diffusers.models.transformers.transformer_flux import FluxAttention

    for name, m in transformer.named_modules():
        if not isinstance(m, FluxAttention):
            continue
        norms = [m.norm_q, m.norm_k] + ([m.norm_added_q, m.norm_added_k] if m.added_kv_proj_dim is not None else [])
        eps = {_rms_norm_eps(n, m.norm_q.weight.dtype if m.norm_q.weight is not None else torch.float32) for n in norms}
        if None in eps:
            return f"{name}: its q/k norms are not weighted torch.nn.RMSNorms over the head dimension"
        if len(eps) > 1 or m.head_dim & (m.head_dim - 1):
            return f"{name}: q/k norms with different eps, or head_dim {m.head_dim} not a power of two"
    return None


def install(transformer) -> int:
    """Give every FluxAttention of `transformer` the fused processor, keeping its attention backend; returns how
    many. The caller checks `unsupported_reason` first."""
    from diffusers.models.transformers.transformer_flux import FluxAttention

    proc, n = FusedQKNormRopeProcessor(), 0  # one per transformer: its modules share one backend
    for m in transformer.modules():
        if isinstance(m, FluxAttention):
            proc._attention_backend = getattr(m.processor, "_attention_backend", None)
            m.set_processor(proc)
            n += 1
    return n
