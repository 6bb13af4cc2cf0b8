#!/usr/bin/env python
"""Ray Serve on one host: N model replicas against one, under many clients, then one replica killed under load.

    # the multi-GPU run, on a host of N GPUs (one command; --replicas N):
    python tools/ray_replicas_bench.py --model synthetic-full --device cuda --replicas 2 --workload edit-512-fast \
        --clients 32 --duration 180 --kill --cache-dir /tmp/flux-cache --json-out $OUT/ray-replicas.json
    # rehearsal on a CPU (tiny model):
    python tools/ray_replicas_bench.py --model tiny --device cpu --replicas 2 --workload edit-256 --clients 8 \
        --duration 30 --kill --kill-duration 30 --json-out /tmp/ray-replicas.json

Phases (each starts `flux_kontext_optimized.py serve --engine ray` as a user would, waits until every replica is
ready, warms every replica at the workload's shape, measures, stops it with SIGTERM):
- baseline: --replicas 1, `--clients` clients for `--duration` seconds (load_test.py's run_load: every request
  accounted for): images per minute, p50 / p95 / p99 latency;
- scaled:   --replicas N, the same load; images per minute against N x the baseline's (target >= 0.9);
- kill:     (with --kill, on the scaled server) the same clients for `--kill-duration` seconds; after
  `--kill-after` seconds one replica's process is killed (SIGKILL, by the pid /health reports); every request must
  get one answer (200, 429, or 503 replica_lost with Retry-After), /health's ready count must drop and come back
  (within `--recover-timeout`), with a new replica in the killed one's place.
`--phases` runs a subset (e.g. `baseline`, then `scaled,kill --baseline-json <the first JSON>`) where one command
may not run as long as all three. The JSON is rewritten after every phase, so a run cut short keeps what it measured.
Startup of each phase (command to every replica ready) is recorded too: the first compiles, the later ones load the
shared compile cache (FLUX_CACHE_DIR: one directory for all replicas of the host).
"""
from __future__ import annotations

import argparse
import asyncio
import base64
import io
import json
import os
import signal
import subprocess
import sys
import threading
import time
from pathlib import Path

import httpx
from PIL import Image

from load_test import LoadConfig, ServerProcess, run_load

ROOT = Path(__file__).resolve().parents[1]


def png_b64(side: int) -> str:
    img = Image.new("RGB", (side, side), (200, 30, 30))
    for x in range(0, side, 8):  # some structure, so the encoder sees more than a flat colour
        img.putpixel((x, (x * 7) % side), (0, 0, 255))
    buf = io.BytesIO()
    img.save(buf, format="PNG")
    return base64.b64encode(buf.getvalue()).decode()


def workload(name: str) -> tuple[dict, str]:
    """(the request, the server's --warmup) of a named workload."""
    fast = {"use_mxfp4": True, "use_dpm_solver": True, "use_cuda_graphs": True}  # fp8 + DPM-Solver++ (14) + graphs
    base = {"prompt": "make the car red", "seed": 0}
    table = {
        "edit-512-fast": (dict(base, image=png_b64(512), width=512, height=512, **fast), "edit:512x512"),
        "edit-512-exact": (dict(base, image=png_b64(512), width=512, height=512), "edit:512x512"),
        "edit-256": (dict(base, image=png_b64(256), width=256, height=256, steps=2), "edit:256x256"),
    }
    return table[name]


def health(url: str) -> dict:
    return httpx.get(url + "/health", timeout=10).json()


def wait_replicas(url: str, n: int, timeout: float) -> None:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        try:
            r = httpx.get(url + "/health", timeout=5)
            if r.status_code == 200 and r.json()["replicas"]["ready"] >= n:
                return
        except (httpx.HTTPError, KeyError, ValueError):
            pass
        time.sleep(1)
    raise TimeoutError(f"{url}: {n} replicas not ready in {timeout:.0f} s")


def load(url: str, payload: dict, clients: int, seconds: float, requests: int = 10**7) -> dict:
    return asyncio.run(run_load(LoadConfig(url=url, clients=clients, requests=requests, payload=payload,
                                           duration_limit=seconds, request_timeout=600, retry_after_cap=1.0)))


def summary(report: dict) -> dict:
    keep = ("sent", "accepted", "rejected", "failed", "lost", "by_status", "latency_ms", "wall_s", "errors", "ok")
    out = {k: report[k] for k in keep}
    out["images_per_minute"] = round(report["accepted"] * 60 / report["wall_s"], 2) if report["wall_s"] else None
    return out


