"""The Ray measurement tools' requests are the server's own: each workload validates as an InferenceRequest, the
fast tier asks for what the stage table's fast tier runs, and each warm-up spec parses (no cluster, no server)."""
from __future__ import annotations

import pytest

import ray_replicas_bench  # tools/ (pytest.ini's pythonpath)
import ray_serve_bench
from kontext_server.request import InferenceRequest, parse_warmup_sizes
from utils import decode_image


@pytest.mark.parametrize("name", ["edit-512-fast", "edit-512-exact", "edit-256"])
def test_each_workload_is_a_valid_request_at_its_warm_up_shape(name):
    payload, warmup = ray_replicas_bench.workload(name)
    req = InferenceRequest(**payload)
    (w, h, edit), = parse_warmup_sizes(warmup)
    assert (req.width, req.height) == (w, h) and edit and decode_image(req.image).size == (w, h)


def test_the_fast_tier_asks_for_fp8_dpm_solver_and_cuda_graphs_at_their_default_steps():
    req = InferenceRequest(**ray_replicas_bench.workload("edit-512-fast")[0])
    assert req.use_mxfp4 and req.use_dpm_solver and req.use_cuda_graphs and req.steps is None
    exact = InferenceRequest(**ray_replicas_bench.workload("edit-512-exact")[0])
    assert not (exact.use_mxfp4 or exact.use_dpm_solver) and exact.steps is None


def test_the_cpu_benchmarks_request_is_valid():
    InferenceRequest(**ray_serve_bench.PAYLOAD)
