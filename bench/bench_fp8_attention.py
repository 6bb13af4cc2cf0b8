"""A/B of fp8 attention (bench/fp8_attention_cudnn.py) against bf16 cuDNN SDPA at FLUX's shapes, on a GPU.

Per workload's sequence length (24 heads of 128): bf16 cuDNN SDPA (what the bf16 and fp8 tiers run today); the
cuDNN fp8 kernel alone on pre-quantised inputs; and the whole fp8 path as the model runs it (static q/k scales,
dynamic V scale, kernel, dequantised O), compiled. Error of each against an fp32 reference on 4 heads, for q/k drawn
like FLUX's (RMS-normalised per head, times a weight) at two logit sharpnesses. Also: a CUDA-graph replay of the
fp8 path against its eager result. Needs the nvidia-cudnn-frontend wheel (not in requirements: the server does not use
it). Usage: python bench/bench_fp8_attention.py [--out results.json]
"""
from __future__ import annotations

import argparse
import json

import torch
import torch.nn.functional as F


from fp8_attention_cudnn import (FP8_MAX, Q_K_BOUND_MARGIN, attention_fp8,
                                 cudnn_frontend_status, quantize_dynamic, quantize_static)

SEQ = {"edit-512": 2560, "t2i-1024": 4608, "edit-1024": 8704}
HEADS, HEAD_DIM = 24, 128


def rel(a, b) -> float:
    return float((a.float() - b.float()).norm() / b.float().norm())


def normed(b, s, gain, gen) -> tuple[torch.Tensor, torch.Tensor]:
    """RMS-normalised per head times a per-channel weight (FLUX's q/k after norm_q/norm_k); returns (x, descale)."""
    x = torch.randn(b, s, HEADS, HEAD_DIM, device="cuda", generator=gen)
    w = gain * (1 + 0.3 * torch.randn(HEAD_DIM, device="cuda", generator=gen)).abs()
    x = x * torch.rsqrt(x.pow(2).mean(-1, keepdim=True) + 1e-6) * w
    descale = torch.full((1,), HEAD_DIM ** 0.5 * float(w.max()) * Q_K_BOUND_MARGIN / FP8_MAX, device="cuda")
    return x.to(torch.bfloat16), descale


def bench(fn) -> float:
    import triton.testing

    return float(triton.testing.do_bench(fn, warmup=50, rep=300, return_mode="median"))


def main() -> None:
    p = argparse.ArgumentParser()
    p.add_argument("--out")
    p.add_argument("--workloads", default=",".join(SEQ))
    args = p.parse_args()
    cudnn, status = cudnn_frontend_status()
    print(status, flush=True)
    results = {"cudnn": status, "device": torch.cuda.get_device_name(), "torch": torch.__version__, "rows": []}
    if cudnn is None:
        print(json.dumps(results))
        return
    gen = torch.Generator("cuda").manual_seed(0)
    fp8_path = torch.compile(attention_fp8, fullgraph=True, dynamic=False)
    bhsd = lambda t: t.transpose(1, 2)  # noqa: E731
    for name in args.workloads.split(","):
        s = SEQ[name]
        flops = 4 * s * s * HEADS * HEAD_DIM
        for gain in (1.0, 3.0):  # logits ~ N(0, gain^2 * ~1): flat and sharp attention
            q, dq = normed(1, s, gain, gen)
            k, dk = normed(1, s, gain, gen)
            v = torch.randn(1, s, HEADS, HEAD_DIM, device="cuda", generator=gen).to(torch.bfloat16)
            with torch.nn.attention.sdpa_kernel([torch.nn.attention.SDPBackend.CUDNN_ATTENTION]):
                bf16 = lambda: F.scaled_dot_product_attention(bhsd(q), bhsd(k), bhsd(v))  # noqa: E731
                o_bf16 = bhsd(bf16())
                t_bf16 = bench(bf16)
            q8, k8 = quantize_static(q, dq), quantize_static(k, dk)
            v8, dv = quantize_dynamic(v)
            so = 0.5 / dv
            kernel = lambda: torch.ops.flux_kontext.sdpa_fp8(q8, k8, v8, dq, dk, dv, so)  # noqa: E731
            t_kernel = bench(kernel)
            o_fp8 = fp8_path(q, k, v, dq, dk)
            t_path = bench(lambda: fp8_path(q, k, v, dq, dk))
            # fp32 reference on the first 4 heads
            hs = slice(0, 4)
            ref = bhsd(F.scaled_dot_product_attention(*(bhsd(t[:, :, hs].float()) for t in (q, k, v))))
            # CUDA-graph replay of the fp8 path against eager
            static_out = None
            g = torch.cuda.CUDAGraph()
            side = torch.cuda.Stream()
            side.wait_stream(torch.cuda.current_stream())
            with torch.cuda.stream(side):
                fp8_path(q, k, v, dq, dk)
            torch.cuda.current_stream().wait_stream(side)
            with torch.cuda.graph(g):
                static_out = fp8_path(q, k, v, dq, dk)
            g.replay()
            torch.cuda.synchronize()
            row = dict(workload=name, seq=s, logit_gain=gain,
                       bf16_ms=round(t_bf16, 4), fp8_kernel_ms=round(t_kernel, 4), fp8_path_ms=round(t_path, 4),
                       bf16_tflops=round(flops / t_bf16 / 1e9, 1), fp8_kernel_tflops=round(flops / t_kernel / 1e9, 1),
                       speedup_path=round(t_bf16 / t_path, 3), speedup_kernel=round(t_bf16 / t_kernel, 3),
                       rel_err_bf16=round(rel(o_bf16[:, :, hs], ref), 5),
                       rel_err_fp8=round(rel(o_fp8[:, :, hs], ref), 5),
                       rel_err_fp8_vs_bf16=round(rel(o_fp8, o_bf16), 5),
                       finite=bool(torch.isfinite(o_fp8).all()),
                       graph_replay_max_diff=float((static_out.float() - o_fp8.float()).abs().max()))
            results["rows"].append(row)
            print(json.dumps(row), flush=True)
    print("| workload | logit gain | bf16 cuDNN ms (TFLOP/s) | fp8 kernel ms (TFLOP/s) | fp8 path ms | path speed-up "
          "| rel err bf16 / fp8 vs fp32 | graph replay diff |")
    print("|---|---|---|---|---|---|---|---|")
    for r in results["rows"]:
        print(f"| {r['workload']} | {r['logit_gain']} | {r['bf16_ms']} ({r['bf16_tflops']}) | {r['fp8_kernel_ms']} "
              f"({r['fp8_kernel_tflops']}) | {r['fp8_path_ms']} | {r['speedup_path']}x | {r['rel_err_bf16']} / "
              f"{r['rel_err_fp8']} | {r['graph_replay_max_diff']} |")
    if args.out:
        with open(args.out, "w") as f:
            json.dump(results, f, indent=1)


if __name__ == "__main__":
    main()
