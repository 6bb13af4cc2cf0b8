"""First-block cache on the tiny FluxKontextPipeline (CPU, fp32): exactness at threshold 0, skipping at high
thresholds, per-request isolation, no global side effects."""
from __future__ import annotations

import copy

import pytest
import torch
from diffusers import FluxTransformer2DModel

from kontext_server.models import sources
from optimizations.caching.first_block_cache import CacheStats, FirstBlockCache
from tests.optimizations.fbc_cases import CALLS, CASES, STEPS

# rel diff of first-block residuals on the tiny random model is far below this: every call after the first skips
HIGH = 10.0




class _CallCounter:
    """Counts transformer calls via an instance-level forward pre-hook (independent of the cache's own count)."""

    def __init__(self, module):
        self.n = 0
        self._h = module.register_forward_pre_hook(self._hook)

    def _hook(self, module, args):
        self.n += 1

    def close(self):
        self._h.remove()


def _run(pipe, case: str) -> torch.Tensor:
    with torch.no_grad():
        return pipe(**CASES[case]()).images


@pytest.fixture(scope="module")
def cache_dir(tmp_path_factory):
    return tmp_path_factory.mktemp("flux-cache")


@pytest.fixture(scope="module")
def setup(cache_dir):
    """One pipeline; uncached reference outputs taken BEFORE the cache is installed; then the cache is installed."""
    class_forward_before = FluxTransformer2DModel.forward
    pipe = sources.load_model("tiny", "cpu", cache_dir=cache_dir).pipe
    assert pipe.transformer.dtype == torch.float32
    assert "forward" not in vars(pipe.transformer)
    ref = {case: _run(pipe, case) for case in CASES}
    cache = FirstBlockCache(pipe.transformer)
    yield pipe, cache, ref, class_forward_before
    cache.remove()


def _cached_run(pipe, cache, case, threshold) -> tuple[torch.Tensor, CacheStats, int]:
    counter = _CallCounter(pipe.transformer)
    try:
        with cache.session(threshold) as stats:
            out = _run(pipe, case)
    finally:
        counter.close()
    return out, stats, counter.n


def test_reference_is_deterministic(setup):
    # Guards the exact-equality tests below: two uncached runs must already be bit-identical.
    pipe, cache, ref, _ = setup
    assert torch.equal(_run(pipe, "generate"), ref["generate"])


@pytest.mark.parametrize("case", list(CASES))
@pytest.mark.parametrize("threshold", [0.0, 1e-12])
def test_threshold_zero_exact(setup, case, threshold):
    # 1e-12 exercises the comparison path (residuals stored, rel computed) but never skips.
    pipe, cache, ref, _ = setup
    out, stats, calls = _cached_run(pipe, cache, case, threshold)
    assert calls == CALLS[case]
    assert stats.skipped == 0
    assert stats.computed == calls
    assert stats.threshold == threshold
    assert torch.equal(out, ref[case])
    if threshold > 0:
        n_branches = 2 if case == "cfg" else 1
        assert len(stats.diffs) == calls - n_branches  # every call but each branch's first compares
        assert all(d > 1e-12 for d in stats.diffs)


@pytest.mark.parametrize("case", list(CASES))
def test_high_threshold_skips(setup, case):
    pipe, cache, ref, _ = setup
    out, stats, calls = _cached_run(pipe, cache, case, HIGH)
    n_branches = 2 if case == "cfg" else 1
    assert calls == CALLS[case]
    assert stats.computed + stats.skipped == calls
    assert stats.skipped > 0
    # Each branch's first call must compute; on the tiny model everything after it skips at this threshold.
    assert stats.computed == n_branches
    assert torch.isfinite(out).all()
    assert not torch.equal(out, ref[case])


def test_requests_do_not_influence_each_other(setup):
    pipe, cache, ref, _ = setup
    a1, sa1, _ = _cached_run(pipe, cache, "generate", HIGH)
    b, sb, _ = _cached_run(pipe, cache, "generate", 0.0)
    assert sa1.skipped > 0 and sb.skipped == 0
    assert torch.equal(b, ref["generate"])  # A's cached residuals did not leak into B

    b2, _, _ = _cached_run(pipe, cache, "generate", 0.0)
    a2, sa2, _ = _cached_run(pipe, cache, "generate", HIGH)
    a3, sa3, _ = _cached_run(pipe, cache, "generate", HIGH)
    assert torch.equal(b2, ref["generate"])
    assert torch.equal(a2, a3) and torch.equal(a1, a2)  # each A starts from an empty cache
    assert (sa1.computed, sa1.skipped) == (sa2.computed, sa2.skipped) == (sa3.computed, sa3.skipped)
    assert sa2.diffs == sa3.diffs


