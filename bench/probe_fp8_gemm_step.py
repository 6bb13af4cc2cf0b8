"""The fp8 copy's (or the bf16 transformer's) GEMMs of one transformer step, captured in a CUDA graph: time per step
and memsets per GEMM.

Each fp8 GEMM in the step is a torch._scaled_mm (row-wise scales, bf16 out) that cuBLASLt runs, and the step's
profile shows one memset beside each of them (BENCHMARKS.md): 266 per step at edit-512. Every extra node in the graph
also adds a gap between kernels. This probe replays the step's GEMM list (FLUX's shapes and counts at a workload,
bias where the model has one) back to back in a graph, and counts the device events of one pass with the profiler.
Run it under different cuBLASLt settings in separate processes (the workspace is read when the handle is made), e.g.
CUBLASLT_WORKSPACE_SIZE=0 (KiB): with no workspace, cuBLASLt may only pick algorithms that need no memset.
Usage (GPU): python bench/probe_fp8_gemm_step.py --workload edit-512 [--out result.json]
"""
from __future__ import annotations

import argparse
import json
import statistics

import torch
from torch.profiler import ProfilerActivity, profile


from kontext_server import settings
from kontext_server.benchmark.floor import IMAGE_TOKENS
from utils import cuda_ms

D, MLP, TEXT, DOUBLE, SINGLE = 3072, 12288, 512, 19, 38


def step_gemms(image: int) -> list[tuple[int, int, int, int]]:
    """(M, K, N, count) per step: the double blocks' image and text streams, then the single blocks."""
    m_all = image + TEXT
    out = []
    for m in (image, TEXT):
        out += [(m, D, 3 * D, DOUBLE), (m, D, D, DOUBLE), (m, D, MLP, DOUBLE), (m, MLP, D, DOUBLE)]
    out += [(m_all, D, 3 * D + MLP, SINGLE), (m_all, D, D, SINGLE), (m_all, MLP, D, SINGLE)]
    return out


def main() -> None:
    p = argparse.ArgumentParser()
    p.add_argument("--workload", default="edit-512", choices=sorted(IMAGE_TOKENS))
    p.add_argument("--dtype", default="fp8", choices=["fp8", "bf16"],
                   help="bf16: the exact tier's GEMMs (F.linear with bias, which torch runs through cuBLASLt)")
    p.add_argument("--out")
    args = p.parse_args()
    torch.manual_seed(0)
    calls = []
    for m, k, n, count in step_gemms(IMAGE_TOKENS[args.workload]):
        dtype = torch.float8_e4m3fn if args.dtype == "fp8" else torch.bfloat16
        a = torch.randn(m, k, device="cuda").to(dtype)
        w = torch.randn(n, k, device="cuda").to(dtype).t()
        sa, sb = torch.rand(m, 1, device="cuda") + 0.5, torch.rand(1, n, device="cuda") + 0.5
        bias = torch.randn(n, device="cuda", dtype=torch.bfloat16)
        calls += [(a, w, sa, sb, bias)] * count

    def one_step():
        for a, w, sa, sb, bias in calls:
            if args.dtype == "bf16":
                torch.nn.functional.linear(a, w.t(), bias)
            else:
                torch._scaled_mm(a, w, scale_a=sa, scale_b=sb, bias=bias, out_dtype=torch.bfloat16,
                                 use_fast_accum=True)

    side = torch.cuda.Stream()
    side.wait_stream(torch.cuda.current_stream())
    with torch.cuda.stream(side):
        one_step()
    torch.cuda.current_stream().wait_stream(side)
    torch.cuda.synchronize()
    with profile(activities=[ProfilerActivity.CUDA]) as prof:
        one_step()
        torch.cuda.synchronize()
    events = {e.key[:90]: e.count for e in prof.key_averages() if e.device_type == torch.autograd.DeviceType.CUDA}
    device_ms = sum(e.self_device_time_total for e in prof.key_averages()
                    if e.device_type == torch.autograd.DeviceType.CUDA) / 1000
    g = torch.cuda.CUDAGraph()
    with torch.cuda.graph(g):
        one_step()
    g.replay()
    torch.cuda.synchronize()
    times = [cuda_ms(g.replay) for _ in range(7)]
    result = {"workload": args.workload, "dtype": args.dtype, "device": torch.cuda.get_device_name(),
              "torch": torch.__version__,
              "CUBLASLT_WORKSPACE_SIZE": settings.CUBLASLT_WORKSPACE_SIZE.get() or "(default)",
              "gemms_per_step": len(calls), "graph_ms_per_step": round(statistics.median(times), 3),
              "graph_ms_min_max": [round(min(times), 3), round(max(times), 3)],
              "profiled_device_ms_eager": round(device_ms, 3), "device_events": events}
    print(json.dumps(result), flush=True)
    if args.out:
        with open(args.out, "w") as f:
            json.dump(result, f, indent=1)


if __name__ == "__main__":
    main()