class Server:
    """`serve --engine ray --replicas N` for one phase."""

    def __init__(self, a, replicas: int, warmup: str, log_dir: Path, name: str):
        extra = ["--engine", "ray", "--replicas", str(replicas), "--model", a.model, "--device", a.device,
                 "--warmup", warmup, "--max-queue", str(a.max_queue), *a.server_arg]
        self.command = "flux_kontext_optimized.py serve " + " ".join(extra)
        self.replicas = replicas
        self.t0 = time.monotonic()
        self.proc = ServerProcess(extra=extra, cache_dir=a.cache_dir, log_path=str(log_dir / f"{name}.log"))
        self.url = self.proc.url

    def wait(self, timeout: float) -> float:
        self.proc.wait_ready(timeout)
        wait_replicas(self.url, self.replicas, timeout)
        return round(time.monotonic() - self.t0, 1)

    def stop(self) -> int:
        return self.proc.stop(timeout=120)


def warm_every_replica(url: str, payload: dict, replicas: int, timeout: float = 1800.0) -> dict:
    """Bursts of 2N concurrent requests until every replica has answered one (its first request at the shape pays
    any compile or CUDA-graph capture, outside the measured load). Returns the answers per replica."""
    async def burst(n: int) -> list[str]:
        async with httpx.AsyncClient(base_url=url, timeout=900) as c:
            answers = await asyncio.gather(*[c.post("/inference", json=payload) for _ in range(n)])
        return [r.json()["replica"] for r in answers if r.status_code == 200]

    seen: dict[str, int] = {}
    deadline = time.monotonic() + timeout
    while len(seen) < replicas and time.monotonic() < deadline:
        for rid in asyncio.run(burst(2 * replicas)):
            seen[rid] = seen.get(rid, 0) + 1
    if len(seen) < replicas:
        raise TimeoutError(f"only {len(seen)} of {replicas} replicas answered within {timeout:.0f} s")
    return seen


def measured_phase(a, name: str, replicas: int, payload: dict, warmup: str, log_dir: Path) -> tuple[dict, Server]:
    server = Server(a, replicas, warmup, log_dir, name)
    out = {"phase": name, "command": server.command, "replicas": replicas}
    try:
        out["startup_s"] = server.wait(a.start_timeout)
        out["warm"] = warm_every_replica(server.url, payload, replicas)
        out["load"] = summary(load(server.url, payload, a.clients, a.duration))
        h = health(server.url)
        out["compile_cache"] = (h.get("compile_cache") or {}).get("lock")
    except BaseException:
        out["exit_status"] = server.stop()
        raise
    print(f"{name}: {replicas} replica(s) ready in {out['startup_s']} s; "
          f"{out['load']['images_per_minute']} images/min, p50 {out['load']['latency_ms']['p50']} ms",
          file=sys.stderr)
    return out, server


def kill_phase(a, server: Server, payload: dict) -> dict:
    """One replica's process killed under load: answers, the ready count's drop and recovery."""
    before = health(server.url)["replica_states"]
    victim_id, victim = sorted(before.items())[0]
    timeline: list[tuple[float, int]] = []
    stop = threading.Event()
    t0 = time.monotonic()

    def poll():
        while not stop.is_set():
            try:
                timeline.append((round(time.monotonic() - t0, 2), health(server.url)["replicas"]["ready"]))
            except (httpx.HTTPError, KeyError, ValueError):
                timeline.append((round(time.monotonic() - t0, 2), -1))
            stop.wait(0.5)

    def kill():
        time.sleep(a.kill_after)
        os.kill(victim["pid"], signal.SIGKILL)
        killed["t"] = round(time.monotonic() - t0, 2)

    killed: dict = {}
    threading.Thread(target=poll, daemon=True).start()
    killer = threading.Thread(target=kill, daemon=True)
    killer.start()
    report = load(server.url, payload, a.clients, a.kill_duration)
    killer.join(5)
    recovered_at = None
    deadline = time.monotonic() + a.recover_timeout
    while time.monotonic() < deadline:
        h = health(server.url)
        if h["replicas"]["ready"] >= server.replicas and victim_id not in h["replica_states"]:
            recovered_at = round(time.monotonic() - t0, 2)
            break
        time.sleep(1)
    stop.set()
    out = summary(report)
    statuses = {int(k) for k in out["by_status"] if k != "none"}
    out_errors = [e for e in out["errors"] if not e.startswith("503 replica_lost")]
    after = [(t, n) for t, n in timeline if killed and t >= killed["t"]]
    low = min((n for _, n in after), default=None)
    dropped_at = next((t for t, n in after if n < server.replicas), None)
    back_at = next((t for t, n in after if dropped_at is not None and t > dropped_at and n >= server.replicas), None)
    result = {"victim": victim_id, "killed_at_s": killed.get("t"), "load": out,
              "ready_timeline": timeline, "ready_min_after_kill": low, "ready_dropped_at_s": dropped_at,
              "ready_back_at_s": back_at, "recovered_at_s": recovered_at,
              "every_request_answered": out["lost"] == 0 and statuses <= {200, 429, 503} and not out_errors,
              "replica_back": recovered_at is not None}
    print(f"kill: victim {victim_id} at {killed.get('t')} s; statuses {out['by_status']}; ready dropped to "
          f"{low} at {dropped_at} s, back at {back_at} s", file=sys.stderr)
    return result


