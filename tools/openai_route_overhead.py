#!/usr/bin/env python
"""The OpenAI routes' own cost against /inference for the same work: parsing, validation, decoding the reference
image, encoding the result, building the response. Generation is stubbed, so model time is excluded.

    python tools/openai_route_overhead.py --runs 50 --size 1024 --json-out route_overhead.json

One in-process app (the tiny model loaded for planning; `generate` replaced by a stub that returns a fixed
SIZE x SIZE image) is driven directly through ASGI with prepared request bodies, so no HTTP client's work is timed.
Two pairs, each run `--runs` times interleaved (alternating which goes first) after `--warmup` rounds:
- t2i:  POST /inference (JSON) vs POST /v1/images/generations (JSON);
- edit: POST /inference (JSON, the reference PNG in base64) vs POST /v1/images/edits (multipart, the same PNG).
Each request returns one PNG of the fixed image. Two clocks per request: wall time, and the process's CPU time (all its
threads: the event loop, the thread pool that decodes and encodes, the worker), which other processes on a shared
machine disturb less. Prints each route's medians and the differences of medians per pair, and writes them (with
every sample) as JSON. The budget: the OpenAI route's median at most 5 ms above /inference's at 1024x1024 on
CPU.
"""
from __future__ import annotations

import argparse
import asyncio
import io
import json
import os
import platform
import statistics
import subprocess
import sys
import time
import uuid
from datetime import datetime, timezone
from pathlib import Path

import numpy as np
from PIL import Image

ROOT = Path(__file__).resolve().parents[1]


def fixed_image(size: int, seed: int = 0) -> Image.Image:
    """A photo-like test image: smooth gradients with mild noise (PNG compresses it like a photo, not like noise)."""
    rng = np.random.default_rng(seed)
    x = np.linspace(0, 1, size)[None, :, None]
    y = np.linspace(0, 1, size)[:, None, None]
    base = np.concatenate([x * np.ones_like(y), y * np.ones_like(x), (x * y) ** 0.5], axis=2) * 230
    return Image.fromarray(np.clip(base + rng.normal(0, 6, base.shape), 0, 255).astype(np.uint8))


def png(img: Image.Image) -> bytes:
    buf = io.BytesIO()
    img.save(buf, format="PNG")
    return buf.getvalue()


def multipart(fields: dict[str, str], file_field: str, file_bytes: bytes) -> tuple[bytes, str]:
    boundary = uuid.uuid4().hex
    parts = [f'--{boundary}\r\nContent-Disposition: form-data; name="{k}"\r\n\r\n{v}\r\n'.encode()
             for k, v in fields.items()]
    parts.append(f'--{boundary}\r\nContent-Disposition: form-data; name="{file_field}"; filename="in.png"\r\n'
                 f"Content-Type: image/png\r\n\r\n".encode() + file_bytes + b"\r\n")
    return b"".join(parts) + f"--{boundary}--\r\n".encode(), f"multipart/form-data; boundary={boundary}"


def requests_for(size: int, reference_png: bytes) -> dict[str, tuple[str, bytes, str]]:
    """name -> (path, body, content type): the four requests, built once."""
    import base64

    common = {"prompt": "a red car on a mountain road", "seed": 1}
    t2i_inference = {**common, "width": size, "height": size}
    t2i_openai = {**common, "size": f"{size}x{size}"}
    edit_inference = {**t2i_inference, "image": base64.b64encode(reference_png).decode()}
    form, content_type = multipart({"prompt": common["prompt"], "seed": "1", "size": f"{size}x{size}"}, "image",
                                   reference_png)
    return {"t2i/inference": ("/inference", json.dumps(t2i_inference).encode(), "application/json"),
            "t2i/openai": ("/v1/images/generations", json.dumps(t2i_openai).encode(), "application/json"),
            "edit/inference": ("/inference", json.dumps(edit_inference).encode(), "application/json"),
            "edit/openai": ("/v1/images/edits", form, content_type)}


async def call(app, path: str, body: bytes, content_type: str) -> tuple[int, float, float, int]:
    """One POST through the ASGI app: (status, wall ms from the first byte in to the last byte out, the process's CPU
    ms meanwhile, bytes out)."""
    scope = {"type": "http", "asgi": {"version": "3.0"}, "http_version": "1.1", "method": "POST", "scheme": "http",
             "path": path, "raw_path": path.encode(), "query_string": b"", "root_path": "",
             "headers": [(b"host", b"bench"), (b"content-type", content_type.encode()),
                         (b"content-length", str(len(body)).encode())],
             "client": ("127.0.0.1", 1), "server": ("127.0.0.1", 80)}
    sent = False
    never = asyncio.Event()
    status, size = 0, 0

    async def receive():
        nonlocal sent
        if not sent:
            sent = True
            return {"type": "http.request", "body": body, "more_body": False}
        await never.wait()  # the client stays connected

    async def send(message):
        nonlocal status, size
        if message["type"] == "http.response.start":
            status = message["status"]
        elif message["type"] == "http.response.body":
            size += len(message.get("body", b""))

    t0, c0 = time.perf_counter(), time.process_time()
    await app(scope, receive, send)
    return status, (time.perf_counter() - t0) * 1000, (time.process_time() - c0) * 1000, size