def test_stats_and_state_cleared_after_session(setup):
    pipe, cache, _, _ = setup
    with cache.session(HIGH) as stats:
        _run(pipe, "generate")
        assert cache.active
        assert len(cache._session.branches) == 1  # one conditioning branch, tensors held during the request
        sess = cache._session
    assert not cache.active
    assert sess.branches == {}  # no tensors kept after the request
    assert stats.calls == STEPS  # the stats object stays readable


def test_no_global_side_effects(setup, cache_dir):
    pipe, cache, ref, class_forward_before = setup
    assert FluxTransformer2DModel.forward is class_forward_before
    assert "forward" in vars(pipe.transformer)  # installed on the instance only

    other = sources.load_model("tiny", "cpu", cache_dir=cache_dir).pipe
    assert "forward" not in vars(other.transformer)
    assert other.transformer.forward.__func__ is FluxTransformer2DModel.forward
    with cache.session(HIGH) as stats:
        out_other = _run(other, "generate")  # runs while a session is active on `pipe`
        assert stats.calls == 0  # the other instance never touched our cache
        out_cached = _run(pipe, "generate")
    assert torch.equal(out_other, ref["generate"])
    assert stats.skipped > 0 and not torch.equal(out_cached, ref["generate"])
    assert FluxTransformer2DModel.forward is class_forward_before


def test_passthrough_outside_session(setup):
    pipe, cache, ref, _ = setup
    assert not cache.active
    for case in CASES:
        assert torch.equal(_run(pipe, case), ref[case])


def test_nested_session_raises(setup):
    pipe, cache, _, _ = setup
    with cache.session(0.1):
        with pytest.raises(RuntimeError, match="already active"):
            with cache.session(0.2):
                pass
        with pytest.raises(RuntimeError, match="session is active"):
            cache.remove()
    with pytest.raises(ValueError):
        with cache.session(-1.0):
            pass
    with cache.session(0.0):  # the lock was released after the failures
        pass


def test_unsupported_features_raise_in_session(setup):
    pipe, cache, _, _ = setup
    t = pipe.transformer
    cfg = t.config
    x = torch.randn(1, 4, cfg.in_channels)
    kw = dict(hidden_states=x, encoder_hidden_states=torch.randn(1, 3, cfg.joint_attention_dim),
              pooled_projections=torch.randn(1, cfg.pooled_projection_dim), timestep=torch.tensor([0.5]),
              img_ids=torch.zeros(4, 3), txt_ids=torch.zeros(3, 3), guidance=torch.tensor([2.5]), return_dict=False)
    with torch.no_grad(), cache.session(0.0):
        with pytest.raises(NotImplementedError, match="ControlNet"):
            t(**kw, controlnet_block_samples=[torch.zeros(1, 4, t.inner_dim)])
        with pytest.raises(NotImplementedError, match="IP-Adapter"):
            t(**kw, joint_attention_kwargs={"ip_adapter_image_embeds": [torch.zeros(1, 8)]})


def test_remove_and_deepcopy(cache_dir, setup):
    _, _, ref, class_forward_before = setup
    pipe = sources.load_model("tiny", "cpu", cache_dir=cache_dir).pipe
    t = pipe.transformer
    cache = FirstBlockCache(t)
    with pytest.raises(RuntimeError, match="already overridden"):
        FirstBlockCache(t)

    clone = copy.deepcopy(t)  # copy of an installed transformer gets its own, independent cache
    clone_cache = clone.forward.__self__
    assert isinstance(clone_cache, FirstBlockCache)
    assert clone_cache is not cache and clone_cache.transformer is clone
    with cache.session(HIGH):
        assert not clone_cache.active

    cache.remove()
    assert "forward" not in vars(t)
    assert t.forward.__func__ is FluxTransformer2DModel.forward
    assert torch.equal(_run(pipe, "generate"), ref["generate"])
    assert FluxTransformer2DModel.forward is class_forward_before


