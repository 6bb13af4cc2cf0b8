#!/usr/bin/env python
"""The time a client waits against the time the service reports: a real server over HTTP, per input kind.

    python tools/request_overhead.py --model synthetic-full --workload edit-1024 --runs 3 --json-out r.json
    python tools/request_overhead.py --model tiny --device cpu --workload edit-512 --width 256 --height 256 \
        --steps 2 --optimizations none --runs 3          # the quick CPU check the tests run

What: starts `flux_kontext_optimized.py serve` (warmed up at the workload's shape), then for each input kind sends
one untimed request and `--runs` timed ones to /inference, sequentially, with PNG output:
- `noise`: a random-pixel reference image (PNG's worst case; it is also what random weights output);
- `smooth`: the benchmarks' own reference image (smooth gradients), closer to a photograph than noise.
For each it reports the client's wall time (the request body prepared beforehand, the JSON parsed after), the
response's `total` (the generation) and `request_total`, the host phases the route reports (`decode_input`,
`encode_output`), and wall / total (target for the fast tier at 1024x1024: <= 1.05). Then, on this host, it
re-encodes one returned image and the input with the server's PNG encoder and with PIL's at zlib levels 1 and 6.
Why: the stage table measures the service; the user waits for the whole request (base64, PNG decode / encode,
JSON), during which the GPU idles. Text-to-image workloads have no input: `noise` / `smooth` then only name a run.
Limits: one client, sequential requests (no overlap with a queued request's GPU work is measured here). The output
of random weights is noise whatever the input, so on `synthetic-full` the output PNG is the worst case in both rows.
"""
from __future__ import annotations

import argparse
import base64
import io
import json
import statistics
import sys
import time
from pathlib import Path

import httpx
import numpy as np
from PIL import Image

from kontext_server.benchmark.floor import WORKLOADS
from kontext_server.benchmark.timing import test_image  # the benchmarks' smooth reference image
from load_test import ServerProcess  # tools/ beside this script
from utils import encode_image_bytes

FAST_TIER = {"use_mxfp4": True, "use_dpm_solver": True}  # the OpenAI route's quality=low (CUDA graphs: server auto)


def noise_image(w: int, h: int, seed: int = 0) -> Image.Image:
    return Image.fromarray(np.random.default_rng(seed).integers(0, 256, (h, w, 3), dtype=np.uint8))


def png_b64(img: Image.Image) -> str:
    buf = io.BytesIO()
    img.save(buf, format="PNG")
    return base64.b64encode(buf.getvalue()).decode("ascii")


def encode_cost(img: Image.Image, encoder: str, repeats: int = 3) -> dict:
    """Median ms and bytes of one PNG encode here: `server` (utils.encode_image_bytes: the server's encoder and
    level) or PIL's own encoder at `pil_level_1` / `pil_level_6`."""
    times, size = [], 0
    for _ in range(repeats):
        buf = io.BytesIO()
        t0 = time.perf_counter()
        if encoder == "server":
            buf.write(encode_image_bytes(img, "png"))
        else:
            img.save(buf, format="PNG", compress_level=int(encoder.rsplit("_", 1)[1]))
        times.append((time.perf_counter() - t0) * 1000)
        size = buf.tell()
    return {"ms": round(statistics.median(times), 2), "bytes": size}


ENCODERS = ("server", "pil_level_1", "pil_level_6")


