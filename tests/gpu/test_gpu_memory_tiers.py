"""`--memory-budget` on a GPU (marked `gpu`; skipped without CUDA): the stream paths a CPU cannot run.

    python -m pytest -q -m gpu tests/gpu/test_gpu_memory_tiers.py -s

The tiny model placed as the full model would be at 16 GB (its sizes taken from the full configs' meta build, as
tests/service/test_memory_budget.py does on a CPU): the fp8 copy quantised linear by linear on the GPU from host
weights and kept resident with its modulation weights on the host, T5 and the exact transformer streamed with CUDA
streams. Streaming copies weights bit for bit, so each tier's image should equal the unbudgeted service's; the test
allows one 8-bit level, since the unbudgeted one replays CUDA graphs (bit-identical to eager where tested) where the
tier runs eager, and prints the difference.
"""
from __future__ import annotations

import numpy as np
import pytest
import torch

from kontext_server.request import InferenceRequest

pytestmark = pytest.mark.gpu
OPTS = "qkv_fusion,channels_last,attention,low_precision,modulation_table,dpm_solver,cuda_graphs"


def _service(cache_dir, budget=None):
    from kontext_server.service import FluxService, ServiceConfig

    svc = FluxService(ServiceConfig(model="tiny", device="cuda", cache_dir=cache_dir, optimizations=OPTS,
                                    memory_budget=budget))
    svc.load()
    return svc


@pytest.fixture(scope="module")
def services(cache_dir):
    from kontext_server.service import memory_sizes

    plain = _service(cache_dir)
    measure = memory_sizes.measure
    with pytest.MonkeyPatch.context() as mp:
        mp.setattr(memory_sizes, "measure", lambda pipe, fp8, warmup_sizes=(): measure(
            memory_sizes.meta_pipeline(), fp8, warmup_sizes))
        tiered = _service(cache_dir, "16GB")
    return plain, tiered


def test_the_16gb_tier_streams_with_cuda_streams_and_keeps_the_fp8_copy_on_the_gpu(services):
    _, tiered = services
    tier = tiered.health()["memory_tier"]
    assert tier["placements"]["transformer_fp8"]["where"] == "resident"
    assert tier["placements"]["transformer_fp8"].get("modulation_on_host")
    assert tier["placements"]["transformer"]["where"] == "offloaded" and tier["applied"]["streams"] is True
    fp8 = tiered.transformer_variants["fp8"]
    assert all(t.device.type == "cuda" for t in [*fp8.parameters(), *fp8.buffers()])
    exact = tiered.transformer_variants["exact"]
    assert all(p.device.type == "cpu" for p in exact.parameters())  # offloaded between calls
    # the streamed blocks wait in pinned memory (diffusers streams only those; the rest moves without a stream)
    assert all(p.is_pinned() for p in exact.transformer_blocks.parameters())


@pytest.mark.parametrize("flags", [{}, {"use_mxfp4": True, "use_dpm_solver": True}], ids=["exact", "fast"])
def test_a_tiered_service_makes_the_same_image_as_an_unbudgeted_one(services, flags):
    plain, tiered = services
    req = InferenceRequest(prompt="a red car", width=256, height=256, steps=4, seed=5, **flags)
    for _ in range(2):  # the first call traces the execution order for prefetching; the second prefetches
        a = plain.generate(req, output_type="np")
        b = tiered.generate(req, output_type="np")
        diff = float(np.abs(a.images[0] - b.images[0]).max())
        print(f"{list(flags) or 'exact'}: largest pixel difference {diff}")
        assert diff <= 1 / 255
    assert b.memory_tier["transformer_offloaded"] == (not flags)
    assert b.optimizations["cuda_graphs"].applied == bool(flags)  # graphs only on the resident fp8 copy
    torch.cuda.synchronize()
