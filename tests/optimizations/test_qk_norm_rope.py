"""The fused q/k RMSNorm + RoPE prologue (optimizations/qk_norm_rope.py): the Triton kernel itself (in Triton's CPU
interpreter here) against diffusers' own attention processor."""
from __future__ import annotations

import copy

import pytest
import torch

from tests.helpers import transformer_inputs
from optimizations import qk_norm_rope
from kontext_server.service import FluxService, ServiceConfig


@pytest.fixture(scope="module")
def tiny_transformer(cache_dir):
    svc = FluxService(ServiceConfig(model="tiny", device="cpu", optimizations="none", cache_dir=cache_dir))
    svc.load()
    model = copy.deepcopy(svc.pipe.transformer)
    g = torch.Generator().manual_seed(3)
    with torch.no_grad():  # RMSNorm weights start at 1: make them matter (and differ between text and image)
        for name, p in model.named_parameters():
            if ".norm_q." in name or ".norm_k." in name or ".norm_added_" in name:
                p.copy_(1 + 0.5 * torch.randn(p.shape, generator=g))
    return model


def _fused(model):
    fused = copy.deepcopy(model)
    assert qk_norm_rope.unsupported_reason(fused) is None
    n_attn = len(fused.transformer_blocks) + len(fused.single_transformer_blocks)
    assert qk_norm_rope.install(fused) == n_attn
    assert all(isinstance(b.attn.processor, qk_norm_rope.FusedQKNormRopeProcessor)
               for b in list(fused.transformer_blocks) + list(fused.single_transformer_blocks))
    return fused


@pytest.mark.parametrize("fuse_qkv", [False, True], ids=["separate-projections", "fused-qkv"])
def test_fused_prologue_matches_diffusers_on_the_whole_transformer(tiny_transformer, fuse_qkv):
    """Double blocks (text from the context projections, its own norms) and single blocks (text already in the
    sequence), with separate q/k/v tensors or views of one fused projection: fp32, so only summation order differs."""
    ref = copy.deepcopy(tiny_transformer)
    if fuse_qkv:
        ref.fuse_qkv_projections()
    fused = _fused(ref)
    inputs = transformer_inputs(ref, n_img=16, n_txt=8, device="cpu", dtype=torch.float32)
    with torch.no_grad():
        expected, got = ref(**inputs)[0], fused(**inputs)[0]
    torch.testing.assert_close(got, expected, rtol=1e-5, atol=1e-5)
    assert (got - expected).abs().max() < (expected.abs().max() * 1e-5)


def _bf16_attention(tiny_transformer, block: str, device: str = "cpu"):
    attn = copy.deepcopy(getattr(tiny_transformer, block)[0].attn).to(device, torch.bfloat16)
    g = torch.Generator().manual_seed(5)
    n_txt, n_img, dim = 8, 24, attn.query_dim
    hidden = torch.randn(1, n_img if block == "transformer_blocks" else n_txt + n_img, dim, generator=g)
    text = torch.randn(1, n_txt, dim, generator=g) if block == "transformer_blocks" else None
    angles = torch.rand(n_txt + n_img, attn.head_dim, generator=g) * 6.28
    rope = (angles.cos().to(device), angles.sin().to(device))
    to_bf16 = lambda t: None if t is None else t.to(device, torch.bfloat16)  # noqa: E731
    return attn, dict(hidden_states=to_bf16(hidden), encoder_hidden_states=to_bf16(text), image_rotary_emb=rope)



def output_pairs(got, want) -> list:
    """An attention module's outputs paired: (image, text) for the double blocks, one tensor for the single ones."""
    return list(zip(*((x if isinstance(x, tuple) else (x,)) for x in (got, want)), strict=True))


def reference_qkv(attn, hidden_states, encoder_hidden_states, image_rotary_emb):
    """diffusers 0.42.1 FluxAttnProcessor's q, k, v just before its attention call."""
    from diffusers.models.embeddings import apply_rotary_emb
    from diffusers.models.transformers.transformer_flux import _get_qkv_projections

    q, k, v, eq, ek, ev = _get_qkv_projections(attn, hidden_states, encoder_hidden_states)
    heads = lambda t: t.unflatten(-1, (-1, attn.head_dim))  # noqa: E731
    q, k, v = attn.norm_q(heads(q)), attn.norm_k(heads(k)), heads(v)
    if eq is not None:
        q = torch.cat([attn.norm_added_q(heads(eq)), q], 1)
        k = torch.cat([attn.norm_added_k(heads(ek)), k], 1)
        v = torch.cat([heads(ev), v], 1)
    return (apply_rotary_emb(q, image_rotary_emb, sequence_dim=1),
            apply_rotary_emb(k, image_rotary_emb, sequence_dim=1), v)