def build_app(size: int, cache_dir: str | None):
    from kontext_server.api.app import ServerSettings, build_app as make_app
    from kontext_server.service import FluxService, GenerationResult, ServiceConfig

    svc = FluxService(ServiceConfig(model="tiny", device="cpu", optimizations="none",
                                    cache_dir=Path(cache_dir) if cache_dir else None))
    svc.load()
    image = fixed_image(size)

    def stub_generate(req, image_in=None, should_stop=None, output_type="pil", plan=None, on_step=None):
        return GenerationResult(images=[image] * req.num_images, seed=req.seed or 0, width=size, height=size,
                                steps=req.steps or 28, steps_computed=1, steps_skipped=0,
                                timings_ms={"text_encode": 0.0, "image_encode": 0.0, "transformer": 0.0,
                                            "vae_decode": 0.0, "total": 0.0}, optimizations=plan, warnings=[])

    svc.generate = stub_generate
    app = make_app(svc, ServerSettings(max_queue=4, load_in_background=False))
    app.state.server.engine.start()
    return app, svc


def git_commit() -> str | None:
    try:
        return subprocess.run(["git", "rev-parse", "--short", "HEAD"], cwd=ROOT, capture_output=True, text=True,
                              check=True).stdout.strip()
    except (OSError, subprocess.CalledProcessError):
        return None


async def measure(app, reqs: dict, runs: int, warmup: int) -> dict[str, dict[str, list[float]]]:
    """clock ("wall", "cpu") -> request name -> milliseconds per timed request."""
    samples = {clock: {name: [] for name in reqs} for clock in ("wall", "cpu")}
    pairs = [("t2i/inference", "t2i/openai"), ("edit/inference", "edit/openai")]
    for i in range(warmup + runs):
        for a, b in pairs:
            for name in ((a, b) if i % 2 == 0 else (b, a)):
                path, body, content_type = reqs[name]
                status, wall, cpu, _ = await call(app, path, body, content_type)
                if status != 200:
                    raise RuntimeError(f"{name}: status {status}")
                if i >= warmup:
                    samples["wall"][name].append(wall)
                    samples["cpu"][name].append(cpu)
    return samples


def summarise(samples: dict[str, dict[str, list[float]]]) -> dict:
    """Per clock: each route's median; per pair, the OpenAI route's median minus /inference's, and the median and
    quartiles of the paired differences (each round's OpenAI request minus its /inference request: the two ran
    back to back, so load that drifts over the run cancels)."""
    out = {}
    for clock, by_name in samples.items():
        med = {name: statistics.median(v) for name, v in by_name.items()}
        out[clock] = {"median_ms": {k: round(v, 3) for k, v in med.items()}}
        for pair in ("t2i", "edit"):
            paired = [a - b for a, b in zip(by_name[f"{pair}/openai"], by_name[f"{pair}/inference"])]
            quartiles = statistics.quantiles(paired, n=4) if len(paired) > 1 else [paired[0]] * 3
            out[clock][f"{pair}_openai_minus_inference_ms"] = round(med[f"{pair}/openai"] - med[f"{pair}/inference"], 3)
            out[clock][f"{pair}_paired_difference_ms"] = {"median": round(statistics.median(paired), 3),
                                                          "q1": round(quartiles[0], 3), "q3": round(quartiles[2], 3)}
    return out


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--runs", type=int, default=50, help="timed requests per route (default 50)")
    p.add_argument("--warmup", type=int, default=3, help="untimed rounds first (default 3)")
    p.add_argument("--size", type=int, default=1024, help="side of the reference and result images (default 1024)")
    p.add_argument("--cache-dir", help="where the tiny model is built / found (default: the server's)")
    p.add_argument("--json-out", help="write the result as JSON here")
    a = p.parse_args(argv)

    app, svc = build_app(a.size, a.cache_dir)
    reqs = requests_for(a.size, png(fixed_image(a.size, seed=1)))
    try:
        samples = asyncio.run(measure(app, reqs, a.runs, a.warmup))
    finally:
        app.state.server.engine.drain(5)
    result = {"date": datetime.now(timezone.utc).isoformat(timespec="seconds"), "commit": git_commit(),
              "command": " ".join([Path(sys.argv[0]).name, *(argv if argv is not None else sys.argv[1:])]),
              "machine": {"platform": platform.platform(), "processor": platform.processor() or platform.machine(),
                          "cpus": len(os.sched_getaffinity(0))},
              "size": a.size, "runs": a.runs, "warmup": a.warmup,
              "request_bytes": {k: len(v[1]) for k, v in reqs.items()}, **summarise(samples),
              "samples_ms": {c: {k: [round(x, 3) for x in v] for k, v in by.items()} for c, by in samples.items()}}
    for clock in ("wall", "cpu"):
        r = result[clock]
        for pair in ("t2i", "edit"):
            d = r[pair + "_paired_difference_ms"]
            print(f"{clock:4s} {pair:4s}  /inference {r['median_ms'][pair + '/inference']:8.2f} ms   "
                  f"OpenAI {r['median_ms'][pair + '/openai']:8.2f} ms   difference "
                  f"{r[pair + '_openai_minus_inference_ms']:+.2f} ms (medians of {a.runs}, {a.size}x{a.size}); "
                  f"paired {d['median']:+.2f} ms [{d['q1']:+.2f}, {d['q3']:+.2f}]")
    if a.json_out:
        Path(a.json_out).parent.mkdir(parents=True, exist_ok=True)
        Path(a.json_out).write_text(json.dumps(result, indent=1) + "\n")
        print(f"JSON: {a.json_out}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