def measure(url: str, body: dict, runs: int, timeout: float) -> dict:
    data = json.dumps(body).encode()
    headers = {"content-type": "application/json"}
    rows = []
    with httpx.Client(timeout=timeout) as client:
        for i in range(runs + 1):
            t0 = time.perf_counter()
            r = client.post(url + "/inference", content=data, headers=headers)
            out = r.json()
            wall = (time.perf_counter() - t0) * 1000
            if r.status_code != 200:
                raise SystemExit(f"request failed: {r.status_code} {r.text[:500]}")
            if i == 0:
                continue  # untimed: any cold start (a compile, a capture, the first allocation) stays out
            t = out["timings_ms"]
            rows.append({"wall_ms": wall, "total_ms": t["total"], "request_total_ms": t["request_total"],
                         "decode_input_ms": t.get("decode_input", 0.0), "encode_output_ms": t["encode_output"],
                         "response_bytes": len(r.content), "cold_start": "cold_start" in t})
    med = {k: round(statistics.median(r[k] for r in rows), 2) for k in rows[0] if k.endswith(("_ms", "_bytes"))}
    med["wall_over_total"] = round(med["wall_ms"] / med["total_ms"], 4)
    med["host_outside_total_ms"] = round(med["wall_ms"] - med["total_ms"], 2)
    return {"median": med, "runs": rows, "last_image": out["images"][0], "applied": sorted(
        k for k, d in out["optimizations"].items() if d["applied"])}


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0], formatter_class=argparse.RawTextHelpFormatter)
    p.add_argument("--model", default="synthetic-full")
    p.add_argument("--device", default=None, help="cuda / cpu (default: cuda when this machine has one)")
    p.add_argument("--workload", choices=sorted(WORKLOADS), default="edit-1024")
    p.add_argument("--width", type=int)
    p.add_argument("--height", type=int)
    p.add_argument("--optimizations", default="auto")
    p.add_argument("--tier", choices=["fast", "exact"], default="fast", help="fast: fp8 + DPM-Solver++ (+ graphs)")
    p.add_argument("--steps", type=int, help="default: the tier's")
    p.add_argument("--runs", type=int, default=3)
    p.add_argument("--inputs", default="noise,smooth")
    p.add_argument("--timeout", type=float, default=900, help="seconds for the server's start (compiles included)")
    p.add_argument("--cache-dir")
    p.add_argument("--json-out")
    a = p.parse_args(argv)
    width, height, edit = WORKLOADS[a.workload]
    width, height = a.width or width, a.height or height
    flags = dict(FAST_TIER) if a.tier == "fast" else {}
    warm = f"{'edit:' if edit else ''}{width}x{height}"
    import torch  # only to choose the device: the server is another process

    device = a.device or ("cuda" if torch.cuda.is_available() else "cpu")
    extra = ["--model", a.model, "--optimizations", a.optimizations, "--warmup", warm, "--device", device]
    server = ServerProcess(extra=extra, cache_dir=a.cache_dir)
    result = {"tool": "tools/request_overhead.py", "argv": sys.argv[1:], "model": a.model, "workload": a.workload,
              "width": width, "height": height, "edit": edit, "tier": a.tier, "flags": flags, "inputs": {}}
    try:
        server.wait_ready(timeout=a.timeout)
        health = httpx.get(server.url + "/health", timeout=10).json()
        result["device"] = health.get("device", {}).get("name") if isinstance(health.get("device"), dict) \
            else health.get("device")
        for kind in a.inputs.split(","):
            body = {"prompt": "make the sky golden", "width": width, "height": height, "seed": 7,
                    "output_format": "png", **flags, **({"steps": a.steps} if a.steps else {})}
            if edit:
                img = noise_image(width, height) if kind == "noise" else test_image(width, height)
                body["image"] = png_b64(img)
            result["inputs"][kind] = measure(server.url, body, a.runs, timeout=a.timeout)
    finally:
        server.stop()
    for kind, r in result["inputs"].items():
        out_img = Image.open(io.BytesIO(base64.b64decode(r.pop("last_image"))))
        r["output_png_here"] = {e: encode_cost(out_img, e) for e in ENCODERS}
        if edit:
            ref = noise_image(width, height) if kind == "noise" else test_image(width, height)
            r["input_png_here"] = {e: encode_cost(ref, e) for e in ENCODERS}
    print(f"{a.workload} {width}x{height} tier={a.tier} on {result.get('device')} ({a.model}); "
          f"applied: {', '.join(next(iter(result['inputs'].values()))['applied'])}")
    print("| input | wall | total | wall / total | request_total | decode_input | encode_output | response |")
    print("|---|---|---|---|---|---|---|---|")
    for kind, r in result["inputs"].items():
        m = r["median"]
        print(f"| {kind} | {m['wall_ms']:.1f} ms | {m['total_ms']:.1f} ms | {m['wall_over_total']:.3f} | "
              f"{m['request_total_ms']:.1f} ms | {m['decode_input_ms']:.1f} ms | {m['encode_output_ms']:.1f} ms | "
              f"{m['response_bytes'] / 1e6:.2f} MB |")
    for kind, r in result["inputs"].items():
        for what in ("output_png_here", "input_png_here"):
            if what in r:
                print(f"{kind} {what.split('_')[0]} PNG on this host: " + ", ".join(
                    f"{e} {c['ms']:.1f} ms / {c['bytes']} B" for e, c in r[what].items()))
    if a.json_out:
        Path(a.json_out).write_text(json.dumps(result, indent=1))
        print(f"JSON: {a.json_out}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
