#!/usr/bin/env python
"""Where a whole request's time goes: the GPU's busy and idle time, and the host phase that left it idle.

    python tools/profile_request.py --model synthetic-full --workload edit-512 \
        --optimizations \
        qkv_fusion,channels_last,modulation_table,compile,attention,low_precision,dpm_solver,cuda_graphs \
        --flags use_mxfp4=true use_dpm_solver=true use_cuda_graphs=true

The stage table's `glue` column is the request's wall time minus the device time of its stages. It says how much,
not where. This tool runs the request twice (compile / capture, then one clean run), times `--requests` runs
without the profiler (the service's stage timings, for comparison), and then profiles `--requests` runs with the
torch profiler. For the profile only, the pipeline's phases are marked with record_function ranges:
- the service's stages (text encode, image encode, transformer, VAE decode), from its stage timer;
- the pipeline's own steps: encode_prompt, prepare_latents, check_inputs, image preprocess / postprocess, and the
  scheduler's set_timesteps and step.
For each phase it reports the wall time and the GPU time inside it. GPU idle time (no kernel, copy or memset
running) goes to the innermost phase open at that moment: that is the host work the GPU waited for. CUDA runtime
calls that blocked the host (synchronisations, blocking copies, launches into a full queue) are listed with their
phase. The profiler slows the host (more so with CUDA graphs, whose kernels it traces one by one), so idle time in
the denoising loop can be the profiler's own; the phases before and after the loop are what this is for. On CPU
there is no device timeline: only the phases' wall times.
"""
from __future__ import annotations

import argparse
import bisect
import contextlib
import functools
import json
import sys
from pathlib import Path


import torch
from torch.profiler import record_function

import utils
from kontext_server.benchmark.workloads import add_model_and_workload_args, parse_flags, workload_request
from kontext_server.request import InferenceRequest
from kontext_server.service import FluxService, ServiceConfig

UNMARKED = "(pipeline, unmarked)"
GPU_CATEGORIES = ("kernel", "gpu_memcpy", "gpu_memset")
SLOW_CALL_US = 50  # a CUDA runtime call longer than this blocked the host: a wait on the GPU, or a full launch queue


@contextlib.contextmanager
def _marked(obj, attr: str, label: str):
    """Wrap `obj.attr` in a record_function range for the duration: an instance's method, or a class's (looked up
    through the class's bases, and put back as it was)."""
    original = getattr(obj, attr)
    had_own = attr in obj.__dict__
    saved = obj.__dict__.get(attr)

    @functools.wraps(original)  # keeps the signature: diffusers inspects set_timesteps' parameters
    def marked(*args, **kwargs):
        with record_function(label):
            return original(*args, **kwargs)

    if isinstance(obj, type):
        setattr(obj, attr, marked)
    else:
        obj.__dict__[attr] = marked
    try:
        yield
    finally:
        if had_own:
            setattr(obj, attr, saved) if isinstance(obj, type) else obj.__dict__.__setitem__(attr, saved)
        else:
            delattr(obj, attr) if isinstance(obj, type) else obj.__dict__.pop(attr)


@contextlib.contextmanager
def _stage_timer_marks():
    """The service's StageTimer opens and closes a record_function range per stage as well."""
    start, stop = utils.StageTimer.start, utils.StageTimer.stop
    open_ranges: dict = {}

    def marked_start(self, stage):
        rf = record_function(f"stage:{stage}")
        rf.__enter__()
        open_ranges[(id(self), stage)] = rf
        start(self, stage)

    def marked_stop(self, stage):
        stop(self, stage)
        rf = open_ranges.pop((id(self), stage), None)
        if rf is not None:
            rf.__exit__(None, None, None)

    utils.StageTimer.start, utils.StageTimer.stop = marked_start, marked_stop
    try:
        yield
    finally:
        utils.StageTimer.start, utils.StageTimer.stop = start, stop


def phase_marks(svc) -> contextlib.ExitStack:
    stack = contextlib.ExitStack()
    stack.enter_context(_stage_timer_marks())
    pipe = svc.pipe
    for attr in ("encode_prompt", "prepare_latents", "check_inputs", "_unpack_latents"):
        stack.enter_context(_marked(pipe, attr, f"pipe:{attr}"))
    for attr in ("preprocess", "postprocess", "resize"):
        stack.enter_context(_marked(pipe.image_processor, attr, f"image_processor:{attr}"))
    # Schedulers at class level: the DPM-Solver optimisation swaps its scheduler in per request.
    for cls in {type(pipe.scheduler), type(svc.registry["dpm_solver"].scheduler or pipe.scheduler)}:
        for attr in ("set_timesteps", "step"):
            stack.enter_context(_marked(cls, attr, f"scheduler:{attr}"))
    return stack


