#!/usr/bin/env python
"""The least a transformer step can take with the GEMM and attention kernels we call: only those kernels, sustained.

    python bench/probe_kernel_bound.py --workload t2i-1024 edit-512 edit-1024 [--dtype bf16] --calls 40 --out r.json

Why: the exact tier's step (bf16, 28 Euler steps) misses its target of 1.15x the floor (BENCHMARKS.md). Its profile
puts cuBLAS's GEMMs and cuDNN's attention at 1.11-1.12x the floor in a short profile at full clock, and the GPU
lowers its clock under sustained load at the 700 W cap. Fusing the elementwise work (norms, modulation, RoPE,
gating, residuals) into the GEMMs can at best remove that work; it cannot make the GEMMs and the attention faster.
So the step's best case with these kernels is the time of those kernels alone, run back to back like a real step.
If that is above the target, no fusion reaches the target with cuBLAS and cuDNN.

What it runs, per workload: one transformer step's GEMMs (FLUX's shapes and counts, bias included, the
`probe_fp8_gemm_step.step_gemms` list, in block order) and its 57 attention calls (cuDNN SDPA, 24 heads x 128,
over the whole sequence), captured in one CUDA graph. No norm, modulation, RoPE, GELU, gating or residual
kernel. Then, like `probe_sustained_step.py`: `--calls` replays back to back, each timed with CUDA events, and
`--gapped-calls` after `--gap-ms` of idle, while nvidia-smi samples the clocks. Reported against docs/design.md's
floor model, which counts exactly these FLOPs (2 x 6.45e9 x L for the GEMMs, 57 x 4 x L^2 x 3072 for attention).

Not in it: the GELU epilogue of the feed-forward up-projections (the model's GEMM carries it; here plain bias),
and the small GEMMs outside the blocks (embedders, final projection: under 0.1% of the FLOPs).
"""
from __future__ import annotations

import argparse
import json
import sys
import time
from pathlib import Path


from kontext_server.startup import cublaslt_workspace

cublaslt_workspace.configure()  # the server's GEMM setting (no workspace), before torch's first GEMM reads it

import torch
import torch.nn.functional as F
from torch.nn.attention import SDPBackend, sdpa_kernel

from kontext_server.benchmark.floor import ATTENTION_TFLOPS, BF16_MATMUL_TFLOPS, FP8_MATMUL_TFLOPS, IMAGE_TOKENS
from kontext_server.benchmark.gpu_clocks import ClockSampler
from probe_fp8_gemm_step import D, DOUBLE, MLP, SINGLE, TEXT
from probe_sustained_step import summarise_calls, time_calls

HEADS, HEAD_DIM = 24, 128


def block_ops(image: int) -> list[tuple]:
    """One step in block order: ("gemm", M, K, N) and ("attention", L). A double block runs the image and the text
    stream's projections around one joint attention; a single block runs one stream of L rows (proj_out split into
    its attention and MLP halves, as the model runs it)."""
    seq = image + TEXT
    double = ([("gemm", m, D, 3 * D) for m in (image, TEXT)] + [("attention", seq)]
              + [("gemm", m, k, n) for m in (image, TEXT) for k, n in ((D, D), (D, MLP), (MLP, D))])
    single = [("gemm", seq, D, 3 * D + MLP), ("attention", seq), ("gemm", seq, D, D), ("gemm", seq, MLP, D)]
    return double * DOUBLE + single * SINGLE


def floor_ms(ops: list[tuple], fp8: bool) -> dict:
    gemm_flops = sum(2 * m * k * n for kind, *dims in ops if kind == "gemm" for m, k, n in [dims])
    attn_flops = sum(4 * seq**2 * HEADS * HEAD_DIM for kind, *dims in ops if kind == "attention" for seq in dims)
    gemm = gemm_flops / (FP8_MATMUL_TFLOPS if fp8 else BF16_MATMUL_TFLOPS) * 1000
    attn = attn_flops / ATTENTION_TFLOPS * 1000
    return {"gemm_ms": round(gemm, 2), "attention_ms": round(attn, 2), "total_ms": round(gemm + attn, 2)}


def build_step(ops: list[tuple], fp8: bool):
    """A callable enqueuing the step's kernels. Operands are allocated once per distinct shape: at these sizes
    (M >= 512 rows) every GEMM is compute-bound, and between two calls of one shape the step streams other
    operands far larger than H100's 50 MiB L2, so sharing them does not make a call cheaper than in the model."""
    dtype = torch.float8_e4m3fn if fp8 else torch.bfloat16
    gemm_args, attn_args, calls = {}, {}, []
    for kind, *dims in ops:
        key = tuple(dims)
        if kind == "gemm":
            if key not in gemm_args:
                m, k, n = dims
                a = torch.randn(m, k, device="cuda").to(dtype)
                w = torch.randn(n, k, device="cuda").to(dtype)
                bias = torch.randn(n, device="cuda", dtype=torch.bfloat16)
                scales = (torch.rand(m, 1, device="cuda") + 0.5, torch.rand(1, n, device="cuda") + 0.5)
                gemm_args[key] = (a, w, bias, scales)
            calls.append(("gemm", gemm_args[key]))
        else:
            if key not in attn_args:
                attn_args[key] = tuple(torch.randn(1, HEADS, dims[0], HEAD_DIM, device="cuda", dtype=torch.bfloat16)
                                       for _ in range(3))
            calls.append(("attention", attn_args[key]))

    def step():
        with sdpa_kernel(SDPBackend.CUDNN_ATTENTION):
            for kind, args in calls:
                if kind == "attention":
                    F.scaled_dot_product_attention(*args)
                elif fp8:
                    a, w, bias, (sa, sb) = args
                    torch._scaled_mm(a, w.t(), scale_a=sa, scale_b=sb, bias=bias, out_dtype=torch.bfloat16,
                                     use_fast_accum=True)
                else:
                    a, w, bias, _ = args
                    F.linear(a, w, bias)

    return step


