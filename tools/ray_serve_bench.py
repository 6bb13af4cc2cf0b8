#!/usr/bin/env python
"""CPU measurement of the Ray Serve engine against the local server, beside a trivial Ray Serve app, side by side.

    python tools/ray_serve_bench.py --json-out benchmarks/<dir>/run1.json

Everything runs at once on this machine, so that the load of anything else on it falls on all of them alike:

- local:   `flux_kontext_optimized.py serve --model tiny --device cpu` (the local engine: one process, one worker,
           torch's 2 threads);
- ray-1:   the Ray Serve application, 1 replica with num_cpus 2 (so 2 torch threads, as local), at /ray1;
- ray-2:   the same application, 2 replicas with num_cpus 1 each (1 thread each), at /ray2;
- trivial: a two-deployment Ray Serve app (a FastAPI ingress awaiting a model deployment of 2 replicas that returns
           a dict), at /trivial.

The three Ray apps share one local Ray cluster started here (logical CPUs: 4, so that both applications' replicas
fit at once; the machine's cores are what they are) and its HTTP proxy. They are deployed with the builder
`serve --engine ray` uses (kontext_server.serving.ray_serve.app.application), under route prefixes.

Measured, with a fixed small request (--payload):
1. latency at concurrency 1: `--rounds` rounds, each sending one request to every server in turn (the order rotates
   each round), after `--warmup` rounds; client wall time per request;
2. throughput: `--chunks` chunks per model server of `--chunk-requests` requests from `--clients` concurrent clients
   (load_test.py's run_load: every request accounted for), the servers taking turns chunk by chunk; images per minute
   is all accepted requests over all their chunks' wall time.
Derived: the Ray path's added latency per request against the trivial app's whole p50 (Ray's own cost of one HTTP
request through proxy, ingress and a model replica), their ratio (target <= 1.5), and the throughput of 2 replicas
over 1. Ray runs its workers at nice 15 unless told (--ray-worker-niceness 0 runs them at the local server's
priority): on a machine others load, that alone slows the replicas. The added latency is taken around the
generation: each response's own generation time (timings_ms.
service_total) is subtracted from its client wall time, and the Ray path's p50 of that difference minus the local
server's is what Ray adds. (The wall times alone mix in the generation's own speed, which on a shared machine depends
on torch's thread count and the other load more than on the path: both are in the JSON.) The JSON records the load
average around each step: run it more than once.
"""
from __future__ import annotations

import argparse
import asyncio
import json
import os
import platform
import statistics
import subprocess
import sys
import time
from pathlib import Path

import httpx

from kontext_server import settings
from load_test import LoadConfig, ServerProcess, free_port, percentile, run_load

ROOT = Path(__file__).resolve().parents[1]
PAYLOAD = {"prompt": "a red car on a mountain road", "width": 256, "height": 256, "steps": 2, "seed": 0}
LOGICAL_CPUS = 4


def trivial_app():
    """The trivial two-deployment app: FastAPI ingress -> a 2-replica deployment returning a dict."""
    from fastapi import FastAPI
    from ray import serve

    app = FastAPI()

    @serve.deployment(name="TrivialModel", num_replicas=2, ray_actor_options={"num_cpus": 0})
    class Model:
        def __call__(self, body: dict) -> dict:
            return {"ok": True, "seed": body.get("seed")}

    @serve.deployment(name="TrivialIngress", ray_actor_options={"num_cpus": 0})
    @serve.ingress(app)
    class Ingress:
        def __init__(self, model):
            self.model = model

        @app.post("/inference")
        async def infer(self, body: dict) -> dict:
            return await self.model.remote(body)

    return Ingress.bind(Model.bind())


def one_request(client: httpx.Client, url: str, payload: dict) -> tuple[float, float]:
    """(client wall ms, the server's own time for the generation: timings_ms.service_total, 0 for the trivial app)."""
    t0 = time.perf_counter()
    r = client.post(url, json=payload)
    ms = (time.perf_counter() - t0) * 1000
    if r.status_code != 200:
        raise RuntimeError(f"{url}: {r.status_code} {r.text[:300]}")
    return ms, float(r.json().get("timings_ms", {}).get("service_total", 0.0))


def stats(times: list[float]) -> dict:
    return {"n": len(times), "p50_ms": round(statistics.median(times), 2), "p90_ms": round(percentile(times, 90), 2),
            "mean_ms": round(statistics.fmean(times), 2), "min_ms": round(min(times), 2),
            "max_ms": round(max(times), 2)}


