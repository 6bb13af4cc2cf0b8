#!/usr/bin/env python
"""What the asynchronous path adds to a generation: BFL-shaped submit + poll (+ fetching the sample) against the
synchronous /inference route, for the same work, on a live server.

    python tools/async_overhead.py --runs 30 --json-out async_overhead.json

Starts `serve --model tiny` on loopback (its own data directory) unless --url is given. Each round runs the same
request (fixed seed, size, steps, png) both ways, in alternating order (drift hits both alike):
- sync: POST /inference until its answer is parsed (the image arrives base64 in it);
- async: POST /v1/flux-kontext-dev, then GET /v1/get_result every --poll-ms until Ready (`ready_ms`), then GET the
  sample URL (`with_fetch_ms`: the image's bytes in hand, the same point as the sync answer).
Reported: the medians, and the added time (async minus sync) as the median of the per-round differences. Polling
adds up to one poll interval by itself; the figure includes it (what a client polling that fast sees).
On a shared machine the generation's own time varies by far more than 10 ms between two runs of the same request,
which swamps a raw difference. So the tool also reports each request's time outside its generation: the client's
wall time minus the generation time the server reported for that very request (`timings_ms.service_total`), and the
added time as the median of the per-round differences of those (`median_added_outside_generation_*`): the cost of
the path itself (HTTP, queueing, the store, encoding, polling), without the generation's noise.
"""
from __future__ import annotations

import argparse
import json
import statistics
import sys
import tempfile
import time

import httpx

from load_test import ServerProcess

PAYLOAD = {"prompt": "a red car on a mountain road", "width": 256, "height": 256, "steps": 2, "seed": 5,
           "output_format": "png"}


def sync_once(http: httpx.Client) -> tuple[float, float]:
    """(client wall ms, the generation's ms as the server reported it)."""
    t0 = time.perf_counter()
    r = http.post("/inference", json=PAYLOAD)
    r.raise_for_status()
    body = r.json()
    assert body["images"]
    return (time.perf_counter() - t0) * 1000, body["timings_ms"]["service_total"]


def async_once(http: httpx.Client, poll_s: float) -> tuple[float, float, float]:
    t0 = time.perf_counter()
    r = http.post("/v1/flux-kontext-dev", json=PAYLOAD)
    r.raise_for_status()
    job = r.json()["id"]
    while True:
        body = http.get("/v1/get_result", params={"id": job}).json()
        if body["status"] != "Pending":
            break
        time.sleep(poll_s)
    assert body["status"] == "Ready", body
    ready = (time.perf_counter() - t0) * 1000
    sample = http.get(body["result"]["sample"])
    sample.raise_for_status()
    return ready, (time.perf_counter() - t0) * 1000, body["result"]["timings_ms"]["service_total"]


def measure(url: str, runs: int, warmup: int, poll_ms: float) -> dict:
    rows = []
    with httpx.Client(base_url=url, timeout=120) as http:
        for _ in range(warmup):
            sync_once(http)
            async_once(http, poll_ms / 1000)
        for i in range(runs):
            if i % 2 == 0:
                s, s_gen = sync_once(http)
                ready, fetched, a_gen = async_once(http, poll_ms / 1000)
            else:
                ready, fetched, a_gen = async_once(http, poll_ms / 1000)
                s, s_gen = sync_once(http)
            rows.append({"sync_ms": round(s, 3), "async_ready_ms": round(ready, 3),
                         "async_with_fetch_ms": round(fetched, 3), "sync_generation_ms": s_gen,
                         "async_generation_ms": a_gen})
    med = statistics.median
    return {
        "runs": runs, "warmup": warmup, "poll_ms": poll_ms, "payload": PAYLOAD,
        "median_sync_ms": round(med(r["sync_ms"] for r in rows), 3),
        "median_async_ready_ms": round(med(r["async_ready_ms"] for r in rows), 3),
        "median_async_with_fetch_ms": round(med(r["async_with_fetch_ms"] for r in rows), 3),
        "median_added_ready_ms": round(med(r["async_ready_ms"] - r["sync_ms"] for r in rows), 3),
        "median_added_with_fetch_ms": round(med(r["async_with_fetch_ms"] - r["sync_ms"] for r in rows), 3),
        "median_sync_outside_generation_ms": round(med(r["sync_ms"] - r["sync_generation_ms"] for r in rows), 3),
        "median_async_outside_generation_ms": round(med(r["async_with_fetch_ms"] - r["async_generation_ms"]
                                                        for r in rows), 3),
        "median_added_outside_generation_ready_ms": round(med(
            (r["async_ready_ms"] - r["async_generation_ms"]) - (r["sync_ms"] - r["sync_generation_ms"])
            for r in rows), 3),
        "median_added_outside_generation_with_fetch_ms": round(med(
            (r["async_with_fetch_ms"] - r["async_generation_ms"]) - (r["sync_ms"] - r["sync_generation_ms"])
            for r in rows), 3),
        "target_added_ms": 10.0,
        "rows": rows,
    }


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--url", help="a running server (default: start serve --model tiny on loopback)")
    p.add_argument("--cache-dir", help="the started server's cache directory (tiny model)")
    p.add_argument("--runs", type=int, default=30)
    p.add_argument("--warmup", type=int, default=3)
    p.add_argument("--poll-ms", type=float, default=2.0, help="the client's poll interval (default 2 ms)")
    p.add_argument("--json-out")
    a = p.parse_args(argv)
    server = None
    url = a.url
    if url is None:
        data = tempfile.mkdtemp(prefix="flux-overhead-data-")
        server = ServerProcess(extra=["--data-dir", data, "--drain-seconds", "0"], cache_dir=a.cache_dir)
        server.wait_ready(300)
        url = server.url
    try:
        report = measure(url, a.runs, a.warmup, a.poll_ms)
    finally:
        if server is not None:
            server.stop()
    text = json.dumps(report, indent=1)
    if a.json_out:
        with open(a.json_out, "w") as f:
            f.write(text + "\n")
    summary = {k: v for k, v in report.items() if k != "rows"}
    print(json.dumps(summary, indent=1))
    return 0


if __name__ == "__main__":
    sys.exit(main())
