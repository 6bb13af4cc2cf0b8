"""The first-block cache under CUDA graphs, on the CPU: the graph runner (optimizations/cuda_graphs.py) with the
recorded capture strategy (optimizations/graph_capture.py) in place of CUDA capture, on the tiny pipeline (fp32).

What is checked: the head / tail / skip graphs compute and skip the same calls as the eager cache, with the same
outputs and the same relative changes; threshold 0 is bit-identical to no cache; nothing of one request reaches the
next; true CFG's two branches keep separate references; and, through the service, a request runs DPM-Solver++,
graphs and the cache together (the fast tier less fp8, which needs a GPU), with its scheduler's threshold reported.
The same equalities with real CUDA graphs: tests/gpu/test_first_block_cache_graphs_gpu.py."""
from __future__ import annotations

import contextlib

import numpy as np
import pytest
import torch
from diffusers import FluxTransformer2DModel

from kontext_server.models import sources
from optimizations.caching.first_block_cache import FirstBlockCache
from optimizations.cuda_graphs import CudaGraphTransformer
from optimizations.graph_capture import RecordedCapture, RecordedGraph, capturing
from tests.optimizations.fbc_cases import CALLS, CASES, gen_kwargs

HIGH = 10.0  # far above any relative change on the tiny random model: every call after a branch's first skips




@pytest.fixture(scope="module")
def setup(cache_dir):
    """One tiny pipeline: uncached outputs taken before the cache is installed, then the cache, then a graph runner
    (recorded capture) over the same transformer."""
    pipe = sources.load_model("tiny", "cpu", cache_dir=cache_dir).pipe
    with torch.inference_mode():
        ref = {case: pipe(**make()).images for case, make in CASES.items()}
    cache = FirstBlockCache(pipe.transformer)
    capture = RecordedCapture()
    runner = CudaGraphTransformer(pipe.transformer, pool=capture.new_pool(), capture=capture)
    yield pipe, cache, runner, capture, ref
    cache.remove()


@contextlib.contextmanager
def _graphed(pipe, runner):
    module = pipe.__dict__["transformer"]
    pipe.__dict__["transformer"] = runner  # what the service does for one call (runner._swap)
    try:
        yield
    finally:
        pipe.__dict__["transformer"] = module


def _request(pipe, cache, case, threshold, runner=None):
    with torch.inference_mode(), cache.session(threshold) as stats:
        with _graphed(pipe, runner) if runner is not None else contextlib.nullcontext():
            out = pipe(**CASES[case]()).images
    return out, stats


def _replays(runner, capture) -> dict:
    """Replays per piece (head / tail / skip) of the cache's graphs held by this runner."""
    by_graph = {id(g): g.replays for g in capture.graphs}
    counts: dict = {}
    for key, (graph, _, _) in runner.graphs.items():
        if key[0] == "first_block_cache":
            counts[key[-1]] = counts.get(key[-1], 0) + by_graph[id(graph)]
    return counts


@pytest.mark.parametrize("case", list(CASES))
@pytest.mark.parametrize("threshold", [0.0, 1e-12])
def test_under_graphs_a_threshold_that_never_skips_is_bit_identical_to_no_cache(setup, case, threshold):
    # 1e-12 compares (rel is read every call after a branch's first) but never skips
    pipe, cache, runner, capture, ref = setup
    before = _replays(runner, capture)
    out, stats = _request(pipe, cache, case, threshold, runner)
    assert stats.graphed and (stats.computed, stats.skipped) == (CALLS[case], 0)
    assert torch.equal(out, ref[case])
    after = _replays(runner, capture)
    # every call replayed the head and the tail: the graphs ran, not the eager cache
    assert after["head"] - before.get("head", 0) == CALLS[case]
    assert after["tail"] - before.get("tail", 0) == CALLS[case]


@pytest.mark.parametrize("case", list(CASES))
def test_under_graphs_a_high_threshold_skips_the_calls_the_eager_cache_skips_with_the_same_output(setup, case):
    pipe, cache, runner, capture, ref = setup
    eager, eager_stats = _request(pipe, cache, case, HIGH)
    before = _replays(runner, capture)
    graphed, stats = _request(pipe, cache, case, HIGH, runner)
    assert not eager_stats.graphed and stats.graphed
    assert stats.skipped > 0 and (stats.computed, stats.skipped) == (eager_stats.computed, eager_stats.skipped)
    assert stats.diffs == eager_stats.diffs
    assert torch.equal(graphed, eager) and not torch.equal(graphed, ref[case])
    after = _replays(runner, capture)
    assert after["skip"] - before.get("skip", 0) == stats.skipped
    assert after["tail"] - before.get("tail", 0) == stats.computed


