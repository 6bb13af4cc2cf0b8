#!/usr/bin/env python
"""Is a step slower when the GPU runs steps back to back? Per-call times and the GPU's clocks, sustained vs idle gaps.

    python bench/probe_sustained_step.py --model synthetic-full --workload t2i-1024 \
        --optimizations qkv_fusion,channels_last,modulation_table,compile,attention,low_precision,cuda_graphs \
        --flags use_mxfp4=true use_cuda_graphs=true --calls 100 --gapped-calls 12 --gap-ms 500

Why: at t2i-1024 the fp8 step with CUDA graphs took 86.4 ms in the stage table, 4.6 ms more than the device time of
the same kernels in a profile of three calls (81.8 ms; BENCHMARKS.md, "cuBLASLt workspace"). A profile runs a few
calls; the stage table runs 14-28 in a row. If the GPU lowers its clocks under sustained load (power cap, heat),
the same kernels take longer, and no software change to the kernels' launch removes that.

What it does: one warm-up generation through FluxService (compile / capture; the inputs of a mid-denoising
transformer call are recorded), then three phases on those inputs, with the transformer the request's plan selects
(the graph replay where CUDA graphs are applied):
- idle: `--idle-s` seconds with no work (the clocks at rest);
- sustained: `--calls` calls back to back, each timed with CUDA events, no host sync in between;
- gapped: `--gapped-calls` calls, each after a sync and `--gap-ms` of idle time.
Meanwhile `nvidia-smi` samples SM clock, power, temperature and the clock-event (throttle) reasons every
`--sample-ms`. Each phase reports its per-call times (all, the first 5, the last 20) and the samples inside it.
On CPU, or without nvidia-smi, it times the calls with host clocks and says why there are no clock samples.
"""
from __future__ import annotations

import argparse
import json
import statistics
import sys
import time
from pathlib import Path


import torch

from kontext_server.benchmark import fidelity, floor
from kontext_server.benchmark.gpu_clocks import ClockSampler
from kontext_server.benchmark.workloads import add_model_and_workload_args, parse_flags, workload_request
from kontext_server.request import InferenceRequest
from kontext_server.service import FluxService, ServiceConfig
from utils import cuda_ms


def summarise_calls(ms: list[float]) -> dict:
    return {"calls": len(ms), "median_ms": round(statistics.median(ms), 2), "min_ms": round(min(ms), 2),
            "max_ms": round(max(ms), 2), "first5_median_ms": round(statistics.median(ms[:5]), 2),
            "last20_median_ms": round(statistics.median(ms[-20:]), 2), "per_call_ms": [round(m, 3) for m in ms]}