def interleaved_latency(targets: dict[str, str], payload: dict, rounds: int, warmup: int) -> dict:
    """Per server: the client's wall time, the generation's own time (service_total) and their difference, the path
    around the generation (HTTP, validation, queue hand-off, transport, encoding): what the engine adds."""
    names = list(targets)
    wall: dict[str, list[float]] = {n: [] for n in names}
    service: dict[str, list[float]] = {n: [] for n in names}
    with httpx.Client(timeout=120) as c:
        for r in range(warmup + rounds):
            order = names[r % len(names):] + names[:r % len(names)]
            for name in order:
                ms, svc = one_request(c, targets[name], payload)
                if r >= warmup:
                    wall[name].append(ms)
                    service[name].append(svc)
    return {n: {"wall": stats(wall[n]), "service": stats(service[n]),
                "path": stats([w - s for w, s in zip(wall[n], service[n])])} for n in names}


def chunked_throughput(bases: dict[str, str], payload: dict, clients: int, chunk: int, chunks: int) -> dict:
    names = list(bases)
    per: dict[str, list[dict]] = {n: [] for n in names}
    for k in range(chunks):
        for name in names[k % len(names):] + names[:k % len(names)]:
            report = asyncio.run(run_load(LoadConfig(url=bases[name], clients=clients, requests=chunk,
                                                     payload=payload, duration_limit=600, request_timeout=300)))
            per[name].append({"accepted": report["accepted"], "rejected": report["rejected"],
                              "failed": report["failed"], "lost": report["lost"], "wall_s": report["wall_s"],
                              "p50_ms": report["latency_ms"]["p50"], "ok": report["ok"],
                              "loadavg_after": loadavg()})
    out = {}
    for name, runs in per.items():
        accepted, wall = sum(r["accepted"] for r in runs), sum(r["wall_s"] for r in runs)
        out[name] = {"images_per_minute": round(accepted * 60 / wall, 1), "accepted": accepted,
                     "wall_s": round(wall, 2), "clients": clients, "all_answered": all(r["ok"] for r in runs),
                     "per_chunk_images_per_minute": [round(r["accepted"] * 60 / r["wall_s"], 1) for r in runs],
                     "chunks": runs}
    return out


def wait_ready(url: str, replicas: int, timeout: float) -> None:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        try:
            r = httpx.get(url + "/health", timeout=5)
            if r.status_code == 200 and r.json().get("replicas", {}).get("ready", 1) >= replicas:
                return
        except httpx.HTTPError:
            pass
        time.sleep(0.3)
    raise TimeoutError(f"{url}: {replicas} replica(s) not ready in {timeout:.0f} s")


def loadavg() -> list[float]:
    return [round(x, 2) for x in os.getloadavg()]


def git_commit() -> str:
    try:
        return subprocess.run(["git", "rev-parse", "HEAD"], cwd=ROOT, capture_output=True, text=True,
                              timeout=10).stdout.strip()
    except (OSError, subprocess.SubprocessError):
        return "unknown"


