"""The fp8 copy's norm / attention-output quantisation kernels (optimizations/fp8/norm_quant.py): the kernels against
their torch reference (in Triton's CPU interpreter here, on the GPU in the marked tests) and the rewritten blocks
against the unfused fp8 blocks."""
from __future__ import annotations

import copy

import pytest
import torch

from tests.helpers import transformer_inputs
from optimizations import qk_norm_rope
from optimizations.fp8 import norm_quant as fp8_norm_quant
from optimizations.fp8.linear import Fp8Linear, Fp8Rows, quantize_rows
from kontext_server.service import FluxService, ServiceConfig


def assert_fp8_matches(got: torch.Tensor, want: torch.Tensor, exact_fraction: float = 1.0):
    """fp8 tensors equal but for a fraction `1 - exact_fraction` of one-step differences (fp32 summation order on the
    GPU). On CPU the interpreter's casts round as the GPU's (tests/conftest.py), so CPU tests ask for equality."""
    g, w = got.float(), want.float()
    assert got.dtype == want.dtype == torch.float8_e4m3fn and got.shape == want.shape
    assert float((g != w).float().mean()) <= 1 - exact_fraction
    step = w.abs().clamp(min=2**-6) / 8  # e4m3: 8 steps per octave; below 2^-6 (subnormal) a fixed 2^-9
    assert float(((g - w).abs() / step).max()) <= 1.01


def _inputs(b=2, s_head=5, s_tail=7, k=48, device="cpu", dtype=torch.float32, seed=0, strided=False):
    """x, tail, delta and mod; `strided`: each a view into a wider tensor, so that its row (and batch) strides are
    not K (and S * K), and differ between the tensors."""
    g = torch.Generator().manual_seed(seed)

    def r(*shape, pad, gain=1.0, offset=0.0):
        wide = torch.randn(*shape[:-1], shape[-1] + (pad if strided else 0), generator=g) * gain + offset
        return wide.to(device, dtype)[..., :shape[-1]]

    # mod: an AdaLN output (batch, 6 * k); the chunks used are shift 3, scale 4, gate 2, as norm2 takes them
    return dict(x=r(b, s_head, k, pad=3, gain=3, offset=1), tail=r(b, s_tail, k, pad=10),
                delta=r(b, s_head, k, pad=6), mod=r(b, 6 * k, pad=4, gain=0.5))


VARIANTS = {"plain": ("x",), "concatenated": ("x", "tail"), "residual": ("x", "delta")}


def _call(fn, t, variant):
    args = [t[name] if name in VARIANTS[variant] else None for name in ("x", "tail", "delta")]
    return fn(*args, t["mod"], 3, 4, 2 if variant == "residual" else -1, 1e-6)


# K as the chunked kernel splits it (fp8_norm_quant.row_chunks): 48 = 3 x 16 (no masks, as 3,072 = 3 x 1,024),
# 40 = 3 x 16 with the last chunk masked, 100 = 2 x 64 with the last chunk masked.
ROW_WIDTHS = {48: (16, 3), 40: (16, 3), 100: (64, 2)}


def test_rows_split_into_at_most_three_unpadded_chunks():
    for k, chunks in {**ROW_WIDTHS, 3072: (1024, 3), 12288: (4096, 3), 128: (64, 2), 1: (1, 1)}.items():
        assert fp8_norm_quant.row_chunks(k) == chunks, k
    # the measured layouts (bench/bench_row_quant.py): GELU 3 x 4,096 on 8 warps, norm 3 x 1,024 on 2
    assert fp8_norm_quant.chunk_warps(4096) == 8 and fp8_norm_quant.chunk_warps(1024) == 2
    assert fp8_norm_quant.chunk_warps(16) == 1


