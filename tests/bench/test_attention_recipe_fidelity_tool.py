"""bench/attention_recipe_fidelity.py: the recipe replaces the attention both Flux processors call, only while it
is asked to, and the tool runs end to end on the tiny model (CPU), reporting each recipe against the server's own."""
from __future__ import annotations

import json

import pytest
import torch

import attention_recipe_fidelity as tool
from tests.optimizations.test_qk_norm_rope import _bf16_attention, output_pairs
from tests.optimizations.test_qk_norm_rope import tiny_transformer  # noqa: F401 - a fixture


def test_a_recipe_replaces_diffusers_attention_only_inside_the_context_and_counts_its_calls():
    import diffusers.models.attention_dispatch as dispatch
    import diffusers.models.transformers.transformer_flux as flux

    before = dispatch.dispatch_attention_fn, flux.dispatch_attention_fn
    q, k, v = (torch.randn(1, 40, 2, 16).to(torch.bfloat16) for _ in range(3))
    calls = []
    with tool.attention_replaced(tool.recipes()["fp32"], calls):
        out = flux.dispatch_attention_fn(q, k, v)
        with pytest.raises(ValueError, match="mask"):
            dispatch.dispatch_attention_fn(q, k, v, attn_mask=torch.ones(40, 40, dtype=torch.bool))
    assert (dispatch.dispatch_attention_fn, flux.dispatch_attention_fn) == before
    assert calls == [40]
    exact = torch.nn.functional.scaled_dot_product_attention(*(t.float().transpose(1, 2) for t in (q, k, v)))
    torch.testing.assert_close(out.float(), exact.transpose(1, 2), rtol=0, atol=1e-2)  # up to bf16's rounding
    assert out.dtype == torch.bfloat16 and out.shape == q.shape
    whole = []  # a kernel of the whole (batch, seq, heads, head_dim) tensors, its output cast to the query's dtype
    with tool.attention_replaced(lambda q_, k_, v_: torch.zeros(q_.shape, dtype=torch.float32), whole, whole=True):
        zeros = dispatch.dispatch_attention_fn(q, k, v)
    assert whole == [40] and zeros.dtype == torch.bfloat16 and not zeros.any()


@pytest.mark.parametrize("block", ["transformer_blocks", "single_transformer_blocks"])
def test_the_fused_qk_norm_rope_processor_runs_the_recipe_in_place_of_its_attention(tiny_transformer, block):  # noqa: F811
    """The GPU tiers' processor (optimizations/qk_norm_rope.py, its kernel in Triton's interpreter here) reaches
    attention through the same dispatch function, so a recipe replaces it there too."""
    from optimizations import qk_norm_rope

    attn, kw = _bf16_attention(tiny_transformer, block)
    attn.set_processor(qk_norm_rope.FusedQKNormRopeProcessor())
    calls = []
    with torch.no_grad():
        want = attn(**kw)
        with tool.attention_replaced(tool.recipes()["int8-block"], calls):
            got = attn(**kw)
    assert calls == [kw["hidden_states"].shape[1] + (0 if kw["encoder_hidden_states"] is None
                                                     else kw["encoder_hidden_states"].shape[1])]
    for g, w in output_pairs(got, want):
        err = float((g.float() - w.float()).norm() / w.float().norm())
        assert 0 < err < 0.2  # int8 Q.K^T moved it, by int8's order, not more


def test_the_tool_reports_every_recipe_against_the_servers_own_attention_on_the_tiny_model(cache_dir, tmp_path):
    out = tmp_path / "r.json"
    assert tool.main(["--model", "tiny", "--device", "cpu", "--width", "256", "--height", "256", "--steps", "2",
                      "--recipes", "fp32,int8-block+fp8pv", "--cache-dir", str(cache_dir), "--out", str(out)]) == 0
    report = json.loads(out.read_text())
    assert report["flags"] == {"use_dpm_solver": True} and "attention" not in report["prepared"]
    rows = report["recipes"]
    assert set(rows) == {"fp32", "int8-block+fp8pv"}
    assert all(r["attention_calls"] > 0 for r in rows.values())  # the replacement ran, in every block
    # exact fp32 attention moves the result less than 8-bit Q.K^T with fp8 P.V
    assert 0 <= rows["fp32"]["rel_latent_error"] < rows["int8-block+fp8pv"]["rel_latent_error"]


def test_a_recipe_that_fails_is_reported_and_the_others_still_run(cache_dir, tmp_path, monkeypatch):
    def broken(q, k, v):
        raise RuntimeError("no kernel for this shape")

    monkeypatch.setattr(tool, "recipes", lambda: {"broken": broken, "fp32": tool.sim.recipes()["bf16"]})
    out = tmp_path / "r.json"
    assert tool.main(["--model", "tiny", "--device", "cpu", "--width", "256", "--height", "256", "--steps", "1",
                      "--cache-dir", str(cache_dir), "--out", str(out)]) == 0
    rows = json.loads(out.read_text())["recipes"]
    assert rows["broken"] == {"error": "RuntimeError: no kernel for this shape", "attention_calls": 1}
    assert rows["fp32"]["attention_calls"] > 0 and "rel_latent_error" in rows["fp32"]