def assert_within_rounding_steps(got, want, steps: int):
    step = want.float().abs().clamp(min=2**-6) * 2**-7  # one bf16 rounding step (8 significant bits)
    assert ((got.float() - want.float()).abs() <= steps * step).all()


@pytest.mark.parametrize("device", ["cpu", pytest.param("cuda", marks=pytest.mark.gpu)])
@pytest.mark.parametrize("block", ["transformer_blocks", "single_transformer_blocks"])
def test_kernel_rounds_like_the_eager_code(tiny_transformer, block, device):
    """The kernel rounds where the eager code rounds (after the norm, after RoPE): q and k within one bf16 step of
    diffusers' processor and mostly bit-identical; v copied exactly. On the GPU, and on CPU in the interpreter, whose
    casts round to nearest as the GPU's do in the tests (tests/conftest.py)."""
    attn, kw = _bf16_attention(tiny_transformer, block, device=device)
    qk_norm_rope._op()
    with torch.no_grad():
        q, k, v, n_txt = qk_norm_rope.qkv_for_attention(attn, kw["hidden_states"], kw["encoder_hidden_states"],
                                                        kw["image_rotary_emb"])
        rq, rk, rv = reference_qkv(attn, **kw)
    assert q.dtype == torch.bfloat16 and q.transpose(1, 2).is_contiguous() and q.shape == rq.shape
    assert torch.equal(v, rv)
    assert n_txt == (None if kw["encoder_hidden_states"] is None else kw["encoder_hidden_states"].shape[1])
    for got, want in ((q, rq), (k, rk)):
        assert_within_rounding_steps(got, want, 1)
        assert (got == want).float().mean() > 0.9


def test_fused_processor_matches_diffusers_processor_in_bf16(tiny_transformer):
    """The whole processor in bf16 (CPU SDPA): the attention outputs agree to bf16 rounding (a wrong weight, partner
    or sign gives tens of percent); test_kernel_rounds_like_the_eager_code checks the rounding itself."""
    for block in ("transformer_blocks", "single_transformer_blocks"):
        attn, kw = _bf16_attention(tiny_transformer, block)
        with torch.no_grad():
            want = attn(**kw)
            attn.set_processor(qk_norm_rope.FusedQKNormRopeProcessor())
            got = attn(**kw)
        for g, w in output_pairs(got, want):
            assert g.shape == w.shape and g.dtype == w.dtype == torch.bfloat16
            assert float((g.float() - w.float()).norm() / w.float().norm()) < 3e-2