@pytest.mark.parametrize("case", ["generate", "cfg"])
def test_under_graphs_a_threshold_between_the_changes_gives_the_eager_caches_mixed_pattern(setup, case):
    """A threshold at the median of the eager cache's relative changes computes some calls after the first and skips
    others; the graphs must take every decision the same way (and with true CFG, per branch: a shared reference
    between the two branches would change the relative changes the host reads)."""
    pipe, cache, runner, _, _ = setup
    _, probe = _request(pipe, cache, case, 1e-12)
    threshold = float(np.median(probe.diffs))
    eager, eager_stats = _request(pipe, cache, case, threshold)
    graphed, stats = _request(pipe, cache, case, threshold, runner)
    n_branches = 2 if case == "cfg" else 1
    assert eager_stats.computed > n_branches and eager_stats.skipped > 0  # a mixed pattern, not all or nothing
    assert (stats.computed, stats.skipped, stats.diffs) == (eager_stats.computed, eager_stats.skipped,
                                                           eager_stats.diffs)
    assert torch.equal(graphed, eager)


def test_true_cfgs_two_branches_get_separate_reference_buffers_and_graphs(setup):
    pipe, cache, runner, _, _ = setup
    _request(pipe, cache, "cfg", HIGH, runner)
    slots = {key[-1] for key in cache._static}
    assert slots == {0, 1}
    buffers = [t.data_ptr() for refs in cache._static.values() for t in (refs.first_residual, refs.remaining_residual)]
    assert len(set(buffers)) == len(buffers)
    pieces = {(key[-2], key[-1]) for key in runner.graphs if key[0] == "first_block_cache"}
    assert {(s, p) for s in (0, 1) for p in ("head", "tail", "skip")} <= pieces


def test_under_graphs_requests_do_not_influence_each_other(setup):
    pipe, cache, runner, _, ref = setup
    a1, sa1 = _request(pipe, cache, "generate", HIGH, runner)
    b, sb = _request(pipe, cache, "generate", 0.0, runner)
    assert sa1.skipped > 0 and sb.skipped == 0
    assert torch.equal(b, ref["generate"])  # A's references did not leak into B
    a2, sa2 = _request(pipe, cache, "generate", HIGH, runner)
    assert torch.equal(a1, a2) and (sa1.computed, sa1.skipped, sa1.diffs) == (sa2.computed, sa2.skipped, sa2.diffs)
    # between requests the static reference buffers hold nothing of the last one, and no session state is left
    assert cache._static and all(not t.any() for refs in cache._static.values()
                                 for t in (refs.first_residual, refs.remaining_residual))
    assert not cache.active
    # the first call of every request computes: its branch has no reference of this request yet
    with torch.inference_mode(), cache.session(HIGH) as stats, _graphed(pipe, runner):
        pipe(**gen_kwargs(num_inference_steps=1))
    assert (stats.computed, stats.skipped) == (1, 0)


def test_outside_a_session_the_runner_replays_the_uncached_whole_step_graph(setup):
    pipe, cache, runner, _, ref = setup
    with torch.inference_mode(), _graphed(pipe, runner):
        out = pipe(**CASES["generate"]()).images
    assert torch.equal(out, ref["generate"])
    assert any(key[0] != "first_block_cache" for key in runner.graphs)


def _two_double_blocks() -> FluxTransformer2DModel:
    torch.manual_seed(0)
    return FluxTransformer2DModel(patch_size=1, in_channels=16, num_layers=2, num_single_layers=1,
                                  attention_head_dim=16, num_attention_heads=2, joint_attention_dim=32,
                                  pooled_projection_dim=32, guidance_embeds=True, axes_dims_rope=(4, 6, 6)).eval()


