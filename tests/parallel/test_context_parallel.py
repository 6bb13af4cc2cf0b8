"""Context parallelism on CPU: rank 0 in this process, rank 1 a spawned process, gloo, the tiny model (Ulysses 2;
ring attention needs CUDA tensors: tests/gpu/test_context_parallel_gpu.py).

Tolerance: images (float, 0..1) within 1e-4 of one process: the split changes only the order of float additions
(seen: ~2e-6)."""
from __future__ import annotations

import numpy as np
import pytest
import torch
from PIL import Image

from kontext_server import engine as eng
from kontext_server.parallel.adapter import chunk_sizes, key_mask, ring_problem
from kontext_server.request import InferenceRequest

TOLERANCE = 1e-4
OPTS = "qkv_fusion,channels_last,modulation_table,first_block_cache,dpm_solver"
FAIL_MARK = "fail-on-rank-1"


@pytest.fixture(scope="module")
def services(cache_dir):
    """(two-rank service, one-process service) with the same optimisations prepared."""
    from kontext_server.parallel.service import ParallelService
    from kontext_server.service import FluxService, ServiceConfig

    mp = pytest.MonkeyPatch()
    mp.setenv("FLUX_CP_FAIL_AT", f"1:{FAIL_MARK}")  # read by both ranks; only rank 1 fails such a prompt
    threads = torch.get_num_threads()
    cp = ParallelService(ServiceConfig(model="tiny", device="cpu", cache_dir=cache_dir, optimizations=OPTS,
                                       context_parallel=2, cp_timeout=60))
    try:
        cp.load()
        one = FluxService(ServiceConfig(model="tiny", device="cpu", cache_dir=cache_dir, optimizations=OPTS))
        one.load()
        yield cp, one
    finally:
        cp.close()
        mp.undo()
        torch.set_num_threads(threads)


def _both(services, req, image=None):
    cp, one = services
    a = cp.generate(req, image, output_type="np")
    b = one.generate(req, image, output_type="np")
    return a, b, float(np.abs(np.asarray(a.images[0]) - np.asarray(b.images[0])).max())


def test_text_to_image_on_two_ranks_matches_one_process_with_an_odd_token_count(services):
    # 272x272: 17 x 17 = 289 image tokens, which do not divide by 2: padded to 290, the pad masked out
    req = InferenceRequest(prompt="a red car", width=272, height=272, steps=2, seed=3)
    a, b, diff = _both(services, req)
    assert diff < TOLERANCE
    assert a.parallel["degree"] == 2 and a.parallel["ulysses"] == 2 and a.parallel["ring"] == 1
    assert a.parallel["padded_tokens"] == {"text": 0, "image": 1}


def test_an_edit_on_two_ranks_matches_one_process(services):
    image = Image.new("RGB", (256, 256), (200, 30, 30))
    for x in range(0, 256, 8):
        image.putpixel((x, (x * 7) % 256), (0, 0, 255))
    req = InferenceRequest(prompt="make it blue", width=256, height=256, steps=2, seed=4, use_dpm_solver=True)
    a, b, diff = _both(services, req, image)
    assert diff < TOLERANCE
    assert a.optimizations["dpm_solver"].applied and a.optimizations["modulation_table"].applied


def test_the_first_block_cache_skips_the_same_steps_on_both_ranks_and_as_one_process(services):
    req = InferenceRequest(prompt="a red car", width=256, height=256, steps=8, seed=3, use_first_block_cache=True,
                           cache_threshold=0.5)
    a, b, diff = _both(services, req)
    assert a.steps_skipped > 0  # the threshold makes it skip: otherwise this would test nothing
    ranks = a.parallel["ranks"]
    assert ranks["0"] == ranks["1"] == {"steps_computed": b.steps_computed, "steps_skipped": b.steps_skipped}
    assert diff < TOLERANCE


def test_a_failure_on_rank_1_fails_the_request_on_rank_0_and_the_next_request_succeeds(services):
    cp, _ = services
    with pytest.raises(eng.EngineError) as info:
        cp.generate(InferenceRequest(prompt=f"a car {FAIL_MARK}", width=256, height=256, steps=3, seed=1))
    assert info.value.status == 503 and info.value.code == "context_parallel_failed"
    assert "rank 1" in str(info.value) and "injected failure" in str(info.value)
    assert cp.state == "ready"
    res = cp.generate(InferenceRequest(prompt="a car", width=256, height=256, steps=2, seed=1))
    assert res.parallel["ranks"]["1"]["steps_computed"] == 2


def test_a_cancel_on_rank_0_ends_the_job_on_both_ranks_and_the_next_request_succeeds(services):
    cp, _ = services
    calls = []

    def should_stop():
        calls.append(1)
        return eng.Cancelled("client gone") if len(calls) == 2 else None

    with pytest.raises(eng.Cancelled):
        cp.generate(InferenceRequest(prompt="a car", width=256, height=256, steps=4, seed=1), should_stop=should_stop)
    res = cp.generate(InferenceRequest(prompt="a car", width=256, height=256, steps=2, seed=1))
    assert res.steps == 2


def test_health_reports_the_degree_the_split_and_each_rank(services):
    cp, _ = services
    info = cp.health()
    assert info["status"] == "ready"
    assert info["context_parallel"] == {"degree": 2, "ulysses": 2, "ring": 1, "backend": "gloo",
                                        "ranks": {"1": {"state": "alive", "pid": cp.group.processes[1].pid}}}
    assert info["optimizations"]["cuda_graphs"]["detail"]  # says why (CPU here)


def test_the_key_mask_hides_the_padding_in_the_order_ulysses_gathers_the_keys():
    assert chunk_sizes(289, 2) == (145, 1) and chunk_sizes(512, 4) == (128, 0)
    # 2 ranks; text 3 tokens (2 per rank: one pad), image 5 (3 per rank: one pad): rank 0 [t t | i i i], rank 1
    # [t pad | i i pad]
    mask = key_mask(2, 3, 2, 5, 3, "cpu").flatten().tolist()
    assert mask == [True, True, True, True, True, True, False, True, True, False]


def test_ring_attention_refuses_token_counts_that_would_need_padding():
    assert ring_problem(2, 1, 512, 289) is None  # Ulysses only: padded and masked
    assert ring_problem(4, 2, 512, 4096) is None  # divides
    assert "ring degree 2" in ring_problem(4, 2, 512, 3969)


def test_last_a_rank_that_dies_makes_the_service_not_ready_within_seconds(services):
    # Last in this module: it ends the group the tests above share.
    import os
    import signal
    import time

    cp, _ = services
    os.kill(cp.group.processes[1].pid, signal.SIGKILL)
    deadline = time.monotonic() + 20
    while cp.state == "ready" and time.monotonic() < deadline:
        time.sleep(0.1)
    assert cp.state == "failed" and "rank 1 exited" in cp.error
    rank = cp.health()["context_parallel"]["ranks"]["1"]
    assert rank["state"] == "lost" and "exit code -9" in rank["detail"]
    with pytest.raises(eng.EngineError, match="cannot run requests"):
        cp.generate(InferenceRequest(prompt="a car", width=256, height=256, steps=2, seed=1))