@pytest.mark.parametrize("seq_major", ["0", "1"])
def test_seq_major_cudnn_attention_hands_its_output_to_the_out_projection_without_a_copy(tiny_transformer,
                                                                                         monkeypatch, seq_major):
    """FLUX_ATTENTION_SEQ_MAJOR=1: cuDNN gets (batch, heads, seq, head_dim) views of the kernel's (batch, seq, heads,
    head_dim) memory, and its output (allocated in the query's layout, as torch's cuDNN op does) is the memory the
    out-projection reads. Off (the default), diffusers' backend gets contiguous inputs and the output is copied.
    CPU has no cuDNN attention: SDPA is replaced by math attention that allocates its output as cuDNN does."""
    from diffusers.models.attention_dispatch import AttentionBackendName

    monkeypatch.setenv("FLUX_ATTENTION_SEQ_MAJOR", seq_major)
    on = seq_major == "1"
    seen = []

    def cudnn_like_sdpa(query, key, value, attn_mask=None, **kw):
        q, k, v = query, key, value
        seen.append(q.transpose(1, 2).is_contiguous() and not q.is_contiguous())
        w = torch.softmax((q.float() @ k.float().transpose(-1, -2)) * q.shape[-1] ** -0.5, -1)
        out = torch.empty_like(q)  # empty_like keeps q's layout: cuDNN's alloc_with_matching_layout
        out.copy_(w @ v.float())
        seen.append(out.untyped_storage().data_ptr())
        return out

    for block in ("transformer_blocks", "single_transformer_blocks"):
        attn, kw = _bf16_attention(tiny_transformer, block)
        with torch.no_grad():
            want = attn(**kw)
            attn.set_processor(qk_norm_rope.FusedQKNormRopeProcessor())
            attn.processor._attention_backend = AttentionBackendName._NATIVE_CUDNN
            read = []
            out_proj = attn.to_out[0] if block == "transformer_blocks" else None
            if out_proj is not None:
                out_proj.register_forward_pre_hook(lambda m, a: read.append(a[0].untyped_storage().data_ptr()))
            seen.clear()
            with monkeypatch.context() as m:
                m.setattr(torch.nn.functional, "scaled_dot_product_attention", cudnn_like_sdpa)
                got = attn(**kw)
        assert seen[0] is on  # strided views of the kernel's memory, not copies
        storage = got.untyped_storage().data_ptr() if out_proj is None else read[0]
        assert (storage == seen[1]) is on  # the attention's own output memory, not a copy of it
        for g, w in output_pairs(got, want):
            assert float((g.float() - w.float()).norm() / w.float().norm()) < 3e-2


def test_unsupported_models_are_reported_not_patched(tiny_transformer):
    model = copy.deepcopy(tiny_transformer)
    attn = model.single_transformer_blocks[0].attn
    attn.norm_q = torch.nn.RMSNorm(attn.head_dim, eps=1e-6, elementwise_affine=False)
    assert "single_transformer_blocks.0.attn" in qk_norm_rope.unsupported_reason(model)


def test_launch_checks_its_inputs():
    q = torch.randn(1, 4, 32)
    w, cs = torch.ones(16), torch.ones(4, 16)
    with pytest.raises(ValueError, match="last dimension"):
        qk_norm_rope.launch(None, torch.randn(1, 32, 4).transpose(1, 2), q, q, None, None, None, w, w, None, None,
                            cs, cs, 2, 1e-6)
    with pytest.raises(ValueError, match="share strides"):
        qk_norm_rope.launch(None, q, torch.randn(1, 4, 64)[..., :32], q, None, None, None, w, w, None, None, cs, cs,
                            2, 1e-6)
    with pytest.raises(ValueError, match="float32 of shape"):
        qk_norm_rope.launch(None, q, q, q, None, None, None, w, w, None, None, cs.double(), cs, 2, 1e-6)


@pytest.mark.gpu
def test_compiled_block_calls_the_kernel_without_graph_breaks(tiny_transformer):
    """fullgraph compile of a block with the fused processor (as the regional compile does): dynamo must see the op,
    not its lazy registration (torch.library.triton_op cannot be traced). GPU only: under fake tensors, Triton's CPU
    interpreter would run the kernel instead of tracing it."""
    fused = _fused(tiny_transformer).cuda()
    block = fused.single_transformer_blocks[0]
    inputs = transformer_inputs(fused, n_img=16, n_txt=8, device="cuda", dtype=torch.float32)
    with torch.no_grad():
        hidden = fused.x_embedder(inputs["hidden_states"])
        text = fused.context_embedder(inputs["encoder_hidden_states"])
        temb = fused.time_text_embed(inputs["timestep"] * 1000, inputs["guidance"] * 1000,
                                     inputs["pooled_projections"])
        rope = fused.pos_embed(torch.cat([inputs["txt_ids"], inputs["img_ids"]], 0))
        gm_count = []
        compiled = torch.compile(block, fullgraph=True, backend=lambda gm, ex: gm_count.append(gm) or gm.forward)
        got = compiled(hidden_states=hidden, encoder_hidden_states=text, temb=temb, image_rotary_emb=rope)
        want = block(hidden_states=hidden, encoder_hidden_states=text, temb=temb, image_rotary_emb=rope)
    assert len(gm_count) == 1
    assert any("qk_norm_rope" in str(n.target) for n in gm_count[0].graph.nodes)
    for g, w in zip(got, want):
        torch.testing.assert_close(g, w)
