#!/usr/bin/env python
"""Load test for the inference server: many concurrent clients, a fixed request budget, a strict accounting.

    python tools/load_test.py --start-server --clients 32 --requests 400
    python tools/load_test.py --url http://127.0.0.1:8000 --clients 8 --requests 40 --json-out report.json

Every request gets its own X-Request-ID (`lt<run>-<n>`) and ends in exactly one of:

- accepted: 200 whose JSON body has images and whose X-Request-ID is the one sent;
- rejected: 429 (queue full) with a JSON error body; the server shed load as designed;
- failed:   any other status (a 5xx, a 503 queue timeout, a 422 ...), a 200/429 with a malformed body, or a
            transport error (connection refused/reset, client timeout). Must be 0;
- lost:     sent but not answered exactly once: still unanswered when the tool gives up (duration limit
            + per-request timeout), answered with another request's X-Request-ID, or (when the tool owns the
            server, --start-server) missing from the server's own count (flux_requests_total delta of
            /inference in /metrics differs from what the clients saw). Must be 0.

429 policy (the documented choice): a 429 is that request's final outcome; it is NOT resent. The client that
got it then waits min(Retry-After, --retry-after-cap) seconds (default cap 1 s; 0 = no wait) before sending
its next request, so rejected clients back off the way a well-behaved client would without the tool's run time
growing with the server's Retry-After estimate.

Latency percentiles are over accepted requests only (client wall time, connection included). Throughput is
accepted requests per second of the load phase. After the load phase the tool checks GET /health == 200.
Exit status: 0 when failed == 0, lost == 0 and /health is 200; 1 otherwise; 2 when the server cannot start.

Only loopback URLs are expected here; the tool refuses others unless --allow-remote is given.
"""
from __future__ import annotations

import argparse
import asyncio
import itertools
import json
import re
import signal
import socket
import subprocess
import sys
import tempfile
import time
import uuid
from dataclasses import dataclass, field
from pathlib import Path
from urllib.parse import urlparse

import httpx

from kontext_server import settings

ROOT = Path(__file__).resolve().parents[1]
DEFAULT_PAYLOAD = {"prompt": "a red car on a mountain road", "width": 256, "height": 256, "steps": 1}
LOOPBACK = {"127.0.0.1", "localhost", "::1"}


@dataclass
class Outcome:
    """What happened to one request."""

    request_id: str
    kind: str = "pending"  # accepted | rejected | failed | lost | pending
    status: int | None = None
    latency_s: float | None = None
    error: str | None = None
    retry_after: float | None = None
    queue_wait_ms: float | None = None


@dataclass
class LoadConfig:
    url: str
    clients: int = 32
    requests: int = 400
    duration_limit: float = 300.0  # seconds during which new requests may start
    request_timeout: float = 300.0  # per request, client side
    payload: dict = field(default_factory=lambda: dict(DEFAULT_PAYLOAD))
    retry_after_cap: float = 1.0
    endpoint: str = "/inference"
    strict_accounting: bool = False  # the tool owns the server: compare with its /metrics counts


# ---------------------------------------------------------------------------------------------------------------
# helpers
# ---------------------------------------------------------------------------------------------------------------
def percentile(values: list[float], q: float) -> float | None:
    """Linear interpolation between closest ranks (numpy's default); None for no data."""
    if not values:
        return None
    xs = sorted(values)
    if len(xs) == 1:
        return xs[0]
    pos = (len(xs) - 1) * q / 100.0
    lo = int(pos)
    hi = min(lo + 1, len(xs) - 1)
    return xs[lo] + (xs[hi] - xs[lo]) * (pos - lo)


_SAMPLE_RE = re.compile(r'^flux_requests_total\{endpoint="([^"]*)",status="(\d+)"\}\s+([0-9.eE+-]+)$')


def parse_request_counts(metrics_text: str, endpoint: str) -> dict[int, int]:
    """flux_requests_total samples for one endpoint: status -> count."""
    out: dict[int, int] = {}
    for line in metrics_text.splitlines():
        m = _SAMPLE_RE.match(line.strip())
        if m and m.group(1) == endpoint:
            out[int(m.group(2))] = int(float(m.group(3)))
    return out


def _retry_after(resp: httpx.Response) -> float | None:
    try:
        return float(resp.headers.get("retry-after", ""))
    except ValueError:
        return None


