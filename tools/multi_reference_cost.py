#!/usr/bin/env python
"""What each extra reference image costs: time and peak memory of the same request with 1, 2, 3 and 4 references.

    # on a GPU machine (the measurement that counts: synthetic-full, 1024x1024, the fast tier, 1-4 references)
    bash tools/gpu_session.sh py tools/multi_reference_cost.py --model synthetic-full --optimizations auto \
        --quality low --references 1,2,3,4 --runs 3 --json-out "$OUT/multi_reference_cost.json"
    # on a CPU, with the tiny model
    python tools/multi_reference_cost.py --model tiny --device cpu --width 256 --height 256 --steps 2 --runs 1

Every reference is a distinct structured test image at the output size (each adds (W/16) x (H/16) tokens: 4,096 at
1024x1024). Each count runs one warm-up (its compile / capture is a new shape, reported as cold start), then `runs`
timed runs; the row is kontext_server.benchmark.timing.summarise's (median run's stages, peak memory on CUDA). The
summary gives, per extra reference, the median total's and the transformer step's increase over one reference and
the peak memory's, with the floor model's step time for the same sequence length (benchmark/floor.py).
"""
from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

import torch
from PIL import Image, ImageOps

from kontext_server.api.openai.serving import TIERS
from kontext_server.benchmark.floor import floor_ms_per_step
from kontext_server.benchmark.timing import summarise, test_image, timed_run, warm_up
from kontext_server.benchmark.workloads import parse_flags
from kontext_server.request import MAX_REFERENCES, InferenceRequest
from kontext_server.service import FluxService, ServiceConfig

TEXT_TOKENS = 512


def references(width: int, height: int, n: int) -> list[Image.Image]:
    """n distinct structured images: the test image, mirrored, flipped, and both."""
    base = test_image(width, height)
    variants = [base, ImageOps.mirror(base), ImageOps.flip(base), ImageOps.flip(ImageOps.mirror(base))]
    return variants[:n]


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--model", default="synthetic-full")
    p.add_argument("--device", default=None)
    p.add_argument("--optimizations", default="auto")
    p.add_argument("--width", type=int, default=1024)
    p.add_argument("--height", type=int, default=1024)
    p.add_argument("--references", default="1,2,3,4", help="reference counts to measure, comma-separated (1-4)")
    p.add_argument("--quality", choices=sorted(TIERS), default="low", help="an OpenAI quality tier (default low)")
    p.add_argument("--flags", nargs="*", default=[], help="request flags on top of the tier, e.g. use_cuda_graphs=true")
    p.add_argument("--steps", type=int, default=None, help="denoising steps (default: the tier's)")
    p.add_argument("--runs", type=int, default=3)
    p.add_argument("--cache-dir", default=None)
    p.add_argument("--json-out", help="write the result as JSON here")
    a = p.parse_args(argv)
    counts = [int(c) for c in a.references.split(",") if c.strip()]
    if not counts or any(not 1 <= c <= MAX_REFERENCES for c in counts):
        p.error(f"--references: counts from 1 to {MAX_REFERENCES}")

    svc = FluxService(ServiceConfig(model=a.model, device=a.device, optimizations=a.optimizations,
                                    cache_dir=Path(a.cache_dir) if a.cache_dir else None))
    svc.load()
    cuda = svc.device_info.is_cuda
    flags = {**TIERS[a.quality], **parse_flags(a.flags)}
    req = InferenceRequest(prompt="put the object of every image on one table", width=a.width, height=a.height,
                           steps=a.steps, seed=0, **flags)
    image_tokens = (a.width // 16) * (a.height // 16)
    rows = {}
    seen: list[int] = []  # the image tokens (output + references) of each transformer call: the sequence it ran
    svc.transformer_call_observer = lambda kwargs: seen.append(int(kwargs["hidden_states"].shape[1]))
    for n in counts:
        refs = references(a.width, a.height, n)
        image = refs[0] if n == 1 else refs
        warm, warm_ms = warm_up(svc, req, image)
        if cuda:
            torch.cuda.synchronize()
            torch.cuda.reset_peak_memory_stats()
        seen.clear()
        results = [timed_run(svc, req, image) for _ in range(a.runs)]
        row = summarise(results, warm, warm_ms, None, cuda)
        last = row.pop("_result")
        seq_len = image_tokens * (1 + n) + TEXT_TOKENS
        fp8 = last.optimizations["low_precision"].applied
        row.update(references=n, seq_len=seq_len, reference_tokens=image_tokens * n,
                   image_tokens_seen=sorted(set(seen)),
                   floor_ms_per_step=round(floor_ms_per_step(svc.pipe.transformer, seq_len, fp8), 2) if cuda
                   else None)
        rows[n] = row
        print(f"{n} reference(s): L={seq_len} total {row['timings_ms']['total']:.1f} ms "
              f"(step {row['timings_ms']['transformer_per_step']:.1f} ms, image_encode "
              f"{row['timings_ms']['image_encode']:.1f} ms), peak {row['peak_memory_gib']} GiB, "
              f"cold start {row['cold_start_ms']:.0f} ms")
    per_extra = {}
    if 1 in rows:
        base = rows[1]
        for n, row in rows.items():
            if n == 1:
                continue
            k = n - 1
            per_extra[str(n)] = {
                "total_ms": round((row["timings_ms"]["total"] - base["timings_ms"]["total"]) / k, 1),
                "transformer_per_step_ms": round((row["timings_ms"]["transformer_per_step"]
                                                  - base["timings_ms"]["transformer_per_step"]) / k, 2),
                "image_encode_ms": round((row["timings_ms"]["image_encode"] - base["timings_ms"]["image_encode"]) / k,
                                         1),
                "peak_memory_gib": (round((row["peak_memory_gib"] - base["peak_memory_gib"]) / k, 2)
                                    if cuda else None),
            }
    result = {"model": a.model, "device": svc.device_info.name, "torch": torch.__version__,
              "width": a.width, "height": a.height, "quality": a.quality, "flags": flags, "runs": a.runs,
              "steps": next(iter(rows.values()))["steps"], "optimizations": a.optimizations,
              "rows": {str(n): row for n, row in rows.items()},
              "per_extra_reference_vs_one": per_extra}
    for n, d in per_extra.items():
        print(f"with {n} references, each one beyond the first adds {d['total_ms']} ms to the request, "
              f"{d['transformer_per_step_ms']} ms per step, {d['peak_memory_gib']} GiB peak memory")
    if a.json_out:
        Path(a.json_out).write_text(json.dumps(result, indent=1) + "\n")
        print(f"JSON: {a.json_out}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
