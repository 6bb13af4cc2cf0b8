#!/usr/bin/env python
"""Where one denoising step's time goes: torch profiler over real transformer calls, summarised by kernel kind.

    python tools/profile_step.py --model synthetic-full --workload edit-1024 \
        --optimizations qkv_fusion,attention,compile
    python tools/profile_step.py --model synthetic-full --workload t2i-1024 --optimizations all --flags use_mxfp4=true

It prepares the given optimisations, runs one warm-up generation through FluxService (compile / capture happen
there), records the inputs of a mid-denoising transformer call, then profiles `--calls` calls of the transformer
the request's plan selects. Prints a table of device time per kernel category (GEMM, attention, quantisation,
normalisation / elementwise, copies, other) against the floor model, the top kernels, and writes a Chrome trace
and the summary JSON to --out-dir. Works on CPU too (times are then CPU times).
"""
from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path


import torch

from kontext_server.benchmark import fidelity, floor
from kontext_server.benchmark.profiling import category
from kontext_server.benchmark.workloads import add_model_and_workload_args, parse_flags, workload_request
from kontext_server.request import InferenceRequest
from optimizations.base import EXACT
from kontext_server.service import FluxService, ServiceConfig

def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    add_model_and_workload_args(p, "t2i-1024")
    p.add_argument("--flags", nargs="*", action="append",
                   help="request flags, e.g. use_mxfp4=true; repeat --flags to profile several plans in one process")
    p.add_argument("--compile-mode", default="default")
    p.add_argument("--compile-scope", default="regional", choices=["regional", "full"])
    p.add_argument("--inductor-flags", default="light")
    p.add_argument("--no-compile-vae", action="store_true", help="compile the transformer only (faster experiments)")
    p.add_argument("--calls", type=int, default=3)
    p.add_argument("--top", type=int, default=15)
    p.add_argument("--out-dir", default="benchmarks/latest")
    a = p.parse_args(argv)

    svc = FluxService(ServiceConfig(model=a.model, device=a.device, optimizations=a.optimizations,
                                    compile_mode=a.compile_mode, compile_scope=a.compile_scope,
                                    inductor_flags=a.inductor_flags, compile_vae=not a.no_compile_vae))
    svc.load()
    width, height, image = workload_request(a)
    reports = [profile_plan(svc, a, width, height, image, parse_flags(flags)) for flags in (a.flags or [[]])]
    gib = {k: round(v / 2**30, 2) for k, v in svc.health()["transformer_variant_bytes"].items()}
    print(f"\ntransformer weights per variant (GiB): {gib}")
    if cuda_mem := (torch.cuda.max_memory_allocated() / 2**30 if svc.device_info.is_cuda else None):
        print(f"peak GPU memory allocated over the whole run: {cuda_mem:.2f} GiB")
    if len(reports) > 1:
        print("\n| plan | ms per step | floor | ratio | cold start (s) |\n|---|---|---|---|---|")
        for r in reports:
            print(f"| {', '.join(r['applied'])} | {r['ms_per_step']:.1f} | {r['floor_ms'] or 0:.1f} | "
                  f"{r['ms_per_step'] / r['floor_ms'] if r['floor_ms'] else 0:.2f} | {r['cold_start_s']:.1f} |")
    return 0