def capture(step) -> torch.cuda.CUDAGraph:
    side = torch.cuda.Stream()
    side.wait_stream(torch.cuda.current_stream())
    with torch.cuda.stream(side):
        step()  # warm-up outside the graph: cuBLAS / cuDNN plans, workspace
    torch.cuda.current_stream().wait_stream(side)
    torch.cuda.synchronize()
    g = torch.cuda.CUDAGraph()
    with torch.cuda.graph(g):
        step()
    g.replay()
    torch.cuda.synchronize()
    return g


def probe(workload: str, fp8: bool, calls: int, gapped: int, gap_ms: float, idle_s: float, sampler) -> dict:
    ops = block_ops(IMAGE_TOKENS[workload])
    graph = capture(build_step(ops, fp8))
    time.sleep(idle_s)  # start each workload from the idle clock, as the step probe does
    phases = {}
    for name, n, gap in (("sustained", calls, 0.0), ("gapped", gapped, gap_ms / 1000)):
        t0 = time.monotonic()
        ms = time_calls(graph.replay, n, True, gap)
        phases[name] = {**summarise_calls(ms), "gap_ms": gap * 1000, "clocks": sampler.window(t0, time.monotonic())}
    del graph
    torch.cuda.empty_cache()
    return summarise(workload, ops, fp8, phases)


def summarise(workload: str, ops: list[tuple], fp8: bool, phases: dict) -> dict:
    """One workload's result: its kernels, floor and target, and the phases with the sustained mean against them."""
    floor = floor_ms(ops, fp8)
    s = phases["sustained"]
    mean = sum(s["per_call_ms"]) / len(s["per_call_ms"])
    kinds = [o[0] for o in ops]
    attention_rows = {o[1] for o in ops if o[0] == "attention"}
    return {"workload": workload, "seq_len": max(attention_rows), "dtype": "fp8" if fp8 else "bf16",
            "kernels": {"gemm": kinds.count("gemm"), "attention": kinds.count("attention")},
            "floor": floor, "target_1_15x_ms": round(1.15 * floor["total_ms"], 2),
            "sustained_mean_ms": round(mean, 3), "sustained_mean_over_floor": round(mean / floor["total_ms"], 3),
            "first_call_over_floor": round(s["per_call_ms"][0] / floor["total_ms"], 3), "phases": phases}


def to_markdown(results: list[dict]) -> str:
    lines = ["| workload | floor ms | 1.15x ms | first call | sustained median (min-max) | mean | last 20 "
             "| mean / floor | gapped median | SM MHz median | power W median |", "|---" * 11 + "|"]
    for r in results:
        s, g = r["phases"]["sustained"], r["phases"]["gapped"]
        c = s["clocks"]
        sm = f"{c['sm_mhz']['median']:.0f}" if c.get("sm_mhz") else c.get("unavailable", "-")
        pw = f"{c['power_w']['median']:.0f}" if c.get("power_w") else "-"
        lines.append(f"| {r['workload']} | {r['floor']['total_ms']:.1f} | {r['target_1_15x_ms']:.1f} "
                     f"| {s['per_call_ms'][0]:.2f} | {s['median_ms']:.2f} ({s['min_ms']:.2f}-{s['max_ms']:.2f}) "
                     f"| {r['sustained_mean_ms']:.2f} | {s['last20_median_ms']:.2f} "
                     f"| {r['sustained_mean_over_floor']:.3f} | {g['median_ms']:.2f} | {sm} | {pw} |")
    return "\n".join(lines)


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--workload", nargs="+", default=["t2i-1024"], choices=sorted(IMAGE_TOKENS))
    p.add_argument("--dtype", default="bf16", choices=["bf16", "fp8"])
    p.add_argument("--calls", type=int, default=40)
    p.add_argument("--gapped-calls", type=int, default=3)
    p.add_argument("--gap-ms", type=float, default=500.0)
    p.add_argument("--idle-s", type=float, default=2.0)
    p.add_argument("--out")
    a = p.parse_args(argv)
    if not torch.cuda.is_available():
        print("needs a CUDA GPU (cuBLAS GEMMs, cuDNN attention, CUDA graphs)")
        return 2
    torch.manual_seed(0)
    sampler = ClockSampler(50).start()
    results = []
    try:
        for w in a.workload:
            results.append(probe(w, a.dtype == "fp8", a.calls, a.gapped_calls, a.gap_ms, a.idle_s, sampler))
    finally:
        sampler.stop()
    print(f"\nGEMMs + attention only, {a.dtype}, CUDA graph, on {torch.cuda.get_device_name()} "
          f"(torch {torch.__version__})")
    print("\n" + to_markdown(results))
    if a.out:
        Path(a.out).parent.mkdir(parents=True, exist_ok=True)
        report = {"device": torch.cuda.get_device_name(), "torch": torch.__version__, "clock_fields": sampler.fields,
                  "cublaslt_workspace": cublaslt_workspace.status, "results": results}
        Path(a.out).write_text(json.dumps(report, indent=1))
    return 0


if __name__ == "__main__":
    sys.exit(main())
