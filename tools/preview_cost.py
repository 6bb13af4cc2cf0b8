#!/usr/bin/env python
"""What streamed partial images cost a request: the same request with and without the previews a stream decodes.

    # on a GPU machine (the measurement that counts: synthetic-full, edit-1024, the fast tier, 3 partial images)
    bash tools/gpu_session.sh py tools/preview_cost.py --model synthetic-full --workload edit-1024 \
        --optimizations auto --quality low --partial-images 3 --runs 3 --json-out "$OUT/preview_cost.json"
    # on a CPU, with the tiny model
    python tools/preview_cost.py --model tiny --device cpu --workload edit-512 --quality low --runs 5

`--quality` sets the request flags of an OpenAI quality tier (kontext_server.api.openai.serving.TIERS); `--flags`
adds or overrides single flags. The measurement is kontext_server.benchmark.previews.run_preview_benchmark: plain and
streamed runs interleaved after one warm-up of each; the JSON holds every run's figures. The budget is the previews'
time under 10% of the plain request (`preview_fraction_of_request`).
"""
from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

from kontext_server.api.openai.serving import TIERS
from kontext_server.benchmark.previews import run_preview_benchmark
from kontext_server.benchmark.workloads import add_model_and_workload_args, parse_flags, workload_request
from kontext_server.service import FluxService, ServiceConfig


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    add_model_and_workload_args(p, "edit-1024")
    p.add_argument("--quality", choices=sorted(TIERS), default="low", help="an OpenAI quality tier (default low)")
    p.add_argument("--flags", nargs="*", default=[], help="request flags on top of the tier, e.g. use_cuda_graphs=true")
    p.add_argument("--steps", type=int, default=None, help="denoising steps (default: the tier's)")
    p.add_argument("--partial-images", type=int, default=3, choices=[1, 2, 3])
    p.add_argument("--runs", type=int, default=3)
    p.add_argument("--cache-dir", default=None)
    p.add_argument("--json-out", help="write the result as JSON here")
    a = p.parse_args(argv)

    svc = FluxService(ServiceConfig(model=a.model, device=a.device, optimizations=a.optimizations,
                                    cache_dir=Path(a.cache_dir) if a.cache_dir else None))
    svc.load()
    width, height, image = workload_request(a)
    flags = {**TIERS[a.quality], **parse_flags(a.flags)}
    result = run_preview_benchmark(svc, width, height, image is not None, partial_images=a.partial_images,
                                   runs=a.runs, steps=a.steps, flags=flags)
    result.update(workload_name=a.workload, quality=a.quality, optimizations=a.optimizations)
    w = result["workload"]
    print(f"{a.workload} {width}x{height} steps={w['steps']} quality={a.quality} on {result['device']} "
          f"({result['model']}); applied: {', '.join(result['applied'])}")
    print(f"plain request {result['plain_total_ms']} ms, streamed {result['streamed_total_ms']} ms; "
          f"{result['previews_per_request']} previews at steps {w['preview_steps']}: "
          f"{result['preview_ms_per_request']} ms ({result['ms_per_preview']} ms each) = "
          f"{100 * result['preview_fraction_of_request']:.1f}% of the plain request "
          f"(wall difference {100 * result['wall_overhead_fraction']:.1f}%); a preview costs "
          f"{result['preview_over_vae_decode']}x the request's final VAE decode ({result['vae_decode_ms']} ms); "
          f"PNG encode per preview (thread pool) {result['png_encode_ms_per_preview']} ms")
    if a.json_out:
        Path(a.json_out).write_text(json.dumps(result, indent=1) + "\n")
        print(f"JSON: {a.json_out}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