def _classify(resp: httpx.Response, rid: str, out: Outcome) -> None:
    out.status = resp.status_code
    echoed = resp.headers.get("x-request-id")
    if echoed != rid:
        out.kind, out.error = "lost", f"answer carries X-Request-ID {echoed!r}, not {rid!r}"
        return
    try:
        body = resp.json()
    except ValueError:
        body = None
    if resp.status_code == 200:
        if isinstance(body, dict) and body.get("images") and body.get("request_id") == rid:
            out.kind = "accepted"
            out.queue_wait_ms = (body.get("timings_ms") or {}).get("queue_wait")
        else:
            out.kind, out.error = "failed", "200 without a well-formed body"
    elif resp.status_code == 429:
        out.retry_after = _retry_after(resp)
        if isinstance(body, dict) and body.get("error") and body.get("message"):
            out.kind = "rejected"
        else:
            out.kind, out.error = "failed", "429 without a JSON error body"
    else:
        out.kind = "failed"
        msg = body.get("message") if isinstance(body, dict) else resp.text[:200]
        code = body.get("error") if isinstance(body, dict) else None
        out.error = f"{resp.status_code} {code}: {msg}"


# ---------------------------------------------------------------------------------------------------------------
# the load phase
# ---------------------------------------------------------------------------------------------------------------
async def run_load(cfg: LoadConfig) -> dict:
    """Runs the load phase and the checks after it; returns the report (see summarize)."""
    run_tag = uuid.uuid4().hex[:6]
    outcomes: list[Outcome] = []
    counter = itertools.count()
    limits = httpx.Limits(max_connections=cfg.clients, max_keepalive_connections=cfg.clients)
    timeout = httpx.Timeout(cfg.request_timeout, connect=10.0)
    body = json.dumps(cfg.payload).encode()
    url = cfg.url.rstrip("/")

    async with httpx.AsyncClient(base_url=url, limits=limits, timeout=timeout) as client:
        before = await _metrics_counts(client, cfg.endpoint)
        t_start = time.monotonic()
        stop_at = t_start + cfg.duration_limit

        async def one_client():
            while time.monotonic() < stop_at:
                n = next(counter)
                if n >= cfg.requests:
                    return
                rid = f"lt{run_tag}-{n:06d}"
                out = Outcome(request_id=rid)
                outcomes.append(out)
                t0 = time.monotonic()
                try:
                    resp = await client.post(cfg.endpoint, content=body,
                                             headers={"content-type": "application/json", "x-request-id": rid})
                except asyncio.CancelledError:
                    out.kind, out.error = "lost", "still unanswered when the tool gave up"
                    raise
                except httpx.HTTPError as exc:
                    out.kind, out.error = "failed", f"transport error: {type(exc).__name__}: {exc}"
                    out.latency_s = time.monotonic() - t0
                    continue
                out.latency_s = time.monotonic() - t0
                _classify(resp, rid, out)
                if out.kind == "rejected" and cfg.retry_after_cap > 0:
                    await asyncio.sleep(min(out.retry_after or 1.0, cfg.retry_after_cap))

        tasks = [asyncio.create_task(one_client()) for _ in range(cfg.clients)]
        # New requests stop at the duration limit; what is in flight then gets its own timeout, plus slack.
        done, pending = await asyncio.wait(tasks, timeout=cfg.duration_limit + cfg.request_timeout + 10)
        for t in pending:
            t.cancel()
        if pending:
            await asyncio.wait(pending, timeout=10)
        for t in done:
            if t.exception() is not None:  # a bug in this tool: say so rather than hide it
                raise t.exception()
        wall = time.monotonic() - t_start

        after = await _metrics_counts(client, cfg.endpoint)
        health_status, health_body = await _health(client)

    return summarize(cfg, outcomes, wall, before, after, health_status, health_body)


async def _metrics_counts(client: httpx.AsyncClient, endpoint: str) -> dict[int, int] | None:
    try:
        r = await client.get("/metrics", timeout=10)
        return parse_request_counts(r.text, endpoint) if r.status_code == 200 else None
    except httpx.HTTPError:
        return None


async def _health(client: httpx.AsyncClient) -> tuple[int | None, dict | None]:
    try:
        r = await client.get("/health", timeout=10)
    except httpx.HTTPError as exc:
        return None, {"error": f"{type(exc).__name__}: {exc}"}
    try:
        return r.status_code, r.json()
    except ValueError:
        return r.status_code, None