@pytest.mark.parametrize("strided", [False, True], ids=["contiguous", "strided"])
@pytest.mark.parametrize("k", sorted(ROW_WIDTHS))
@pytest.mark.parametrize("variant", sorted(VARIANTS))
def test_norm_kernel_matches_its_reference(variant, k, strided):
    """The op (the chunked kernel) on batch 2, with and without masks, on contiguous rows and on views with other
    row and batch strides."""
    fp8_norm_quant._ops()
    t = _inputs(k=k, strided=strided)
    if strided:
        assert t["x"].stride(1) != k and t["tail"].stride(1) != t["x"].stride(1) and t["mod"].stride(0) != 6 * k
    q, s, h = _call(torch.ops.flux_kontext.norm_modulate_quant, t, variant)
    rq, rs, rh = _call(fp8_norm_quant.norm_modulate_quant_reference, t, variant)
    rows = 5 + (7 if variant == "concatenated" else 0)
    assert q.shape == (2, rows, k) and s.shape == (2, rows, 1) and s.dtype == torch.float32
    torch.testing.assert_close(s, rs, rtol=1e-6, atol=0)
    assert_fp8_matches(q, rq)
    if variant == "residual":
        torch.testing.assert_close(h, rh, rtol=1e-6, atol=1e-6)
    else:
        assert h.numel() == 0


def test_norm_kernel_rounds_the_residual_stream_once_to_the_model_dtype():
    """bf16 (the model's dtype; the tests above are fp32, where the rounding of h does not show): h is x + gate *
    delta in fp32 rounded once to bf16, and the norm reads that rounded h."""
    fp8_norm_quant._ops()
    t = _inputs(k=40, strided=True, dtype=torch.bfloat16)
    q, s, h = _call(torch.ops.flux_kontext.norm_modulate_quant, t, "residual")
    rq, rs, rh = _call(fp8_norm_quant.norm_modulate_quant_reference, t, "residual")
    assert h.dtype == torch.bfloat16 and torch.equal(h, rh)
    torch.testing.assert_close(s, rs, rtol=1e-6, atol=0)
    assert_fp8_matches(q, rq)


def test_heads_kernel_quantises_rows_of_the_attention_layout():
    fp8_norm_quant._ops()
    o = torch.randn(2, 3, 10, 16).transpose(1, 2)  # (batch, seq, heads, head_dim) view of (batch, heads, ...) memory
    o[1, 4] = 0  # an all-zero row: scale floor, zeros out
    q, s = torch.ops.flux_kontext.quantize_heads(o)
    rq, rs = quantize_rows(o.reshape(20, 48))
    assert q.shape == (2, 10, 48) and s.shape == (2, 10, 1)
    torch.testing.assert_close(s.reshape(20, 1), rs, rtol=0, atol=0)
    assert_fp8_matches(q.reshape(20, 48), rq)
    assert (q[1, 4].float() == 0).all()


def test_launchers_check_their_inputs():
    t = _inputs()
    launch = fp8_norm_quant.launch_norm_modulate_quant
    with pytest.raises(ValueError, match="residual update over concatenated"):
        launch(None, t["x"], t["tail"], t["delta"], t["mod"], 3, 4, 2, 1e-6)
    with pytest.raises(ValueError, match="chunks"):
        launch(None, t["x"], None, None, t["mod"], 3, 6, -1, 1e-6)  # chunk 6 of a 6-chunk output
    with pytest.raises(ValueError, match="chunks"):
        launch(None, t["x"], None, t["delta"], t["mod"], 3, 4, -1, 1e-6)  # a residual update needs its gate
    with pytest.raises(ValueError, match="last dimension"):
        launch(None, t["x"].transpose(1, 2), None, None, t["mod"], 3, 4, -1, 1e-6)
    with pytest.raises(ValueError, match="tail rows must have x's dtype"):
        launch(None, t["x"], t["tail"].double(), None, t["mod"], 3, 4, -1, 1e-6)
    with pytest.raises(ValueError, match="head_dim"):
        fp8_norm_quant.launch_quantize_heads(None, torch.randn(1, 4, 2, 12))


def test_fp8_linear_takes_rows_quantised_by_their_producer():
    """An Fp8Linear given Fp8Rows skips its own quantisation: the same result as quantising the tensor itself."""
    torch.manual_seed(0)
    lin = Fp8Linear.from_float(torch.nn.Linear(64, 48))
    x = torch.randn(2, 5, 64)
    q, s = quantize_rows(x.reshape(10, 64))
    with torch.no_grad():
        torch.testing.assert_close(lin(Fp8Rows(q.reshape(2, 5, 64), s.reshape(2, 5, 1))), lin(x), rtol=0, atol=0)


