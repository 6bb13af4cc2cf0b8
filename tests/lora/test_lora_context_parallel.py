"""LoRA adapters under context parallelism (CPU, gloo, 2 ranks, tiny): every rank applies the request's adapters, so
the split request gives the one-process image with the same adapters, and a request without them the base image."""
from __future__ import annotations

import numpy as np
import pytest
import torch

from kontext_server.request import InferenceRequest, LoraSpec

TOLERANCE = 1e-4  # as tests/parallel: the split changes only the order of float additions


@pytest.fixture(scope="module")
def services(cache_dir, lora_dir):
    from kontext_server.parallel.service import ParallelService
    from kontext_server.service import FluxService, ServiceConfig

    threads = torch.get_num_threads()
    config = dict(model="tiny", device="cpu", cache_dir=cache_dir, optimizations="qkv_fusion,modulation_table",
                  compile_vae=False, lora_dir=lora_dir, lora_max_rank=8)
    cp = ParallelService(ServiceConfig(**config, context_parallel=2, cp_timeout=60))
    try:
        cp.load()
        one = FluxService(ServiceConfig(**config))
        one.load()
        yield cp, one
    finally:
        cp.close()
        torch.set_num_threads(threads)


def image(svc, loras=()):
    req = InferenceRequest(prompt="a red car", width=256, height=256, steps=2, seed=3,
                           loras=[LoraSpec(name=n, scale=s) for n, s in loras])
    res = svc.generate(req, None, output_type="np")
    return np.asarray(res.images[0]), res


def test_a_split_request_runs_its_adapters_on_every_rank_and_matches_one_process(services):
    cp, one = services
    split, res = image(cp, [("shared", 0.5)])
    alone, _ = image(one, [("shared", 0.5)])
    base, _ = image(one)
    assert res.loras == [{"name": "shared", "scale": 0.5, "rank": 4}] and res.parallel["degree"] == 2
    assert np.abs(split - alone).max() < TOLERANCE
    assert np.abs(split - base).max() > 10 * TOLERANCE  # the adapter changes the image (6e-3 seen): a rank without
    # it would leave its half of the tokens unchanged, far outside TOLERANCE of `alone`
    after, _ = image(cp)  # no adapter afterwards: the base image again, on both ranks
    assert np.abs(after - base).max() < TOLERANCE