def summarize(cfg: LoadConfig, outcomes: list[Outcome], wall: float, before, after, health_status,
              health_body) -> dict:
    for o in outcomes:
        if o.kind == "pending":
            o.kind, o.error = "lost", "no answer"
    ids = [o.request_id for o in outcomes]
    duplicates = len(ids) - len(set(ids))
    by_kind = {k: sum(o.kind == k for o in outcomes) for k in ("accepted", "rejected", "failed", "lost")}
    by_status: dict[str, int] = {}
    for o in outcomes:
        key = str(o.status) if o.status is not None else "none"
        by_status[key] = by_status.get(key, 0) + 1
    lat = [o.latency_s for o in outcomes if o.kind == "accepted" and o.latency_s is not None]
    waits = [o.queue_wait_ms for o in outcomes if o.kind == "accepted" and o.queue_wait_ms is not None]
    retry_after = [o.retry_after for o in outcomes if o.retry_after is not None]

    server = None
    unaccounted = 0
    if before is not None and after is not None:
        delta = {s: after.get(s, 0) - before.get(s, 0) for s in set(before) | set(after)}
        delta = {s: n for s, n in sorted(delta.items()) if n}
        client_seen = {int(k): n for k, n in by_status.items() if k != "none"}
        server = {"counted_by_status": {str(k): v for k, v in delta.items()}, "counted_total": sum(delta.values()),
                  "matches_clients": delta == client_seen}
        if cfg.strict_accounting:
            # The tool owns the server: each request the clients got an answer to was counted once by the server
            # with the same status. A transport error may or may not have reached the server; those are already
            # failures, so they may explain as many differences.
            transport_errors = by_status.get("none", 0)
            diff = sum(abs(delta.get(s, 0) - client_seen.get(s, 0)) for s in set(delta) | set(client_seen))
            unaccounted = max(0, diff - transport_errors)
    lost = by_kind["lost"] + duplicates + unaccounted

    ms = lambda v: None if v is None else round(v * 1000, 1)  # noqa: E731
    report = {
        "url": cfg.url, "endpoint": cfg.endpoint, "clients": cfg.clients, "requests_planned": cfg.requests,
        "payload": cfg.payload, "retry_after_cap_s": cfg.retry_after_cap,
        "sent": len(outcomes), "accepted": by_kind["accepted"], "rejected": by_kind["rejected"],
        "failed": by_kind["failed"], "lost": lost, "lost_detail": {"unanswered_or_wrong_id": by_kind["lost"],
                                                                   "duplicate_ids": duplicates,
                                                                   "server_count_mismatch": unaccounted},
        "by_status": by_status,
        "latency_ms": {"p50": ms(percentile(lat, 50)), "p95": ms(percentile(lat, 95)), "p99": ms(percentile(lat, 99)),
                       "min": ms(min(lat)) if lat else None, "max": ms(max(lat)) if lat else None},
        "queue_wait_ms_p50": percentile(waits, 50),
        "retry_after_s": {"min": min(retry_after), "max": max(retry_after)} if retry_after else None,
        "wall_s": round(wall, 3),
        "throughput_rps": round(by_kind["accepted"] / wall, 3) if wall > 0 else None,
        "completed_rps": round(len(outcomes) / wall, 3) if wall > 0 else None,
        "stopped_by_duration_limit": len(outcomes) < cfg.requests,
        "server_metrics": server,
        "health_after": {"status": health_status, "queue_depth": (health_body or {}).get("queue_depth"),
                         "in_flight": (health_body or {}).get("in_flight")},
        "healthy_after": health_status == 200,
        "errors": sorted({o.error for o in outcomes if o.error})[:20],
        "requests": [{"id": o.request_id, "kind": o.kind, "status": o.status,
                      "latency_ms": ms(o.latency_s)} for o in outcomes],
    }
    report["ok"] = report["failed"] == 0 and report["lost"] == 0 and report["healthy_after"]
    return report