def run(a) -> dict:
    import ray
    import torch
    from ray import serve

    from kontext_server.serving.ray_serve.app import application
    from kontext_server.serving.ray_serve.options import AppArgs

    result = {"tool": "tools/ray_serve_bench.py", "argv": sys.argv[1:], "date": time.strftime("%Y-%m-%d %H:%M:%S"),
              "commit": git_commit(), "machine": {"cpus": os.cpu_count(), "processor": platform.processor(),
                                                  "platform": platform.platform()},
              "versions": {"ray": ray.__version__, "torch": torch.__version__, "python": platform.python_version()},
              "payload": a.payload, "loadavg_start": loadavg(), "startup_s": {},
              "ray_worker_niceness": settings.RAY_WORKER_NICENESS.get() or "Ray's default (15)"}
    startup = result["startup_s"]
    t0 = time.monotonic()
    local = ServerProcess(cache_dir=a.cache_dir, max_queue=a.clients * 2,
                          log_path=str(Path(a.cache_dir or "/tmp") / "ray-serve-bench-local.log"))
    try:
        local.wait_ready(a.start_timeout)
        startup["local"] = round(time.monotonic() - t0, 2)
        t0 = time.monotonic()
        ray.init(num_cpus=LOGICAL_CPUS, include_dashboard=False, log_to_driver=False)
        port = free_port()
        serve.start(http_options={"host": "127.0.0.1", "port": port})
        startup["ray_cluster"] = round(time.monotonic() - t0, 2)
        base = f"http://127.0.0.1:{port}"
        common = {"model": "tiny", "device": "cpu", "cache_dir": a.cache_dir, "max_queue": a.clients * 2}
        for name, prefix, replicas, cpus in (("ray-1", "/ray1", 1, 2), ("ray-2", "/ray2", 2, 1)):
            t0 = time.monotonic()
            args = AppArgs.parse(dict(common, replicas=replicas, replica_cpus=cpus))
            serve.run(application(args), name=name, route_prefix=prefix)
            wait_ready(base + prefix, replicas, a.start_timeout)
            startup[name] = round(time.monotonic() - t0, 2)
        t0 = time.monotonic()
        serve.run(trivial_app(), name="trivial", route_prefix="/trivial")
        startup["trivial"] = round(time.monotonic() - t0, 2)
        bases = {"local": local.url, "ray-1": base + "/ray1", "ray-2": base + "/ray2"}
        threads = {}
        for name in ("ray-1", "ray-2"):
            states = httpx.get(bases[name] + "/health", timeout=10).json()["replica_states"]
            threads[name] = sorted(s["torch_threads"] for s in states.values())
        result["torch_threads"] = threads
        targets = {n: u + "/inference" for n, u in bases.items()} | {"trivial": base + "/trivial/inference"}
        print(f"started: {startup}; measuring latency at concurrency 1", file=sys.stderr)
        result["loadavg_before_latency"] = loadavg()
        result["latency_c1"] = interleaved_latency(targets, a.payload, a.rounds, a.warmup)
        result["loadavg_after_latency"] = loadavg()
        print(f"latency: { {n: v['wall']['p50_ms'] for n, v in result['latency_c1'].items()} }; throughput",
              file=sys.stderr)
        result["throughput"] = chunked_throughput(bases, a.payload, a.clients, a.chunk_requests, a.chunks)
        result["loadavg_end"] = loadavg()
    finally:
        try:
            serve.shutdown()
            ray.shutdown()
        finally:
            result["local_exit_status"] = local.stop()
    lat, thr = result["latency_c1"], result["throughput"]
    path = {n: v["path"]["p50_ms"] for n, v in lat.items()}
    added = {n: round(path[n] - path["local"], 2) for n in ("ray-1", "ray-2")}
    trivial = lat["trivial"]["wall"]["p50_ms"]
    result["summary"] = {
        "latency_p50_ms_c1": {n: v["wall"]["p50_ms"] for n, v in lat.items()},
        "generation_p50_ms_c1": {n: v["service"]["p50_ms"] for n, v in lat.items() if n != "trivial"},
        "path_p50_ms_c1": path,
        "ray_added_ms_per_request_c1": added,
        "trivial_app_ms_per_request_c1": trivial,
        "added_over_trivial": {n: round(v / trivial, 3) for n, v in added.items()}, "target_added_over_trivial": 1.5,
        "images_per_minute": {n: v["images_per_minute"] for n, v in thr.items()},
        "ray2_over_ray1": round(thr["ray-2"]["images_per_minute"] / thr["ray-1"]["images_per_minute"], 3),
        "ray1_over_local": round(thr["ray-1"]["images_per_minute"] / thr["local"]["images_per_minute"], 3),
        "all_requests_answered": all(v["all_answered"] for v in thr.values()),
        "startup_s": startup,
    }
    return result


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(prog="ray_serve_bench.py", description=__doc__.split("\n")[0],
                                formatter_class=argparse.RawDescriptionHelpFormatter, epilog=__doc__)
    p.add_argument("--json-out", help="write the result here too (it is printed either way)")
    p.add_argument("--payload", type=json.loads, default=PAYLOAD, help=f"the request (default {PAYLOAD})")
    p.add_argument("--rounds", type=int, default=40, help="timed rounds at concurrency 1 (default 40)")
    p.add_argument("--warmup", type=int, default=5, help="untimed rounds first (default 5)")
    p.add_argument("--clients", type=int, default=8, help="concurrent clients for throughput (default 8)")
    p.add_argument("--chunk-requests", type=int, default=40, help="requests per throughput chunk (default 40)")
    p.add_argument("--chunks", type=int, default=3, help="throughput chunks per model server (default 3)")
    p.add_argument("--cache-dir", help="FLUX_CACHE_DIR of the servers (the tiny model is built there once)")
    p.add_argument("--start-timeout", type=float, default=300.0)
    p.add_argument("--ray-worker-niceness", type=int,
                   help="the Ray workers' nice value (RAY_worker_niceness; Ray's default is 15, the local server "
                        "runs at 0)")
    a = p.parse_args(argv)
    if a.ray_worker_niceness is not None:  # read by the raylet that ray.init starts below
        settings.set_process_env(settings.RAY_WORKER_NICENESS, str(a.ray_worker_niceness))
    result = run(a)
    text = json.dumps(result, indent=1)
    print(text)
    if a.json_out:
        Path(a.json_out).parent.mkdir(parents=True, exist_ok=True)
        Path(a.json_out).write_text(text + "\n")
    print(json.dumps(result["summary"], indent=1), file=sys.stderr)
    return 0 if result["summary"]["all_requests_answered"] else 1


if __name__ == "__main__":
    sys.exit(main())
