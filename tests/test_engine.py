"""kontext_server/engine.py: the bound of the queue, the Retry-After rule and what an out-of-memory job leaves
behind, checked on the engine itself with jobs whose duration the test controls."""
from __future__ import annotations

import gc
import threading
import time
import weakref

import pytest
import torch

from kontext_server import engine as eng


class Gate:
    """A job function that blocks until released (or sleeps a given time), so the test controls what runs."""

    def __init__(self):
        self.release = threading.Event()
        self.started = threading.Event()

    def __call__(self, job):
        self.started.set()
        if job.payload == "block":
            assert self.release.wait(10)
        elif isinstance(job.payload, float):
            time.sleep(job.payload)
        return job.payload


@pytest.fixture
def gate():
    g = Gate()
    yield g
    g.release.set()


def test_exactly_max_queue_jobs_wait_beside_the_running_one(gate):
    engine = eng.Engine(gate, max_queue=2)
    engine.start()
    try:
        running = engine.submit("block")
        assert gate.started.wait(5) and engine.in_flight == 1
        waiting = [engine.submit("block"), engine.submit("block")]  # max_queue of them wait
        assert engine.queue_depth == 2
        with pytest.raises(eng.QueueFull):
            engine.submit("block")  # the one beyond the bound
        gate.release.set()
        for job in [running, *waiting]:
            assert job.future.result(5) == "block"
    finally:
        engine.drain(5)


def test_retry_after_is_the_median_recent_job_time_times_the_jobs_ahead(gate):
    engine = eng.Engine(gate, max_queue=4)
    assert engine.retry_after_seconds() == 1  # nothing measured yet: a short wait, not a guess
    engine.start()
    try:
        for d in (1.2, 1.0, 1.4):  # median 1.2 s
            engine.submit(d).future.result(10)
        gate.started.clear()
        engine.submit("block")
        assert gate.started.wait(5)
        engine.submit("block"), engine.submit("block")  # two waiting: a newcomer has three jobs ahead of it
        assert engine.queue_depth == 2
        assert engine.retry_after_seconds() == round(1.2 * 3)
    finally:
        gate.release.set()
        engine.drain(10)


def test_an_out_of_memory_job_answers_503_and_leaves_no_tensor_behind(monkeypatch):
    """After an OOM the engine drops the failed job's tensors before the next job (so that it fits) and frees the
    device's cached blocks: a tensor the job made is gone, and the cache-freeing step ran."""
    freed = []
    monkeypatch.setattr(eng, "free_device_memory", lambda real=eng.free_device_memory: (freed.append(1), real()))
    made = {}

    def run(job):
        big = torch.empty(1 << 20)  # what a generation holds when it runs out of memory
        made["ref"] = weakref.ref(big)
        raise torch.OutOfMemoryError("CUDA out of memory. Tried to allocate 20.00 GiB")

    engine = eng.Engine(run, max_queue=1)
    engine.start()
    try:
        job = engine.submit("x")
        with pytest.raises(eng.OutOfMemory) as exc:
            job.future.result(5)
        assert exc.value.status == 503 and exc.value.__cause__ is None and exc.value.__context__ is None
        gc.collect()
        assert made["ref"]() is None and freed == [1]
    finally:
        engine.drain(5)
