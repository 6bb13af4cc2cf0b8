"""The first-block cache under real CUDA graphs (marked `gpu`; skipped without CUDA). Run on the device machine:

    python -m pytest -q -m gpu -s tests/gpu/test_first_block_cache_graphs_gpu.py

The CPU tests (tests/optimizations/test_first_block_cache_graphs.py) check the head / tail / skip logic with a
recorded stand-in for capture; here the graphs are captured by CUDA: on the tiny pipeline (bf16 on the GPU), and on
`synthetic-full` in the fast tier (fp8 + DPM-Solver++ + graphs, at 512x512 text-to-image, no compile). In both, the
graphed cache must compute and skip the same calls as the eager cache on the same inputs, with the same outputs;
threshold 0 must equal no cache. Figures (latent differences, per-step times with and without the cache) are printed
and, when $OUT is set, written to $OUT/fbc_graphs_gpu.json.
"""
from __future__ import annotations

import json
import os

import pytest
import torch

from kontext_server.request import InferenceRequest

pytestmark = pytest.mark.gpu
FIGURES: dict = {}
HIGH = 10.0  # above any relative change: every call after a branch's first skips


def _record(name, value):
    FIGURES[name] = value
    print(f"{name}: {value}")
    out = os.environ.get("OUT")
    if out:
        with open(os.path.join(out, "fbc_graphs_gpu.json"), "w") as f:
            json.dump(FIGURES, f, indent=1)


def _between(diffs: list[float]) -> float:
    """A threshold halfway between two neighbouring relative changes near the median: some calls skip, some
    compute, and no decision sits on the boundary (where a last-bit difference could flip it)."""
    d = sorted(set(diffs))
    assert len(d) >= 2, diffs
    i = len(d) // 2
    return (d[i - 1] + d[i]) / 2


# ---- the tiny pipeline on the GPU, the graph runner called directly -------------------------------------------
@pytest.fixture(scope="module")
def tiny_cuda(cache_dir):
    from kontext_server.models import sources
    from optimizations.caching.first_block_cache import FirstBlockCache
    from optimizations.cuda_graphs import CudaGraphTransformer

    pipe = sources.load_model("tiny", "cuda", cache_dir=cache_dir).pipe
    cases = {"generate": {}, "cfg": dict(true_cfg_scale=2.0, negative_prompt="blurry")}
    with torch.inference_mode():
        ref = {case: pipe(**_tiny_kwargs(**extra)).images for case, extra in cases.items()}
    cache = FirstBlockCache(pipe.transformer)
    runner = CudaGraphTransformer(pipe.transformer)  # CUDA capture, its own pool
    yield pipe, cache, runner, cases, ref
    cache.remove()


def _tiny_kwargs(**extra):
    kw = dict(prompt="a red car", height=256, width=256, max_area=256 * 256, num_inference_steps=8,
              guidance_scale=2.5, generator=torch.Generator().manual_seed(0), output_type="latent")
    kw.update(extra)
    return kw


def _tiny_request(pipe, cache, extra, threshold, runner=None):
    module = pipe.__dict__["transformer"]
    with torch.inference_mode(), cache.session(threshold) as stats:
        if runner is not None:
            pipe.__dict__["transformer"] = runner
        try:
            out = pipe(**_tiny_kwargs(**extra)).images
        finally:
            pipe.__dict__["transformer"] = module
    return out, stats


@pytest.mark.parametrize("case", ["generate", "cfg"])
def test_real_graphs_compute_and_skip_the_calls_the_eager_cache_does_on_the_tiny_pipeline(tiny_cuda, case):
    pipe, cache, runner, cases, ref = tiny_cuda
    extra = cases[case]
    zero, zero_stats = _tiny_request(pipe, cache, extra, 0.0, runner)
    _record(f"tiny_{case}_threshold0_graphs_vs_uncached_max_abs", float((zero - ref[case]).abs().max()))
    assert zero_stats.graphed and zero_stats.skipped == 0
    assert torch.equal(zero, ref[case])  # same kernels, same order as the whole step
    _, probe = _tiny_request(pipe, cache, extra, 1e-12)
    for threshold in (HIGH, _between(probe.diffs)):
        eager, eager_stats = _tiny_request(pipe, cache, extra, threshold)
        graphed, stats = _tiny_request(pipe, cache, extra, threshold, runner)
        _record(f"tiny_{case}_threshold{threshold:.4g}_steps_eager_vs_graphs",
                [[eager_stats.computed, eager_stats.skipped], [stats.computed, stats.skipped]])
        assert eager_stats.skipped > 0
        assert (stats.computed, stats.skipped) == (eager_stats.computed, eager_stats.skipped)
        torch.testing.assert_close(torch.tensor(stats.diffs), torch.tensor(eager_stats.diffs), rtol=1e-6, atol=0)
        assert torch.equal(graphed, eager)
    if case == "cfg":  # true CFG's branches: two slots, each with its own buffers
        assert {key[-1] for key in cache._static} == {0, 1}