# ---- trace analysis ---------------------------------------------------------------------------------------------
class Busy:
    """Union of GPU activity intervals; `inside(a, b)` is the busy time within [a, b] (microseconds)."""

    def __init__(self, intervals):
        merged = []
        for a, b in sorted(intervals):
            if merged and a <= merged[-1][1]:
                merged[-1][1] = max(merged[-1][1], b)
            else:
                merged.append([a, b])
        self.starts = [a for a, _ in merged]
        self.ends = [b for _, b in merged]
        self.cum = [0.0]
        for a, b in merged:
            self.cum.append(self.cum[-1] + b - a)

    def _upto(self, t):  # busy time in (-inf, t]
        i = bisect.bisect_right(self.starts, t)
        if i == 0:
            return 0.0
        return self.cum[i - 1] + min(t, self.ends[i - 1]) - self.starts[i - 1]

    def inside(self, a, b):
        return max(0.0, self._upto(b) - self._upto(a))


def analyse(trace: dict) -> list[dict]:
    """One summary per profiled request (a `request` range in the trace)."""
    events = [e for e in trace.get("traceEvents", []) if e.get("ph") == "X" and "dur" in e]
    gpu = Busy((e["ts"], e["ts"] + e["dur"]) for e in events if e.get("cat") in GPU_CATEGORIES)
    has_gpu = bool(gpu.starts)
    marks = [e for e in events if e.get("cat") == "user_annotation"]
    waits = [e for e in events if e.get("cat") == "cuda_runtime" and e["dur"] >= SLOW_CALL_US]
    out = []
    for req in (e for e in marks if e["name"] == "request"):
        r0, r1 = req["ts"], req["ts"] + req["dur"]
        inner = sorted((e for e in marks if e is not req and r0 <= e["ts"] and e["ts"] + e["dur"] <= r1),
                       key=lambda e: (e["ts"], -e["dur"]))
        phases: dict[str, dict] = {}

        def add(name, key, value):
            p = phases.setdefault(name, {"calls": 0, "wall_ms": 0.0, "own_ms": 0.0, "gpu_busy_ms": 0.0,
                                         "gpu_idle_ms": 0.0})
            p[key] += value

        for e in inner:
            add(e["name"], "calls", 1)
            add(e["name"], "wall_ms", e["dur"] / 1000)
        # Elementary segments between range boundaries; each belongs to the innermost range open over it.
        bounds = sorted({r0, r1, *(e["ts"] for e in inner), *(e["ts"] + e["dur"] for e in inner)})
        for a, b in zip(bounds, bounds[1:]):
            mid = (a + b) / 2
            owner = UNMARKED
            for e in inner:  # sorted by start: the last one containing mid is the innermost
                if e["ts"] > mid:
                    break
                if mid < e["ts"] + e["dur"]:
                    owner = e["name"]
            busy = gpu.inside(a, b) if has_gpu else 0.0
            add(owner, "own_ms", (b - a) / 1000)
            add(owner, "gpu_busy_ms", busy / 1000)
            add(owner, "gpu_idle_ms", (b - a - busy) / 1000 if has_gpu else 0.0)
        host_waits: dict[str, dict] = {}
        for w in waits:
            if not r0 <= w["ts"] <= r1:
                continue
            owner = UNMARKED
            for e in inner:
                if e["ts"] > w["ts"]:
                    break
                if w["ts"] < e["ts"] + e["dur"]:
                    owner = e["name"]
            h = host_waits.setdefault(f"{w['name']} in {owner}", {"calls": 0, "ms": 0.0})
            h["calls"] += 1
            h["ms"] += w["dur"] / 1000
        busy_total = gpu.inside(r0, r1) / 1000 if has_gpu else None
        out.append({"wall_ms": round(req["dur"] / 1000, 3),
                    "gpu_busy_ms": round(busy_total, 3) if has_gpu else None,
                    "gpu_idle_ms": round(req["dur"] / 1000 - busy_total, 3) if has_gpu else None,
                    "phases": {k: {kk: round(vv, 3) for kk, vv in v.items()} for k, v in phases.items()},
                    "host_waits": {k: {"calls": v["calls"], "ms": round(v["ms"], 3)} for k, v in host_waits.items()}})
    return out


