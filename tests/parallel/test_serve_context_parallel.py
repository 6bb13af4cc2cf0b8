"""`serve --context-parallel 2` end to end: one command starts both ranks (CPU, gloo); /health and the response report
the split; SIGTERM stops every rank. (A lost rank: test_context_parallel.py's last test.)"""
from __future__ import annotations

import os
import time

import httpx

from tests.helpers import LiveServer, png_b64


def _alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    return True


def test_serve_with_two_ranks_answers_an_edit_reports_the_split_and_sigterm_stops_both(cache_dir):
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
        r = httpx.post(server.url + "/v1/images/generations", timeout=120,  # the OpenAI report says it too
                       json={"prompt": "a car", "size": "256x256", "steps": 2, "seed": 1})
        assert r.status_code == 200, r.text
        assert r.json()["kontext"]["context_parallel"]["degree"] == 2
        assert server.stop() == 0
    deadline = time.monotonic() + 15
    while _alive(follower) and time.monotonic() < deadline:
        time.sleep(0.2)
    assert not _alive(follower)