def test_real_graphs_keep_nothing_of_a_request_for_the_next(tiny_cuda):
    pipe, cache, runner, cases, ref = tiny_cuda
    a1, s1 = _tiny_request(pipe, cache, cases["generate"], HIGH, runner)
    b, _ = _tiny_request(pipe, cache, cases["generate"], 0.0, runner)
    a2, s2 = _tiny_request(pipe, cache, cases["generate"], HIGH, runner)
    assert torch.equal(b, ref["generate"]) and torch.equal(a1, a2)
    assert (s1.computed, s1.skipped, s1.diffs) == (s2.computed, s2.skipped, s2.diffs)
    assert all(not t.any() for refs in cache._static.values() for t in (refs.first_residual,
                                                                        refs.remaining_residual))


# ---- synthetic-full in the fast tier, through the service -----------------------------------------------------
@pytest.fixture(scope="module")
def fast_service(cache_dir):
    from kontext_server.service import FluxService, ServiceConfig

    svc = FluxService(ServiceConfig(model="synthetic-full", device="cuda", cache_dir=cache_dir,
                                    optimizations="qkv_fusion,channels_last,attention,low_precision,"
                                                  "modulation_table,first_block_cache,dpm_solver,cuda_graphs"))
    svc.load()
    return svc


FAST = dict(prompt="make the car red", width=512, height=512, seed=7, use_mxfp4=True, use_dpm_solver=True)


def _rel(a, b) -> float:
    a, b = a.float(), b.float()
    return float((a - b).norm() / b.norm().clamp_min(1e-12))


def test_the_fast_tier_with_the_cache_under_real_graphs_takes_the_eager_caches_decisions(fast_service):
    svc = fast_service

    def run(graphs: bool, threshold=None, cache=True):
        req = InferenceRequest(**FAST, use_cuda_graphs=graphs, use_first_block_cache=cache, cache_threshold=threshold)
        svc.generate(req, output_type="latent")  # warm (capture on the first at this shape), then timed
        return svc.generate(req, output_type="latent")

    uncached = run(True, cache=False)
    never = run(True, 1e-12)  # every comparison made, nothing skipped: the cache's cost when it does not skip
    assert never.optimizations["cuda_graphs"].applied and never.optimizations["first_block_cache"].applied
    assert "captured graphs" in never.optimizations["first_block_cache"].detail
    _record("fast_512_t2i_cache_never_skipping_vs_uncached_max_abs",
            float((never.latents.float() - uncached.latents.float()).abs().max()))
    assert never.steps_skipped == 0 and torch.equal(never.latents, uncached.latents)
    default = run(True)  # the DPM-Solver++ default threshold
    assert default.cache_threshold == 0.24
    _record("fast_512_t2i_per_step_ms_uncached_vs_cache_never_skipping_vs_default",
            [uncached.timings_ms["transformer_per_step"], never.timings_ms["transformer_per_step"],
             default.timings_ms["transformer_per_step"]])
    _record("fast_512_t2i_default_threshold_steps_computed_skipped", [default.steps_computed, default.steps_skipped])

    eager_probe = run(False, 1e-12)
    rel_vs_eager = _rel(never.latents, eager_probe.latents)
    _record("fast_512_t2i_graphs_vs_eager_cache_latents_rel", rel_vs_eager)
    for threshold in (HIGH, 0.24):
        eager, graphed = run(False, threshold), run(True, threshold)
        _record(f"fast_512_t2i_threshold{threshold:g}_steps_eager_vs_graphs",
                [[eager.steps_computed, eager.steps_skipped], [graphed.steps_computed, graphed.steps_skipped]])
        assert (graphed.steps_computed, graphed.steps_skipped) == (eager.steps_computed, eager.steps_skipped)
        rel = _rel(graphed.latents, eager.latents)
        _record(f"fast_512_t2i_threshold{threshold:g}_graphs_vs_eager_cache_latents_rel", rel)
        assert rel <= 2 * rel_vs_eager + 1e-5  # no more than the graphs' own difference (0 when bit-identical)
    high = run(True, HIGH)
    _record("fast_512_t2i_threshold10_vs_uncached_latents_rel", _rel(high.latents, uncached.latents))
    assert high.steps_skipped == high.steps - 1