# ---- the rewritten blocks on the tiny transformer (fp32 on CPU) ---------------------------------------------------
def _to_fp8(model):
    from optimizations.low_precision import skip_module

    for name, m in list(model.named_modules()):
        if isinstance(m, torch.nn.Linear) and not skip_module(m, name):
            parent, _, child = name.rpartition(".")
            setattr(model.get_submodule(parent) if parent else model, child, Fp8Linear.from_float(m))
    return model


@pytest.fixture(scope="module")
def fp8_tiny(cache_dir):
    """The tiny transformer as the low-precision optimisation prepares its fp8 copy (fused q/k norm processor, split
    single-block proj_out, every block linear an Fp8Linear), with modulation strong enough that a wrong shift, scale
    or gate shows; and the same model in fp32 before quantisation."""
    from optimizations.fusions.split_proj_out import split_single_block_proj_out

    svc = FluxService(ServiceConfig(model="tiny", device="cpu", optimizations="none", cache_dir=cache_dir))
    svc.load()
    model = copy.deepcopy(svc.pipe.transformer)
    with torch.no_grad():
        for name, p in model.named_parameters():
            if name.endswith(("norm1.linear.weight", "norm1_context.linear.weight", "norm.linear.weight")):
                p.mul_(8)
    model.fuse_qkv_projections()
    qk_norm_rope.install(model)
    split_single_block_proj_out(model)
    return _to_fp8(copy.deepcopy(model)), model


def _rel(a, b):
    return float((a - b).norm() / b.norm())


def test_rewritten_blocks_compute_what_the_unfused_fp8_blocks_compute(fp8_tiny, monkeypatch):
    """Whole transformer, fp32: the fused and the unfused fp8 copy quantise the same values (up to summation order),
    so they agree far more closely than either agrees with the unquantised model, or a wrong modulation with them."""
    model, exact = fp8_tiny
    fused = copy.deepcopy(model)
    note = fp8_norm_quant.fuse_norm_quantisation(fused)
    n_double, n_single = len(fused.transformer_blocks), len(fused.single_transformer_blocks)
    assert f"in {n_double} double and {n_single} single blocks" in note and "not in" not in note
    assert all(isinstance(b.attn.processor, fp8_norm_quant.Fp8OutputProcessor)
               for b in list(fused.transformer_blocks) + list(fused.single_transformer_blocks))
    inputs = transformer_inputs(model, n_img=16, n_txt=8, device="cpu", dtype=torch.float32)
    with torch.no_grad():
        want, unfused, got = exact(**inputs)[0], model(**inputs)[0], fused(**inputs)[0]
    err_unfused, err_fused, gap = _rel(unfused, want), _rel(got, want), _rel(got, unfused)
    print(f"fp8 vs fp32: unfused {err_unfused:.4f}, fused {err_fused:.4f}; fused vs unfused {gap:.2e}")
    assert gap < 0.02 * err_unfused
    # A wrong modulation is far outside that: shift and scale swapped in the attention residual's norm.
    wrong = copy.deepcopy(model)
    fp8_norm_quant.fuse_norm_quantisation(wrong)
    real = fp8_norm_quant.residual_norm_quant
    monkeypatch.setattr(fp8_norm_quant, "residual_norm_quant",
                        lambda x, d, m, g, shift, scale, eps: real(x, d, m, g, scale, shift, eps))
    with torch.no_grad():
        bad = wrong(**inputs)[0]
    print(f"shift and scale swapped in the double blocks' norm2: {_rel(bad, unfused):.4f} from the unfused copy")
    assert _rel(bad, unfused) > 0.5 * err_unfused


def test_blocks_that_do_not_fit_are_reported_and_left_alone(fp8_tiny, monkeypatch):
    model, _ = fp8_tiny
    m = copy.deepcopy(model)
    m.transformer_blocks[0].ff.net[0] = torch.nn.Linear(4, 4)  # a bf16 feed-forward input: the block cannot take rows
    note = fp8_norm_quant.fuse_norm_quantisation(m)
    assert "not in 1: double block 0: its feed-forward input linears are not fp8 linears" in note
    assert "forward" not in vars(m.transformer_blocks[0])
    assert not isinstance(m.transformer_blocks[0].attn.processor, fp8_norm_quant.Fp8OutputProcessor)
    monkeypatch.setenv("FLUX_FP8_FUSED_NORM", "0")
    assert "not fused (FLUX_FP8_FUSED_NORM=0)" in fp8_norm_quant.fuse_norm_quantisation(copy.deepcopy(model))
    monkeypatch.delenv("FLUX_FP8_FUSED_NORM")
    import diffusers

    monkeypatch.setattr(diffusers, "__version__", "9.9.9")
    assert "not 9.9.9" in fp8_norm_quant.fuse_norm_quantisation(copy.deepcopy(model))