def format_report(r: dict) -> str:
    lat = r["latency_ms"]
    lines = [
        f"load test: {r['sent']} requests from {r['clients']} clients to {r['url']}{r['endpoint']} "
        f"in {r['wall_s']:.1f} s" + (" (stopped by --duration-limit)" if r["stopped_by_duration_limit"] else ""),
        f"  accepted (200): {r['accepted']}   rejected (429): {r['rejected']}   failed: {r['failed']}   "
        f"lost: {r['lost']}",
        f"  latency of accepted, ms: p50 {lat['p50']}  p95 {lat['p95']}  p99 {lat['p99']}  "
        f"(min {lat['min']}, max {lat['max']})",
        f"  throughput: {r['throughput_rps']} accepted/s ({r['completed_rps']} answered/s)",
        f"  by status: {r['by_status']}",
    ]
    if r["retry_after_s"]:
        lines.append(f"  Retry-After seen on 429: {r['retry_after_s']['min']}-{r['retry_after_s']['max']} s "
                     f"(honoured up to {r['retry_after_cap_s']} s)")
    if r["server_metrics"]:
        lines.append(f"  server counted: {r['server_metrics']['counted_by_status']} "
                     f"(matches clients: {r['server_metrics']['matches_clients']})")
    lines.append(f"  /health after: {r['health_after']['status']}  "
                 f"(queue_depth {r['health_after']['queue_depth']}, in_flight {r['health_after']['in_flight']})")
    for e in r["errors"]:
        lines.append(f"  error: {e}")
    lines.append("  RESULT: " + ("PASS" if r["ok"] else "FAIL (failed or lost > 0, or unhealthy)"))
    return "\n".join(lines)


# ---------------------------------------------------------------------------------------------------------------
# --start-server
# ---------------------------------------------------------------------------------------------------------------
def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


class ServerProcess:
    """`flux_kontext_optimized.py serve --model tiny` on a free loopback port, stopped with SIGTERM.
    Also the test suite's live server (tests/conftest.py); `with ServerProcess(...) as s:` waits until it serves."""

    def __init__(self, extra: list[str] | None = None, cache_dir: str | None = None, log_path: str | None = None,
                 env: dict | None = None, max_queue: int | None = None):
        self.port = free_port()
        self.url = f"http://127.0.0.1:{self.port}"
        if log_path is None:  # next to the cache when there is one, else a temporary file
            log_path = (Path(cache_dir) / f"server-{self.port}.log" if cache_dir
                        else tempfile.mkstemp(prefix="flux-load-server-", suffix=".log")[1])
        self.log_path = Path(log_path)
        self._log = open(self.log_path, "w")
        env = settings.environ_with(PYTHONUNBUFFERED="1", **(env or {}))
        if cache_dir:
            env["FLUX_CACHE_DIR"] = str(cache_dir)
        cmd = [sys.executable, str(ROOT / "flux_kontext_optimized.py"), "serve", "--model", "tiny", "--device", "cpu",
               "--host", "127.0.0.1", "--port", str(self.port), "--log-level", "warning",
               *(["--max-queue", str(max_queue)] if max_queue is not None else []), *(extra or [])]
        self.proc = subprocess.Popen(cmd, cwd=ROOT, env=env, stdout=self._log, stderr=subprocess.STDOUT)

    def wait_ready(self, timeout: float = 120) -> None:
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            if self.proc.poll() is not None:
                raise RuntimeError(f"server exited with {self.proc.returncode}; log: {self.log_path}\n{self.tail()}")
            try:
                if httpx.get(self.url + "/health", timeout=2).status_code == 200:
                    return
            except httpx.HTTPError:
                pass
            time.sleep(0.2)
        raise TimeoutError(f"server not ready in {timeout:.0f} s; log: {self.log_path}\n{self.tail()}")

    def log(self) -> str:
        self._log.flush()
        return self.log_path.read_text(errors="replace")

    def tail(self, n: int = 4000) -> str:
        return self.log()[-n:]

    def __enter__(self) -> "ServerProcess":
        try:
            self.wait_ready()
        except BaseException:
            self.stop()
            raise
        return self

    def __exit__(self, *exc) -> None:
        self.stop()

    def stop(self, timeout: float = 60) -> int:
        if self.proc.poll() is None:
            self.proc.send_signal(signal.SIGTERM)
            try:
                self.proc.wait(timeout=timeout)
            except subprocess.TimeoutExpired:
                self.proc.kill()
                self.proc.wait()
        self._log.close()
        return self.proc.returncode