def time_calls(call, n: int, cuda: bool, gap_s: float = 0.0) -> list[float]:
    """ms per call. Sustained (gap_s 0): events between calls, one sync at the end, so the GPU never waits for the
    host. Gapped: sync, sleep, then one timed call."""
    if not cuda:
        out = []
        for _ in range(n):
            time.sleep(gap_s)
            t0 = time.perf_counter()
            call()
            out.append((time.perf_counter() - t0) * 1000)
        return out
    if gap_s == 0:
        events = [torch.cuda.Event(enable_timing=True) for _ in range(n + 1)]
        events[0].record()
        for i in range(n):
            call()
            events[i + 1].record()
        torch.cuda.synchronize()
        return [events[i].elapsed_time(events[i + 1]) for i in range(n)]
    out = []
    for _ in range(n):
        torch.cuda.synchronize()
        time.sleep(gap_s)
        out.append(cuda_ms(call))
    return out


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    add_model_and_workload_args(p, "t2i-1024")
    p.add_argument("--flags", nargs="*", default=[], help="request flags, e.g. use_mxfp4=true use_cuda_graphs=true")
    p.add_argument("--no-compile-vae", action="store_true", help="compile the transformer only (faster experiments)")
    p.add_argument("--calls", type=int, default=100, help="back-to-back calls in the sustained phase")
    p.add_argument("--gapped-calls", type=int, default=12)
    p.add_argument("--gap-ms", type=float, default=500.0)
    p.add_argument("--idle-s", type=float, default=2.0)
    p.add_argument("--sample-ms", type=int, default=50)
    p.add_argument("--inductor-flags", default="light", help="the Compile optimisation's preset (optimizations/"
                   "compile.py INDUCTOR_PRESETS; `autotune`: GEMMs autotuned with their epilogues fused)")
    p.add_argument("--out", help="JSON file for the results")
    a = p.parse_args(argv)

    svc = FluxService(ServiceConfig(model=a.model, device=a.device, optimizations=a.optimizations,
                                    compile_vae=not a.no_compile_vae, inductor_flags=a.inductor_flags))
    t_load = time.monotonic()
    svc.load()
    width, height, image = workload_request(a)
    req = InferenceRequest(prompt="make the car red", width=width, height=height, steps=4, seed=1,
                           **parse_flags(a.flags))
    probe = fidelity.StepProbe(call_index=2)
    svc.transformer_call_observer = probe.observe
    try:
        svc.generate(req, image)  # compile / capture; the probe records a mid-denoising call's inputs
    finally:
        svc.transformer_call_observer = None
    ready_s = time.monotonic() - t_load  # load + the first request's compile (an autotuning preset's cost)
    plan = svc.plan(req)
    transformer = svc.transformer_for(plan)
    applied = [k for k, d in plan.items() if d.applied]
    cuda = svc.device_info.is_cuda

    def call():
        transformer(**probe.inputs)

    sampler = ClockSampler(a.sample_ms).start()
    phases = {}
    with torch.inference_mode():
        call()  # one more untimed call: no lazy init inside the phases
        if cuda:
            torch.cuda.synchronize()
        t0 = time.monotonic()
        time.sleep(a.idle_s)
        phases["idle"] = {"seconds": a.idle_s, "clocks": sampler.window(t0, time.monotonic())}
        for name, n, gap in (("sustained", a.calls, 0.0), ("gapped", a.gapped_calls, a.gap_ms / 1000)):
            t0 = time.monotonic()
            ms = time_calls(call, n, cuda, gap)
            t1 = time.monotonic()
            # gapped: only the samples during the calls themselves would show the clocks under load, but at 50 ms
            # sampling a single call gets one or two; report the whole phase and let the per-call times speak
            phases[name] = {**summarise_calls(ms), "gap_ms": gap * 1000, "clocks": sampler.window(t0, t1)}
    sampler.stop()
    seq = floor.seq_len_for(width, height, image is not None)
    report = {"workload": a.workload, "width": width, "height": height, "seq_len": seq,
              "device": svc.device_info.name, "applied": applied, "torch": torch.__version__,
              "inductor_flags": a.inductor_flags, "load_and_first_request_s": round(ready_s, 1),
              "clock_fields": sampler.fields, "phases": phases}
    print(f"\n{a.workload} (L={seq}) on {svc.device_info.name}; applied: {', '.join(applied)}")
    print("\n| phase | calls | median ms (min-max) | first 5 | last 20 | SM MHz median (min-max) "
          "| power W median (max) | temp C max | power-cap share |\n|---|---|---|---|---|---|---|---|---|")
    for name, ph in phases.items():
        c = ph["clocks"]
        sm, pw, tc = c.get("sm_mhz"), c.get("power_w"), c.get("temp_c")
        clocks = (f"{sm['median']:.0f} ({sm['min']:.0f}-{sm['max']:.0f})" if sm else c.get("unavailable", "-"),
                  f"{pw['median']:.0f} ({pw['max']:.0f})" if pw else "-", f"{tc['max']:.0f}" if tc else "-",
                  str(c.get("sw_power_cap_share", "-")))
        timing = (f"{ph['calls']} | {ph['median_ms']:.2f} ({ph['min_ms']:.2f}-{ph['max_ms']:.2f}) | "
                  f"{ph['first5_median_ms']:.2f} | {ph['last20_median_ms']:.2f}") if "calls" in ph else "- | - | - | -"
        print(f"| {name} | {timing} | {' | '.join(clocks)} |")
    if a.out:
        Path(a.out).parent.mkdir(parents=True, exist_ok=True)
        Path(a.out).write_text(json.dumps(report, indent=1))
    return 0


if __name__ == "__main__":
    sys.exit(main())
