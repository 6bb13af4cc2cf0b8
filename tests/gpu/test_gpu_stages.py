"""The stage table on a GPU (marked `gpu`): every stage's output is finite, the lossless stages match stage 0.

Run on the device machine: `python -m pytest -q -m gpu tests/gpu/test_gpu_stages.py -s` (about 2-3 minutes on an
H200: one regional compile for bf16, one for fp8). Tolerances come from the 2026-11-21 H200 tables in
BENCHMARKS.md (one-step relative error 1.3-1.6% for the lossless stages, end-to-end latent error ~0.5%).
"""
from __future__ import annotations

import math

import pytest

pytestmark = pytest.mark.gpu
LOSSLESS = {"1", "1c", "2"}


@pytest.fixture(scope="module")
def stage_table(cache_dir):
    from kontext_server.benchmark import stages
    from kontext_server.service import FluxService, ServiceConfig

    svc = FluxService(ServiceConfig(model="synthetic-full", device="cuda", optimizations="none", cache_dir=cache_dir))
    svc.load()
    return stages.run_stage_benchmark(svc, "edit-512", runs=1, steps=8)


def test_every_stage_ran_and_is_finite(stage_table):
    rows = {r["stage"]: r for r in stage_table["rows"]}
    assert list(rows) == ["0", "1", "1c", "2", "3", "4", "5", "5c"]
    for name, row in rows.items():
        assert all(math.isfinite(v) and v >= 0 for v in row["timings_ms"].values()), name
        fid = row["fidelity_vs_stage0"]
        assert all(v is None or math.isfinite(v) for v in fid.values() if not isinstance(v, bool)), name
    assert "low_precision" in rows["3"]["applied"] and "cuda_graphs" in rows["5"]["applied"]
    assert rows["4"]["steps"] == 14
    # the cache in the fast tier: applied with the graphs, at the DPM-Solver++ default, against the uncached row
    assert {"first_block_cache", "cuda_graphs", "low_precision", "dpm_solver"} <= set(rows["5c"]["applied"])
    assert rows["5c"]["cache_threshold"] == 0.24 and rows["5c"]["fidelity_vs_uncached"]["stage"] == "5"
    assert rows["5c"]["steps_computed"] + rows["5c"]["steps_skipped"] == 14
    # every row carries the clocks its timed runs had (nvidia-smi is on every CUDA machine we run on)
    for name, row in rows.items():
        clocks = row["gpu_clocks"]
        assert clocks["samples"] > 0 and 100 < clocks["sm_mhz"]["median"] <= 5000, (name, clocks)


def test_lossless_stages_match_stage0(stage_table):
    for row in stage_table["rows"]:
        if row["stage"] in LOSSLESS:
            assert row["step_rel_error_vs_stage0"] < 0.03, row
            assert row["fidelity_vs_stage0"]["rel_latent_error"] < 0.02, row
