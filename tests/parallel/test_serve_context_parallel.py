"""`serve --context-parallel 2` end to end: one command starts both ranks (CPU, gloo); /health and responses report
the split; a rank that dies makes /health 503 within seconds; SIGTERM stops every rank."""
from __future__ import annotations

import os
import signal
import time

import httpx

from tests.helpers import LiveServer, png_b64


def _alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    return True


def test_serve_with_two_ranks_answers_reports_the_split_and_stops_both(cache_dir):
    with LiveServer(cache_dir, "--context-parallel", "2") as server:
        health = httpx.get(server.url + "/health", timeout=10).json()
        cp = health["context_parallel"]
        assert (cp["degree"], cp["ulysses"], cp["ring"], cp["backend"]) == (2, 2, 1, "gloo")
        follower = cp["ranks"]["1"]["pid"]
        assert cp["ranks"]["1"]["state"] == "alive" and _alive(follower)
        r = httpx.post(server.url + "/inference", timeout=120,
                       json={"prompt": "make it blue", "width": 256, "height": 256, "steps": 2, "seed": 1,
                             "image": png_b64()})
        assert r.status_code == 200, r.text
        body = r.json()
        assert body["context_parallel"]["degree"] == 2 and body["context_parallel"]["ulysses"] == 2
        assert body["context_parallel"]["ranks"]["1"]["steps_computed"] == 2

        os.kill(follower, signal.SIGKILL)  # a rank lost: rank 0 notices, reports not ready, refuses work
        deadline = time.monotonic() + 20
        while time.monotonic() < deadline:
            h = httpx.get(server.url + "/health", timeout=10)
            if h.status_code == 503:
                break
            time.sleep(0.2)
        assert h.status_code == 503, h.text
        assert h.json()["context_parallel"]["ranks"]["1"]["state"] == "lost"
        r = httpx.post(server.url + "/inference", timeout=30,
                       json={"prompt": "a car", "width": 256, "height": 256, "steps": 2})
        assert r.status_code == 503 and r.json()["error"] == "not_ready"
        assert server.stop() == 0
    assert not _alive(follower)


def test_serve_stops_every_rank_on_sigterm(cache_dir):
    with LiveServer(cache_dir, "--context-parallel", "2") as server:
        follower = httpx.get(server.url + "/health", timeout=10).json()["context_parallel"]["ranks"]["1"]["pid"]
        assert server.stop() == 0
    deadline = time.monotonic() + 15
    while _alive(follower) and time.monotonic() < deadline:
        time.sleep(0.2)
    assert not _alive(follower)