def test_under_graphs_the_reference_is_refreshed_only_on_computed_calls_on_a_controlled_drift():
    """test_first_block_cache's controlled drift, through the graphs: the first block's residual is c x a fixed
    pattern, c read from a tensor the test updates in place (a graph reads it at its address, as it would on the
    GPU). With threshold 0.12 the calls go computed / skipped as "CssCssCs", as with the eager cache."""
    t = _two_double_blocks()
    pattern = torch.randn(1, 16, 32)
    c = torch.ones(())

    def controlled(hidden_states, encoder_hidden_states, temb, image_rotary_emb=None, joint_attention_kwargs=None):
        return encoder_hidden_states, hidden_states + c * pattern

    t.transformer_blocks[0].forward = controlled
    kw = dict(hidden_states=torch.randn(1, 16, 16), encoder_hidden_states=torch.randn(1, 5, 32),
              pooled_projections=torch.randn(1, 32), timestep=torch.tensor([0.7]), img_ids=torch.rand(16, 3) * 4,
              txt_ids=torch.zeros(5, 3), guidance=torch.tensor([2.5]), return_dict=False)
    cache = FirstBlockCache(t)
    runner = CudaGraphTransformer(t, pool=object(), capture=RecordedCapture())
    patterns, outputs = {}, {}
    try:
        for name, call in (("eager", lambda: t(**kw)[0]), ("graphs", lambda: runner(**kw)[0])):
            with torch.inference_mode(), cache.session(0.12) as stats:
                decisions, outs = [], []
                for k in range(8):
                    c.fill_(1.0 + 0.05 * k)
                    before = stats.computed
                    outs.append(call())
                    decisions.append("C" if stats.computed > before else "s")
            patterns[name], outputs[name] = "".join(decisions), outs
    finally:
        cache.remove()
    assert patterns == {"eager": "CssCssCs", "graphs": "CssCssCs"}
    assert all(torch.equal(a, b) for a, b in zip(outputs["eager"], outputs["graphs"]))


def test_the_recorded_graph_refuses_a_static_input_replaced_instead_of_copied_into():
    static = {"x": torch.ones(3)}
    graph, out = RecordedCapture(warmups=0)(lambda s: s["x"] * 2, static, None)
    static["x"].copy_(torch.full((3,), 5.0))
    graph.replay()
    assert torch.equal(out, torch.full((3,), 10.0))  # the result is in the captured output tensor
    static["x"] = torch.zeros(3)  # a real graph would go on reading the old tensor
    with pytest.raises(RuntimeError, match="replaced instead of copied"):
        graph.replay()
    assert isinstance(graph, RecordedGraph)


def test_host_side_work_sees_a_capture_during_a_recorded_capture_and_replay_only():
    seen = []
    graph, _ = RecordedCapture(warmups=1)(lambda s: seen.append(capturing()) or s * 1, torch.ones(1), None)
    graph.replay()
    assert seen == [False, True, True] and not capturing()  # warm-up, capture, replay


# ---- through the service: the request's plan, the report, the threshold per scheduler ---------------------------
REQUEST = dict(prompt="a red car", width=256, height=256, seed=3)


@pytest.fixture(scope="module")
def graphed_service(cache_dir):
    """The tiny service with the modulation table, the cache and DPM-Solver++ prepared, and CUDA graphs "prepared"
    with the recorded capture strategy (capture needs CUDA)."""
    from kontext_server.service import FluxService, ServiceConfig

    svc = FluxService(ServiceConfig(model="tiny", device="cpu", cache_dir=cache_dir,
                                    optimizations="modulation_table,first_block_cache,dpm_solver"))
    svc.load()
    graphs = svc.registry["cuda_graphs"]
    graphs.capture = RecordedCapture()
    graphs.pool = graphs.capture.new_pool()
    svc._set_prepared({**svc.prepared, "cuda_graphs": "test: recorded capture"})
    return svc


def _generate(svc, **flags):
    from kontext_server.request import InferenceRequest

    return svc.generate(InferenceRequest(**REQUEST, **flags), output_type="latent")


