"""A failure inside a transformer call on rank 1 (the other rank waits in the attention's collective): the request
fails after the collective timeout, never hangs, and the group is reported broken (/health 503 `failed`)."""
from __future__ import annotations

import time

import pytest

from kontext_server import engine as eng
from kontext_server.request import InferenceRequest

TIMEOUT_S = 5


def test_a_failure_inside_a_call_on_rank_1_times_out_fails_the_request_and_marks_the_group_broken(cache_dir):
    from kontext_server.parallel.service import ParallelService
    from kontext_server.service import ServiceConfig

    mp = pytest.MonkeyPatch()
    mp.setenv("FLUX_CP_FAIL_AT", "1:break-inside:inside")
    cp = ParallelService(ServiceConfig(model="tiny", device="cpu", cache_dir=cache_dir, optimizations="none",
                                       context_parallel=2, cp_timeout=TIMEOUT_S))
    try:
        cp.load()
        assert cp.generate(InferenceRequest(prompt="fine", width=256, height=256, steps=2, seed=1)).steps == 2
        t0 = time.monotonic()
        with pytest.raises(eng.EngineError) as info:
            cp.generate(InferenceRequest(prompt="break-inside", width=256, height=256, steps=2, seed=1))
        took = time.monotonic() - t0
        assert info.value.code == "context_parallel_failed" and "broken" in str(info.value)
        assert "rank 1" in str(info.value) and "injected failure" in str(info.value)
        assert took < TIMEOUT_S + 30  # bounded by the collective timeout, not a hang
        assert cp.state == "failed" and "broken" in cp.health()["context_parallel"]
        with pytest.raises(eng.EngineError, match="cannot run requests"):
            cp.generate(InferenceRequest(prompt="fine", width=256, height=256, steps=2, seed=1))
    finally:
        cp.close()
        mp.undo()