# ---------------------------------------------------------------------------------------------------------------
# CLI
# ---------------------------------------------------------------------------------------------------------------
def _parse_payload(spec: str | None) -> dict:
    if not spec:
        return dict(DEFAULT_PAYLOAD)
    text = Path(spec[1:]).read_text() if spec.startswith("@") else spec
    payload = json.loads(text)
    if not isinstance(payload, dict):
        raise SystemExit("--payload must be a JSON object")
    return payload


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="load_test.py", description=__doc__.split("\n")[0],
                                formatter_class=argparse.RawDescriptionHelpFormatter, epilog=__doc__)
    p.add_argument("--url", help="server base URL, e.g. http://127.0.0.1:8000 (not with --start-server)")
    p.add_argument("--clients", type=int, default=32, help="concurrent clients (default 32)")
    p.add_argument("--requests", type=int, default=400, help="total requests over all clients (default 400)")
    p.add_argument("--duration-limit", type=float, default=300.0,
                   help="seconds after which no new request starts (default 300); in-flight ones still finish")
    p.add_argument("--request-timeout", type=float, default=300.0, help="client timeout per request (default 300)")
    p.add_argument("--payload", help="JSON object or @file (default: tiny text-to-image 256x256, 1 step)")
    p.add_argument("--retry-after-cap", type=float, default=1.0,
                   help="after a 429 the client waits min(Retry-After, cap) s before its next request (0: no wait)")
    p.add_argument("--start-server", action="store_true",
                   help="start `flux_kontext_optimized.py serve --model tiny` on a free loopback port, stop it after")
    p.add_argument("--server-max-queue", type=int, default=16, help="--max-queue of the started server (default 16)")
    p.add_argument("--server-arg", action="append", default=[],
                   help="extra argument for the started server (repeatable), e.g. --server-arg=--queue-timeout=30")
    p.add_argument("--cache-dir", help="FLUX_CACHE_DIR for the started server (tiny model is built there once)")
    p.add_argument("--server-start-timeout", type=float, default=180.0)
    p.add_argument("--json-out", help="write the report as JSON to this file ('-' for stdout)")
    p.add_argument("--allow-remote", action="store_true", help="allow a non-loopback --url")
    return p


def main(argv: list[str] | None = None) -> int:
    a = build_parser().parse_args(argv)
    if a.start_server == bool(a.url):
        print("error: give exactly one of --url and --start-server", file=sys.stderr)
        return 2
    if a.clients < 1 or a.requests < 0:
        print("error: --clients must be >= 1 and --requests >= 0", file=sys.stderr)
        return 2
    if a.url and not a.allow_remote and urlparse(a.url).hostname not in LOOPBACK:
        print(f"error: {a.url} is not a loopback address (use --allow-remote to insist)", file=sys.stderr)
        return 2
    payload = _parse_payload(a.payload)
    server = None
    try:
        if a.start_server:
            server = ServerProcess(max_queue=a.server_max_queue, extra=a.server_arg, cache_dir=a.cache_dir)
            t0 = time.monotonic()
            try:
                server.wait_ready(a.server_start_timeout)
            except (RuntimeError, TimeoutError) as exc:
                print(f"error: {exc}", file=sys.stderr)
                return 2
            print(f"server {server.url} ready in {time.monotonic() - t0:.1f} s (log {server.log_path})",
                  file=sys.stderr)
        cfg = LoadConfig(url=server.url if server else a.url, clients=a.clients, requests=a.requests,
                         duration_limit=a.duration_limit, request_timeout=a.request_timeout, payload=payload,
                         retry_after_cap=a.retry_after_cap, strict_accounting=server is not None)
        report = asyncio.run(run_load(cfg))
    finally:
        if server is not None:
            rc = server.stop()
            print(f"server stopped (exit status {rc})", file=sys.stderr)
    if server is not None:
        report["server"] = {"started_by_tool": True, "max_queue": a.server_max_queue, "extra_args": a.server_arg,
                            "log": str(server.log_path), "exit_status": server.proc.returncode}
    print(format_report(report))
    if a.json_out:
        text = json.dumps(report, indent=1)
        if a.json_out == "-":
            print(text)
        else:
            Path(a.json_out).write_text(text + "\n")
    return 0 if report["ok"] else 1


if __name__ == "__main__":
    sys.exit(main())