def git_commit() -> str:
    try:
        return subprocess.run(["git", "rev-parse", "HEAD"], cwd=ROOT, capture_output=True, text=True,
                              timeout=10).stdout.strip()
    except (OSError, subprocess.SubprocessError):
        return "unknown"


def gpu_names() -> list[str]:
    try:
        out = subprocess.run(["nvidia-smi", "--query-gpu=name", "--format=csv,noheader"], capture_output=True,
                             text=True, timeout=30)
        return [line.strip() for line in out.stdout.splitlines() if line.strip()]
    except (OSError, subprocess.SubprocessError):
        return []


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(prog="ray_replicas_bench.py", description=__doc__.split("\n")[0],
                                formatter_class=argparse.RawDescriptionHelpFormatter, epilog=__doc__)
    p.add_argument("--model", default="synthetic-full")
    p.add_argument("--device", default="cuda", help="cuda (each replica gets one GPU) or cpu")
    p.add_argument("--replicas", type=int, required=True, help="N for the scaled phase (the baseline is 1)")
    p.add_argument("--workload", default="edit-512-fast", choices=["edit-512-fast", "edit-512-exact", "edit-256"])
    p.add_argument("--clients", type=int, default=32)
    p.add_argument("--duration", type=float, default=180.0, help="seconds of load per measured phase")
    p.add_argument("--max-queue", type=int, default=64, help="the servers' shared queue (default 64: no 429 "
                                                               "expected from 32 clients)")
    p.add_argument("--kill", action="store_true", help="then kill one replica under load")
    p.add_argument("--kill-duration", type=float, default=60.0)
    p.add_argument("--kill-after", type=float, default=15.0)
    p.add_argument("--recover-timeout", type=float, default=600.0)
    p.add_argument("--phases", default="baseline,scaled,kill", help="a subset of baseline,scaled,kill")
    p.add_argument("--baseline-json", help="a previous run's JSON whose baseline to compare against")
    p.add_argument("--cache-dir", help="FLUX_CACHE_DIR for the servers (keep it between phases and calls)")
    p.add_argument("--server-arg", action="append", default=[], help="extra `serve` argument (repeatable)")
    p.add_argument("--start-timeout", type=float, default=1800.0)
    p.add_argument("--json-out", required=True)
    a = p.parse_args(argv)
    phases = [x.strip() for x in a.phases.split(",") if x.strip()]
    if not a.kill:
        phases = [x for x in phases if x != "kill"]
    payload, warmup = workload(a.workload)
    out_path = Path(a.json_out)
    out_path.parent.mkdir(parents=True, exist_ok=True)
    log_dir = out_path.parent / "ray-replicas-logs"
    log_dir.mkdir(exist_ok=True)
    result = {"tool": "tools/ray_replicas_bench.py", "argv": sys.argv[1:], "date": time.strftime("%Y-%m-%d %H:%M:%S"),
              "commit": git_commit(), "gpus": gpu_names(), "cpus": os.cpu_count(), "workload": a.workload,
              "payload_fields": {k: (v if k != "image" else f"<{a.workload} png>") for k, v in payload.items()},
              "phases": {}}

    def save():
        out_path.write_text(json.dumps(result, indent=1) + "\n")

    ok = True
    try:
        if "baseline" in phases:
            result["phases"]["baseline"], server = measured_phase(a, "baseline", 1, payload, warmup, log_dir)
            result["phases"]["baseline"]["exit_status"] = server.stop()
            save()
        elif a.baseline_json:
            result["phases"]["baseline"] = json.loads(Path(a.baseline_json).read_text())["phases"]["baseline"]
        if "scaled" in phases:
            result["phases"]["scaled"], server = measured_phase(a, "scaled", a.replicas, payload, warmup, log_dir)
            save()
            try:
                if "kill" in phases:
                    result["phases"]["kill"] = kill_phase(a, server, payload)
                    ok = result["phases"]["kill"]["every_request_answered"] and \
                        result["phases"]["kill"]["replica_back"]
            finally:
                result["phases"]["scaled"]["exit_status"] = server.stop()
        base, scaled = result["phases"].get("baseline"), result["phases"].get("scaled")
        if base and scaled:
            one = base["load"]["images_per_minute"]
            result["scaling"] = {"replicas": a.replicas, "images_per_minute_1": one,
                                 "images_per_minute_n": scaled["load"]["images_per_minute"],
                                 "over_n_times_one": round(scaled["load"]["images_per_minute"] / (a.replicas * one),
                                                           3),
                                 "target": 0.9}
        ok = ok and all(ph["load"]["ok"] for k, ph in result["phases"].items() if k in ("baseline", "scaled"))
    finally:
        save()
    print(json.dumps({k: result.get(k) for k in ("scaling",)} | {
        "kill": {k: v for k, v in result["phases"].get("kill", {}).items() if k != "ready_timeline"}}, indent=1))
    return 0 if ok else 1


if __name__ == "__main__":
    sys.exit(main())
