"""The cost of the context-parallel path at N=1: one request through the split path (a group of one rank: the agreement
before each transformer call, the split and gather, para-attn's attention mode around SDPA) against today's path, on
the same loaded model, interleaved run by run so that clock drift under the power cap falls on both alike.

    bash tools/gpu_session.sh py tools/cp_overhead.py --model synthetic-full --workload edit-1024 \\
        --optimizations qkv_fusion,channels_last,modulation_table,compile,attention --out "$OUT/cp_overhead.json"
    .venv/bin/python tools/cp_overhead.py --model tiny --width 256 --height 256 --steps 2 --runs 3   # a CPU check

Prints and writes (JSON) each path's median total and transformer step, and the overhead (target: at most 2%).
"""
from __future__ import annotations

import argparse
import json
import statistics
import sys
import time
from pathlib import Path


def main(argv: list[str] | None = None) -> dict:
    from kontext_server.cli import WORKLOAD_NAMES

    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--model", default="synthetic-full")
    p.add_argument("--device", default=None)
    p.add_argument("--optimizations", default="qkv_fusion,channels_last,modulation_table,compile,attention",
                   help="prepared at load (default: the exact tier's load-time optimisations)")
    p.add_argument("--workload", choices=WORKLOAD_NAMES, help="a benchmark workload (else --width/--height/--edit)")
    p.add_argument("--width", type=int, default=1024)
    p.add_argument("--height", type=int, default=1024)
    p.add_argument("--edit", action="store_true")
    p.add_argument("--steps", type=int, default=28)
    p.add_argument("--runs", type=int, default=5, help="timed runs of each path (interleaved)")
    p.add_argument("--flags", default="", help="request flags, e.g. use_mxfp4=true,use_first_block_cache=true")
    p.add_argument("--out", help="JSON file to write")
    a = p.parse_args(argv)

    from kontext_server.startup import prepare_process

    prepare_process()
    import torch

    from kontext_server.benchmark.floor import WORKLOADS
    from kontext_server.benchmark.timing import test_image
    from kontext_server.parallel.service import ParallelService
    from kontext_server.request import InferenceRequest
    from kontext_server.service import ServiceConfig

    width, height, edit = WORKLOADS[a.workload] if a.workload else (a.width, a.height, a.edit)
    flags = {k: v.lower() in ("1", "true", "yes") for k, v in (f.split("=") for f in a.flags.split(",") if f)}
    svc = ParallelService(ServiceConfig(model=a.model, device=a.device, optimizations=a.optimizations,
                                        context_parallel=1))
    svc.load()
    image = test_image(width, height) if edit else None
    req = InferenceRequest(prompt="make the car red, photo", width=width, height=height, steps=a.steps, seed=1234,
                           **flags)
    paths = {"today": svc.generate_alone, "split_n1": svc.generate}
    cold = {}
    for name, gen in paths.items():  # compile / capture each path's graphs before timing
        t0 = time.perf_counter()
        gen(req, image, output_type="np")
        cold[name] = round((time.perf_counter() - t0) * 1000, 1)
    runs: dict[str, list] = {name: [] for name in paths}
    for i in range(a.runs):
        order = list(paths) if i % 2 == 0 else list(reversed(paths))  # ABBA: neither path always runs first
        for name in order:
            res = paths[name](req, image, output_type="np")
            runs[name].append(res.timings_ms)
    out = {"model": a.model, "device": svc.device_info.name, "torch": torch.__version__,
           "workload": {"width": width, "height": height, "edit": edit, "steps": a.steps, "flags": flags},
           "prepared": sorted(svc.prepared), "runs": a.runs, "first_call_ms": cold, "paths": {}}
    for name, timings in runs.items():
        out["paths"][name] = {k: round(statistics.median(t[k] for t in timings), 3)
                              for k in ("total", "transformer", "transformer_per_step")}
        out["paths"][name]["totals_ms"] = [round(t["total"], 2) for t in timings]
    today, split = out["paths"]["today"], out["paths"]["split_n1"]
    out["overhead_total"] = round(split["total"] / today["total"] - 1, 4)
    out["overhead_step"] = round(split["transformer_per_step"] / today["transformer_per_step"] - 1, 4)
    out["target"] = "overhead at most 0.02"
    out["met"] = out["overhead_total"] <= 0.02
    print(json.dumps(out, indent=1))
    if a.out:
        Path(a.out).write_text(json.dumps(out, indent=1))
    svc.close()
    return out


if __name__ == "__main__":
    main(sys.argv[1:])