def profile_plan(svc, a, width, height, image, flags: dict) -> dict:
    """Warm up one plan (compile / capture), then profile `a.calls` transformer calls; prints and saves a summary."""
    req = InferenceRequest(prompt="make the car red", width=width, height=height, steps=4, seed=1, **flags)
    probe = fidelity.StepProbe(call_index=2)
    svc.transformer_call_observer = probe.observe
    try:
        warm = svc.generate(req, image)  # warm-up: compile / capture, and the probe records real step inputs
    finally:
        svc.transformer_call_observer = None
    cold_start_s = warm.timings_ms.get("cold_start", 0.0) / 1000  # the service's own compile / capture time
    plan = svc.plan(req)
    transformer = svc.transformer_for(plan)
    cuda = svc.device_info.is_cuda
    with torch.inference_mode():
        transformer(**probe.inputs)  # one more un-profiled call: no lazy init inside the profile
        activities = [torch.profiler.ProfilerActivity.CPU] + ([torch.profiler.ProfilerActivity.CUDA] if cuda else [])
        with torch.profiler.profile(activities=activities) as prof:
            for _ in range(a.calls):
                transformer(**probe.inputs)
            if cuda:
                torch.cuda.synchronize()

    attr = "self_device_time_total" if cuda else "self_cpu_time_total"
    events = [e for e in prof.key_averages() if getattr(e, attr, 0) > 0]
    if cuda:  # device time lives on kernels; CPU-side aten ops would double count
        events = [e for e in events if e.device_type == torch.autograd.DeviceType.CUDA]
    per_cat: dict[str, float] = {}
    for e in events:
        per_cat[category(e.key)] = per_cat.get(category(e.key), 0.0) + getattr(e, attr) / 1000 / a.calls
    step_ms = sum(per_cat.values())
    seq = floor.seq_len_for(width, height, image is not None)
    fp8 = plan["low_precision"].applied
    floor_ms = floor.floor_ms_per_step(svc.transformer_variants[EXACT], seq, fp8) if cuda else None
    top = sorted(events, key=lambda e: getattr(e, attr), reverse=True)[: a.top]

    applied = [k for k, d in plan.items() if d.applied]
    print(f"\n{a.workload} {width}x{height} (L={seq}) on {svc.device_info.name}; applied: {', '.join(applied)}; "
          f"compile mode {a.compile_mode}, scope {a.compile_scope}, inductor flags {a.inductor_flags}")
    print(f"{'device' if cuda else 'CPU'} time per transformer call: {step_ms:.1f} ms"
          + (f" (floor {floor_ms:.1f} ms, ratio {step_ms / floor_ms:.2f})" if floor_ms else ""))
    print("\n| category | ms per step | share |\n|---|---|---|")
    for cat, ms in sorted(per_cat.items(), key=lambda kv: -kv[1]):
        print(f"| {cat} | {ms:.2f} | {ms / step_ms:.0%} |")
    print("\n| top kernels | ms per step | calls per step |\n|---|---|---|")
    for e in top:
        print(f"| {e.key[:90]} | {getattr(e, attr) / 1000 / a.calls:.2f} | {e.count // a.calls} |")

    out = Path(a.out_dir)
    out.mkdir(parents=True, exist_ok=True)
    stem = f"profile-{a.workload}-{a.compile_mode}-{a.inductor_flags}-{'-'.join(applied) or 'none'}"[:120]
    prof.export_chrome_trace(str(out / f"{stem}.trace.json"))
    launched_by = launchers(out / f"{stem}.trace.json", [e.key for e in top])
    print("\n| top kernels | launched under (CPU op: calls) |\n|---|---|")
    for e in top:
        print(f"| {e.key[:70]} | {', '.join(f'{op[:60]}: {n}' for op, n in launched_by.get(e.key, {}).items())} |")
    report = {
        "workload": a.workload, "width": width, "height": height, "seq_len": seq, "device": svc.device_info.name,
        "compile": {"mode": a.compile_mode, "scope": a.compile_scope, "inductor_flags": a.inductor_flags},
        "applied": applied, "cold_start_s": round(cold_start_s, 2), "ms_per_step": step_ms, "floor_ms": floor_ms,
        "by_category_ms": per_cat,
        "top": [{"kernel": e.key, "ms_per_step": getattr(e, attr) / 1000 / a.calls, "calls": e.count // a.calls,
                 "launched_by": launched_by.get(e.key, {})} for e in top]}
    (out / f"{stem}.json").write_text(json.dumps(report, indent=1))
    print(f"\ntrace: {out / (stem + '.trace.json')}")
    return report


def launchers(trace_path: Path, kernels: list[str], most: int = 3) -> dict[str, dict[str, int]]:
    """For each named kernel (or memset / memcpy), the innermost CPU ops it was launched under, most frequent first:
    the trace links each device event to its runtime call by correlation id, and the runtime call lies inside the
    CPU ops recorded on its thread. Tells where kernels without a telling name come from (e.g. memsets)."""
    from collections import Counter

    events = json.loads(trace_path.read_text()).get("traceEvents", [])
    wanted = set(kernels)
    device = {e["args"]["correlation"]: e["name"] for e in events
              if e.get("name") in wanted and e.get("ph") == "X" and "correlation" in e.get("args", {})
              and e.get("cat") in ("kernel", "gpu_memset", "gpu_memcpy")}
    runtime = sorted((e for e in events if e.get("cat") in ("cuda_runtime", "cuda_driver")
                      and e.get("args", {}).get("correlation") in device), key=lambda e: e["ts"])
    ops: dict = {}
    for e in events:
        if e.get("cat") == "cpu_op" and e.get("ph") == "X":
            ops.setdefault((e["pid"], e["tid"]), []).append(e)
    counts: dict[str, Counter] = {}
    for key, thread_ops in ops.items():
        thread_ops.sort(key=lambda e: (e["ts"], -e["dur"]))
        stack, i = [], 0
        for r in (r for r in runtime if (r["pid"], r["tid"]) == key):
            while i < len(thread_ops) and thread_ops[i]["ts"] <= r["ts"]:
                stack.append(thread_ops[i])
                i += 1
            while stack and stack[-1]["ts"] + stack[-1]["dur"] < r["ts"]:
                stack.pop()
            inner = next((o["name"] for o in reversed(stack) if o["ts"] + o["dur"] >= r["ts"]), "(no CPU op)")
            counts.setdefault(device[r["args"]["correlation"]], Counter())[inner] += 1
    return {k: dict(c.most_common(most)) for k, c in counts.items()}


if __name__ == "__main__":
    sys.exit(main())