# ---- GPU: real casts and the compiled blocks ---------------------------------------------------------------------
@pytest.mark.gpu
@pytest.mark.parametrize("variant", sorted(VARIANTS))
def test_norm_kernel_rounds_like_its_reference_on_the_gpu(variant):
    """bf16 at edit-512's single-block shape (2,560 x 3,072): scales to fp32 summation order, fp8 bytes identical
    but for rare one-step flips, the residual stream identical."""
    fp8_norm_quant._ops()
    t = _inputs(b=1, s_head=2048, s_tail=512, k=3072, device="cuda", dtype=torch.bfloat16)
    q, s, h = _call(torch.ops.flux_kontext.norm_modulate_quant, t, variant)
    rq, rs, rh = _call(fp8_norm_quant.norm_modulate_quant_reference, t, variant)
    torch.testing.assert_close(s, rs, rtol=1e-5, atol=0)
    assert_fp8_matches(q, rq, exact_fraction=0.999)
    if variant == "residual":
        assert torch.equal(h, rh)


@pytest.mark.gpu
def test_heads_kernel_matches_quantize_rows_on_the_gpu():
    fp8_norm_quant._ops()
    o = torch.randn(1, 24, 2560, 128, device="cuda", dtype=torch.bfloat16).transpose(1, 2)
    q, s = torch.ops.flux_kontext.quantize_heads(o)
    rq, rs = quantize_rows(o.reshape(2560, 3072))
    torch.testing.assert_close(s.reshape(2560, 1), rs, rtol=0, atol=0)
    # Triton's fp32 division is not IEEE-exact: a rare value lands one fp8 step away (1 in 7.9 M on an H100)
    assert_fp8_matches(q.reshape(2560, 3072), rq, exact_fraction=0.99999)


@pytest.mark.gpu
def test_compiled_rewritten_blocks_call_the_kernels_without_graph_breaks(fp8_tiny):
    """fullgraph compile of a rewritten double and single block (as the regional compile does): both ops in the
    graph, same result as eager; and inductor's build of the block (which passes the kernels' float arguments as
    fp64) agrees with eager to rounding. GPU only: under fake tensors, Triton's CPU interpreter would run the
    kernels."""
    _, exact = fp8_tiny
    fused = _to_fp8(copy.deepcopy(exact).to("cuda", torch.bfloat16))  # row-scaled _scaled_mm writes bf16 only
    fp8_norm_quant.fuse_norm_quantisation(fused)
    inputs = transformer_inputs(fused, n_img=16, n_txt=8, device="cuda", dtype=torch.bfloat16)
    with torch.no_grad():
        hidden = fused.x_embedder(inputs["hidden_states"])
        text = fused.context_embedder(inputs["encoder_hidden_states"])
        temb = fused.time_text_embed(inputs["timestep"] * 1000, inputs["guidance"].to(torch.bfloat16) * 1000,
                                     inputs["pooled_projections"])
        rope = fused.pos_embed(torch.cat([inputs["txt_ids"], inputs["img_ids"]], 0))
        for block in (fused.transformer_blocks[0], fused.single_transformer_blocks[0]):
            graphs = []
            compiled = torch.compile(block, fullgraph=True, backend=lambda gm, ex: graphs.append(gm) or gm.forward)
            kw = dict(hidden_states=hidden, encoder_hidden_states=text, temb=temb, image_rotary_emb=rope)
            got, want = compiled(**kw), block(**kw)
            assert len(graphs) == 1
            targets = " ".join(str(n.target) for n in graphs[0].graph.nodes)
            assert "norm_modulate_quant" in targets and "quantize_heads" in targets
            for g, w in zip(got, want):
                torch.testing.assert_close(g, w, rtol=0, atol=0)
            for g, w in zip(torch.compile(block, fullgraph=True)(**kw), want):
                assert _rel(g.float(), w.float()) < 1e-2
