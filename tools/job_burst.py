#!/usr/bin/env python
"""A burst of asynchronous jobs against a bounded queue: every job ends Ready or was refused (429) at submit, none is
lost, and the store is empty again after the TTL.

    python tools/job_burst.py --jobs 500 --clients 20 --max-queue 64 --json-out burst.json

Starts `serve --model tiny` on loopback with its own data directory, `--max-queue`, a short `--result-ttl` and a
1 s sweep. Then:
1. burst: `--clients` concurrent clients submit `--jobs` jobs in all, back to back (a 429 is that job's final
   outcome: not resent; the client goes on with its next job at once);
2. drain: every accepted id is polled until it is Ready or Error;
3. expiry: after the TTL (+ two sweeps), every accepted id must answer `Task not found`, `/metrics`' flux_jobs must be 0
   for every status and the data directory's outputs/ must hold no file.
Accounting: submitted = accepted + rejected (429) + failed (anything else: must be 0); accepted = ready + error;
lost (an accepted id that never reached Ready / Error, or answered Task not found before its TTL) must be 0.
Exit status 0 when failed == lost == error == 0 and the store is empty after the TTL.
"""
from __future__ import annotations

import argparse
import asyncio
import json
import re
import sys
import tempfile
import time
from pathlib import Path

import httpx

from load_test import ServerProcess

PAYLOAD = {"prompt": "a red car", "width": 256, "height": 256, "steps": 1, "output_format": "png"}


async def burst(url: str, jobs: int, clients: int) -> dict:
    counter = iter(range(jobs))
    accepted: list[str] = []
    outcomes = {"accepted": 0, "rejected": 0, "failed": 0}
    failures: list[str] = []
    retry_after: list[float] = []

    async def client(http: httpx.AsyncClient):
        for n in counter:
            try:
                r = await http.post("/v1/flux-kontext-dev", json={**PAYLOAD, "seed": n})
            except httpx.HTTPError as exc:
                outcomes["failed"] += 1
                failures.append(f"{type(exc).__name__}: {exc}")
                continue
            if r.status_code == 200 and r.json().get("id"):
                outcomes["accepted"] += 1
                accepted.append(r.json()["id"])
            elif r.status_code == 429 and "detail" in r.json() and r.headers.get("retry-after"):
                outcomes["rejected"] += 1
                retry_after.append(float(r.headers["retry-after"]))
            else:
                outcomes["failed"] += 1
                failures.append(f"{r.status_code}: {r.text[:200]}")

    t0 = time.perf_counter()
    async with httpx.AsyncClient(base_url=url, timeout=60, limits=httpx.Limits(max_connections=clients)) as http:
        await asyncio.gather(*(client(http) for _ in range(clients)))
    return {"submitted": jobs, **outcomes, "burst_s": round(time.perf_counter() - t0, 3), "ids": accepted,
            "failures": failures[:20], "retry_after_median_s": sorted(retry_after)[len(retry_after) // 2]
            if retry_after else None}


def drain(url: str, ids: list[str], timeout: float) -> dict:
    final: dict[str, str] = {}
    progress_went_back = 0
    last: dict[str, float] = {}
    deadline = time.monotonic() + timeout
    with httpx.Client(base_url=url, timeout=60) as http:
        while len(final) < len(ids) and time.monotonic() < deadline:
            for job in ids:
                if job in final:
                    continue
                body = http.get("/v1/get_result", params={"id": job}).json()
                if body["progress"] is not None:
                    if body["progress"] < last.get(job, 0.0):
                        progress_went_back += 1
                    last[job] = body["progress"]
                if body["status"] != "Pending":
                    final[job] = body["status"]
            time.sleep(0.2)
    counts: dict[str, int] = {}
    for status in final.values():
        counts[status] = counts.get(status, 0) + 1
    return {"final": counts, "unfinished": len(ids) - len(final), "progress_went_back": progress_went_back}


def store_after_ttl(url: str, ids: list[str], data_dir: Path, wait_s: float) -> dict:
    time.sleep(wait_s)
    with httpx.Client(base_url=url, timeout=60) as http:
        still = sum(1 for j in ids if http.get("/v1/get_result", params={"id": j}).json()["status"] != "Task not found")
        metrics = http.get("/metrics").text
    gauges = {m.group(1): float(m.group(2)) for m in re.finditer(r'^flux_jobs\{status="(\w+)"\} (\S+)$', metrics, re.M)}
    files = [p.name for p in (data_dir / "outputs").iterdir() if not p.name.startswith(".")]
    return {"ids_still_answered": still, "flux_jobs": gauges, "output_files": len(files),
            "db_bytes": (data_dir / "jobs.sqlite3").stat().st_size}


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--jobs", type=int, default=500)
    p.add_argument("--clients", type=int, default=20)
    p.add_argument("--max-queue", type=int, default=64)
    p.add_argument("--ttl", type=float, default=30.0, help="the server's --result-ttl (seconds)")
    p.add_argument("--cache-dir", help="the server's cache directory (tiny model)")
    p.add_argument("--json-out")
    a = p.parse_args(argv)
    data_dir = Path(tempfile.mkdtemp(prefix="flux-burst-data-"))
    server = ServerProcess(extra=["--data-dir", str(data_dir), "--result-ttl", str(a.ttl), "--sweep-interval", "1",
                                  "--drain-seconds", "0"], cache_dir=a.cache_dir, max_queue=a.max_queue)
    try:
        server.wait_ready(300)
        b = asyncio.run(burst(server.url, a.jobs, a.clients))
        d = drain(server.url, b["ids"], timeout=600)
        lost = d["unfinished"]
        t_last = time.monotonic()
        e = store_after_ttl(server.url, b["ids"], data_dir, a.ttl + 2.5)
        e["waited_s"] = round(time.monotonic() - t_last, 1)
    finally:
        server.stop()
    report = {"jobs": a.jobs, "clients": a.clients, "max_queue": a.max_queue, "ttl_s": a.ttl, "payload": PAYLOAD,
              "burst": {k: v for k, v in b.items() if k != "ids"}, "drain": d, "lost": lost, "after_ttl": e}
    ok = (b["failed"] == 0 and lost == 0 and d["final"].get("Error", 0) == 0
          and b["accepted"] + b["rejected"] == a.jobs and d["final"].get("Ready", 0) == b["accepted"]
          and e["ids_still_answered"] == 0 and e["output_files"] == 0 and not any(e["flux_jobs"].values()))
    report["ok"] = ok
    text = json.dumps(report, indent=1)
    if a.json_out:
        Path(a.json_out).write_text(text + "\n")
    print(text)
    return 0 if ok else 1


if __name__ == "__main__":
    sys.exit(main())