def test_a_request_gets_dpm_solver_graphs_and_the_cache_together_with_the_eager_caches_steps(graphed_service):
    fast = dict(use_dpm_solver=True, use_first_block_cache=True, cache_threshold=HIGH)
    eager = _generate(graphed_service, **fast, use_cuda_graphs=False)
    first = _generate(graphed_service, **fast, use_cuda_graphs=True)
    assert all(first.optimizations[n].applied for n in ("dpm_solver", "first_block_cache", "cuda_graphs"))
    assert "cold_start" in first.timings_ms  # the shape's warm-up captured the head, tail and skip graphs
    runner = graphed_service.registry["cuda_graphs"].transformers["exact"]
    captured = len(runner.graphs)
    again = _generate(graphed_service, **fast, use_cuda_graphs=True)
    assert "cold_start" not in again.timings_ms and len(runner.graphs) == captured  # nothing captured on its time
    assert first.steps == 14 and first.steps_skipped > 0
    for res in (first, again):
        assert (res.steps_computed, res.steps_skipped) == (eager.steps_computed, eager.steps_skipped)
        assert torch.equal(res.latents, eager.latents)
    detail = first.optimizations["first_block_cache"].detail
    assert "threshold 10 (the request's)" in detail and "captured graphs" in detail
    assert "captured graphs" not in eager.optimizations["first_block_cache"].detail


def test_under_graphs_a_request_without_the_cache_after_one_with_it_is_the_uncached_output(graphed_service):
    plain = _generate(graphed_service, use_dpm_solver=True, use_cuda_graphs=False)
    _generate(graphed_service, use_dpm_solver=True, use_first_block_cache=True, cache_threshold=HIGH,
              use_cuda_graphs=True)
    after = _generate(graphed_service, use_dpm_solver=True, use_cuda_graphs=True)
    assert after.steps_skipped == 0 and after.cache_threshold is None
    torch.testing.assert_close(after.latents, plain.latents, rtol=0, atol=1e-5)


@pytest.mark.parametrize("dpm,expected,name", [(False, 0.12, "Euler"), (True, 0.24, "DPM-Solver++")])
def test_the_default_threshold_follows_the_scheduler_and_is_reported(graphed_service, dpm, expected, name):
    res = _generate(graphed_service, steps=4, use_dpm_solver=dpm, use_first_block_cache=True, use_cuda_graphs=True)
    assert res.cache_threshold == expected
    assert f"threshold {expected:g} (the {name} default)" in res.optimizations["first_block_cache"].detail
    given = _generate(graphed_service, steps=4, use_dpm_solver=dpm, use_first_block_cache=True, cache_threshold=0.05)
    assert given.cache_threshold == 0.05 and "(the request's)" in given.optimizations["first_block_cache"].detail


# ---- the stage table's cache row -------------------------------------------------------------------------------
def test_the_stage_tables_cache_row_reports_its_threshold_and_its_fidelity_against_the_uncached_row():
    from types import SimpleNamespace

    from kontext_server.benchmark import report
    from kontext_server.benchmark.stages import stage_plan
    from kontext_server.benchmark.timing import finish_rows

    five_c = next(s for s in stage_plan() if s.name == "5c")
    assert five_c.flags["use_first_block_cache"] and five_c.flags["use_cuda_graphs"] and five_c.flags["use_mxfp4"]
    assert five_c.flags["use_dpm_solver"] and "cache_threshold" not in five_c.flags  # the scheduler's default

    def row(stage, latents, image, computed, skipped, threshold):
        result = SimpleNamespace(images=[image], latents=latents)
        t = dict(text_encode=1.0, image_encode=1.0, transformer=14.0, transformer_per_step=1.0, vae_decode=1.0,
                 glue=1.0, total=18.0)
        return {"stage": stage, "label": stage, "timings_ms": t, "total_min_ms": 17.0, "total_max_ms": 19.0,
                "steps": 14, "steps_computed": computed, "steps_skipped": skipped, "cache_threshold": threshold,
                "peak_memory_gib": None, "cold_start_ms": 0.0, "_result": result}

    image = np.zeros((8, 8, 3), dtype=np.float32)
    rows = [row("5", torch.ones(4), image, 14, 0, None), row("5c", torch.full((4,), 1.5), image + 0.5, 9, 5, 0.24)]
    finish_rows(rows)
    assert rows[1]["fidelity_vs_uncached"] == {"stage": "5", "psnr_db": 6.02, "max_abs_latent_diff": 0.5,
                                               "rel_latent_error": 0.5}
    assert "fidelity_vs_uncached" not in rows[0]
    md = report.to_markdown({"rows": rows})
    assert "| 9/5 @0.24 |" in md and "| 14/0 |" in md
    assert "vs 5 (uncached): psnr_db=6.02, max_abs_latent_diff=0.5, rel_latent_error=0.5" in md