def test_direct_calls_with_remaining_double_blocks():
    # The tiny pipeline has num_layers=1, so the "remaining double blocks" loop is empty there. Here: 2 double +
    # 2 single blocks, called directly. Threshold 0 is exact; identical repeated inputs (rel == 0) skip, and the
    # skipped output matches the computed one up to float rounding (h1 + (hN - h1) vs hN).
    torch.manual_seed(0)
    t = FluxTransformer2DModel(patch_size=1, in_channels=16, num_layers=2, num_single_layers=2, attention_head_dim=16,
                               num_attention_heads=2, joint_attention_dim=32, pooled_projection_dim=32,
                               guidance_embeds=True, axes_dims_rope=(4, 6, 6)).eval()
    kw = dict(hidden_states=torch.randn(1, 16, 16), encoder_hidden_states=torch.randn(1, 5, 32),
              pooled_projections=torch.randn(1, 32), timestep=torch.tensor([0.7]), img_ids=torch.rand(16, 3) * 4,
              txt_ids=torch.zeros(5, 3), guidance=torch.tensor([2.5]), return_dict=False)
    with torch.no_grad():
        ref = t(**kw)[0]
        ref2 = t(**{**kw, "timestep": torch.tensor([0.6])})[0]
        cache = FirstBlockCache(t)
        with cache.session(0.0) as s:
            assert torch.equal(t(**kw)[0], ref)
            assert torch.equal(t(**{**kw, "timestep": torch.tensor([0.6])})[0], ref2)
        assert (s.computed, s.skipped) == (2, 0)
        with cache.session(0.01) as s:
            first = t(**kw)[0]
            second = t(**kw)[0]  # same inputs: first-block residual identical, rel == 0 -> skip
        assert (s.computed, s.skipped) == (1, 1) and s.diffs == [0.0]
        assert torch.equal(first, ref)
        torch.testing.assert_close(second, ref, rtol=1e-5, atol=1e-5)
        cache.remove()


def test_the_reference_is_refreshed_only_on_computed_steps_on_a_controlled_drift():
    """The first block's residual is made to drift by 5% of the reference per call: with threshold 0.12 the cache
    skips while the drift from the last *computed* call stays under 12%, then computes and takes a new reference.
    A cache that also refreshed its reference on skipped calls would compare with the previous call only (5%) and
    skip every call after the first: the exact pattern below tells the two apart."""
    torch.manual_seed(0)
    t = FluxTransformer2DModel(patch_size=1, in_channels=16, num_layers=2, num_single_layers=1, attention_head_dim=16,
                               num_attention_heads=2, joint_attention_dim=32, pooled_projection_dim=32,
                               guidance_embeds=True, axes_dims_rope=(4, 6, 6)).eval()
    first = t.transformer_blocks[0]
    pattern = torch.randn(1, 16, 32)
    drift = {"c": 1.0}

    def controlled(hidden_states, encoder_hidden_states, temb, image_rotary_emb=None, joint_attention_kwargs=None):
        return encoder_hidden_states, hidden_states + drift["c"] * pattern  # residual = c * pattern, exactly

    first.forward = controlled
    kw = dict(hidden_states=torch.randn(1, 16, 16), encoder_hidden_states=torch.randn(1, 5, 32),
              pooled_projections=torch.randn(1, 32), timestep=torch.tensor([0.7]), img_ids=torch.rand(16, 3) * 4,
              txt_ids=torch.zeros(5, 3), guidance=torch.tensor([2.5]), return_dict=False)
    cache = FirstBlockCache(t)
    try:
        with torch.no_grad(), cache.session(0.12) as stats:
            decisions = []
            for k in range(8):
                drift["c"] = 1.0 + 0.05 * k
                before = stats.computed
                t(**kw)
                decisions.append("C" if stats.computed > before else "s")
    finally:
        cache.remove()
    # computed at c = 1.00 (no reference), 1.15 (15% from 1.00), 1.30 (13% from 1.15); the rest within 12%
    assert "".join(decisions) == "CssCssCs", decisions
    assert [round(d, 3) for d in stats.diffs[:3]] == [0.05, 0.1, 0.15]
