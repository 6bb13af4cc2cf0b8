"""bench/fp8_attention_cudnn.py (the fp8-attention experiment, not part of the server): its quantisation and the op's
reference path on CPU. The cuDNN kernel itself is measured on the GPU by bench/bench_fp8_attention.py."""
from __future__ import annotations

import torch
import torch.nn.functional as F

from fp8_attention_cudnn import FP8_MAX, Q_K_BOUND_MARGIN, attention_fp8, quantize_dynamic


def _rms_normed(shape, gen, gain=1.0):
    x = torch.randn(*shape, generator=gen)
    w = gain * (1 + 0.3 * torch.randn(shape[-1], generator=gen)).abs()
    descale = torch.full((1,), shape[-1] ** 0.5 * float(w.max()) * Q_K_BOUND_MARGIN / FP8_MAX)
    return (x * torch.rsqrt(x.pow(2).mean(-1, keepdim=True) + 1e-6) * w).to(torch.bfloat16), descale


def test_static_q_k_scale_bounds_every_rms_normalised_value():
    g = torch.Generator().manual_seed(0)
    for gain in (0.5, 1.0, 4.0):
        x, descale = _rms_normed((2, 64, 4, 32), g, gain)
        assert float(x.float().abs().max() / descale) <= FP8_MAX  # never clipped


def test_fp8_attention_reference_path_is_attention_within_fp8_error():
    g = torch.Generator().manual_seed(1)
    q, dq = _rms_normed((1, 48, 2, 32), g)
    k, dk = _rms_normed((1, 48, 2, 32), g)
    v = torch.randn(1, 48, 2, 32, generator=g).to(torch.bfloat16)
    out = attention_fp8(q, k, v, dq, dk)
    ref = F.scaled_dot_product_attention(*(t.float().transpose(1, 2) for t in (q, k, v))).transpose(1, 2)
    assert out.dtype == torch.bfloat16 and out.shape == q.shape
    err = float((out.float() - ref).norm() / ref.norm())
    assert 1e-3 < err < 0.1  # fp8 error: present, and bounded


def test_dynamic_v_scale_uses_the_whole_fp8_range():
    v = torch.randn(3, 100) * 7
    q, descale = quantize_dynamic(v)
    assert q.dtype == torch.float8_e4m3fn
    assert float(q.float().abs().max()) == FP8_MAX
    torch.testing.assert_close(q.float() * descale, v, rtol=0.07, atol=1e-3)


def test_fp8_attention_op_gives_under_compile_the_contiguous_output_it_gives_eagerly_whatever_the_input_strides():
    # the server hands attention (batch, seq, heads, head_dim) views of head-major tensors, or of one fused qkv
    # projection; the real kernel returns a contiguous O, so the fake must too, or inductor's output stride check
    # fails the request (it did on the GPU when the fake copied q's strides)
    from torch._subclasses.fake_tensor import FakeTensorMode

    g = torch.Generator().manual_seed(2)
    b, s, h, d = 1, 32, 2, 16
    head_major = torch.randn(3, b, h, s, d, generator=g).to(torch.float8_e4m3fn).transpose(2, 3)
    fused = torch.randn(b, s, 3 * h * d, generator=g).to(torch.float8_e4m3fn)
    scales = [torch.full((1,), x) for x in (0.05, 0.05, 0.05, 1.0)]
    for q8, k8, v8 in (tuple(head_major), tuple(t.unflatten(-1, (h, d)) for t in fused.chunk(3, dim=-1))):
        assert not q8.is_contiguous()
        real = torch.ops.flux_kontext.sdpa_fp8(q8, k8, v8, *scales)
        with FakeTensorMode(allow_non_fake_inputs=True) as mode:
            fake = torch.ops.flux_kontext.sdpa_fp8(*(mode.from_tensor(t) for t in (q8, k8, v8, *scales)))
        assert (fake.shape, fake.stride(), fake.dtype) == (real.shape, real.stride(), real.dtype)
        assert real.is_contiguous()