def to_markdown(summary: dict) -> str:
    lines = [f"wall {summary['wall_ms']:.1f} ms"
             + (f", GPU busy {summary['gpu_busy_ms']:.1f} ms, idle {summary['gpu_idle_ms']:.1f} ms"
                if summary["gpu_busy_ms"] is not None else ""),
             "", "| phase | calls | wall ms (inclusive) | own ms (innermost) | GPU busy ms (own) | GPU idle ms (own) |",
             "|---|---|---|---|---|---|"]
    for name, p in sorted(summary["phases"].items(), key=lambda kv: (-kv[1]["gpu_idle_ms"], -kv[1]["own_ms"])):
        lines.append(f"| {name} | {int(p['calls'])} | {p['wall_ms']:.1f} | {p['own_ms']:.1f} | "
                     f"{p['gpu_busy_ms']:.1f} | {p['gpu_idle_ms']:.1f} |")
    if summary["host_waits"]:
        lines += ["", f"| CUDA runtime calls over {SLOW_CALL_US} us (host blocked), in phase | calls | ms |",
                  "|---|---|---|"]
        for name, h in sorted(summary["host_waits"].items(), key=lambda kv: -kv[1]["ms"]):
            lines.append(f"| {name} | {h['calls']} | {h['ms']:.1f} |")
    return "\n".join(lines)


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    add_model_and_workload_args(p, "edit-512")
    p.add_argument("--flags", nargs="*", default=[], help="request flags, e.g. use_mxfp4=true use_cuda_graphs=true")
    p.add_argument("--steps", type=int, default=None, help="denoising steps (default: the scheduler's)")
    p.add_argument("--requests", type=int, default=2)
    p.add_argument("--out-dir", default="benchmarks/latest")
    a = p.parse_args(argv)

    svc = FluxService(ServiceConfig(model=a.model, device=a.device, optimizations=a.optimizations))
    svc.load()
    width, height, image = workload_request(a)
    req = InferenceRequest(prompt="make the car red, photo", width=width, height=height, steps=a.steps, seed=1234,
                           **parse_flags(a.flags))
    for _ in range(2):  # compile / capture, then a clean run: nothing lazy left for the profile
        svc.generate(req, image, output_type="np")
    # The same requests without the profiler: what the profiler's own host cost did to the figures below.
    unprofiled = [svc.generate(req, image, output_type="np").timings_ms for _ in range(a.requests)]
    cuda = svc.device_info.is_cuda
    activities = [torch.profiler.ProfilerActivity.CPU] + ([torch.profiler.ProfilerActivity.CUDA] if cuda else [])
    results = []
    with phase_marks(svc), torch.profiler.profile(activities=activities) as prof:
        for _ in range(a.requests):
            with record_function("request"):
                results.append(svc.generate(req, image, output_type="np"))
    out = Path(a.out_dir)
    out.mkdir(parents=True, exist_ok=True)
    applied = [k for k, d in results[-1].optimizations.items() if d.applied]
    stem = f"request-{a.workload}-{width}x{height}"
    trace_path = out / f"{stem}.trace.json"
    prof.export_chrome_trace(str(trace_path))
    summaries = analyse(json.loads(trace_path.read_text()))
    print(f"\n{a.workload} {width}x{height} on {svc.device_info.name}; applied: {', '.join(applied)}")
    for i, t in enumerate(unprofiled):
        print(f"unprofiled request {i + 1}: service stage timings (ms) {t}")
    for i, (s, r) in enumerate(zip(summaries, results)):
        s["service_timings_ms"] = r.timings_ms
        print(f"\nrequest {i + 1}: service stage timings (ms) {r.timings_ms}\n{to_markdown(s)}")
    report = {"workload": a.workload, "width": width, "height": height, "device": svc.device_info.name,
              "torch": torch.__version__, "applied": applied, "requests": summaries,
              "unprofiled_service_timings_ms": unprofiled}
    (out / f"{stem}.json").write_text(json.dumps(report, indent=1))
    print(f"\nJSON: {out / (stem + '.json')}  trace: {trace_path}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
