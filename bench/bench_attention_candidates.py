"""Low-precision attention candidates against bf16 cuDNN SDPA at FLUX's shapes: speed and error, on a GPU.

Per workload's sequence length (24 heads of 128, batch 1), each candidate's median time (TFLOP/s on 4*L^2*H*D
FLOPs) and its relative error against fp32 attention on 4 heads, beside bf16 cuDNN SDPA's own error:
- `bf16-cudnn`: what both tiers run today (torch's default on Hopper); `bf16-flash`: torch's FlashAttention-2;
- `sage-int8`: `sageattention` 1.0.6 (the Triton SageAttention v1 on the registry): K smoothed (its mean over
  tokens subtracted: softmax is unchanged), Q and K quantised to int8 per block, P.V in fp16; the time includes its
  quantisation kernels; `sage-int8-nosmooth` the same without smoothing (error only);
- `cudnn-fp8-smooth`: cuDNN's fp8 SDPA (bench/fp8_attention_cudnn.py) on smoothed K with dynamic per-tensor scales,
  whole path compiled (smoothing is the remedy SageAttention's authors give for per-tensor scales' error).
Inputs, three kinds: q and k RMS-normalised per head times a per-channel weight, as FLUX's q/k norms make them, at two
logit sharpnesses (`flat`, `sharp`), and `sharp+bias`: the same with a per-channel offset added to every key (the
outlier channel real models' keys carry; random weights do not), which is what smoothing is for.
Adoption rule (issue: within 2x of bf16 SDPA's error, and faster): printed per candidate.
Not measured: flash-attn-4 (bf16 on sm_90): its CUDA 13 library wheel (nvidia-cutlass-dsl-libs-cu13, ~92 MB) is larger
than what a device call can carry. Needs `sageattention` and, for the cuDNN row, `nvidia-cudnn-frontend` in the
environment (tools/fetch_gpu_wheels.sh fetches both; neither is a server requirement).
Usage: python bench/bench_attention_candidates.py [--workloads edit-512,t2i-1024,edit-1024] [--out results.json]
"""
from __future__ import annotations

import argparse
import json
from pathlib import Path

import torch
import torch.nn.functional as F

from bench_fp8_attention import HEAD_DIM, HEADS, SEQ, bench, rel  # bench/ beside this script

ERROR_HEADS = slice(0, 4)
INPUTS = {"flat": (1.0, 0.0), "sharp": (3.0, 0.0), "sharp+bias": (3.0, 2.0)}


def qk(s: int, gain: float, bias: float, gen) -> tuple[torch.Tensor, torch.Tensor]:
    """(1, s, H, D) bf16 q and k: RMS-normalised per head times a per-channel weight; `bias` adds a per-channel
    offset (times the channel's weight) to every key."""
    out = []
    for is_key in (False, True):
        x = torch.randn(1, s, HEADS, HEAD_DIM, device=gen.device, generator=gen)
        w = gain * (1 + 0.3 * torch.randn(HEAD_DIM, device=gen.device, generator=gen)).abs()
        x = x * torch.rsqrt(x.pow(2).mean(-1, keepdim=True) + 1e-6)
        if is_key and bias:
            x = x + bias * torch.randn(HEADS, HEAD_DIM, device=gen.device, generator=gen)
        out.append((x * w).to(torch.bfloat16))
    return out[0], out[1]


def candidates() -> dict:
    """name -> (fn(q, k, v) on (B, S, H, D) bf16 -> (B, S, H, D), status line)."""
    bhsd = lambda t: t.transpose(1, 2)  # noqa: E731
    found: dict = {}

    def sdpa(backend):
        def run(q, k, v):
            with torch.nn.attention.sdpa_kernel([backend]):
                return bhsd(F.scaled_dot_product_attention(bhsd(q), bhsd(k), bhsd(v)))
        return run

    found["bf16-cudnn"] = (sdpa(torch.nn.attention.SDPBackend.CUDNN_ATTENTION), "torch cuDNN SDPA")
    found["bf16-flash"] = (sdpa(torch.nn.attention.SDPBackend.FLASH_ATTENTION), "torch FlashAttention-2")
    try:
        import sageattention
        from sageattention import sageattn

        version = getattr(sageattention, "__version__", "1.0.6")
        found["sage-int8"] = (lambda q, k, v: sageattn(q, k, v, tensor_layout="NHD", smooth_k=True),
                              f"sageattention {version}")
        found["sage-int8-nosmooth"] = (lambda q, k, v: sageattn(q, k, v, tensor_layout="NHD", smooth_k=False),
                                       f"sageattention {version}, smooth_k=False")
    except Exception as exc:  # noqa: BLE001 - reported, the other candidates still run
        print(f"sageattention not usable: {type(exc).__name__}: {exc}", flush=True)
    try:
        from fp8_attention_cudnn import attention_fp8, cudnn_frontend_status, quantize_dynamic  # noqa: F401

        cudnn, status = cudnn_frontend_status()
        if cudnn is not None:
            def fp8_smooth(q, k, v):
                k = k - k.float().mean(dim=1, keepdim=True).to(k.dtype)
                dq = q.abs().amax().float().clamp(min=1e-12) / 448.0
                dk = k.abs().amax().float().clamp(min=1e-12) / 448.0
                return attention_fp8(q, k, v, dq.reshape(1), dk.reshape(1))
            found["cudnn-fp8-smooth"] = (torch.compile(fp8_smooth, fullgraph=True, dynamic=False), status)
        else:
            print(status, flush=True)
    except Exception as exc:  # noqa: BLE001
        print(f"cuDNN fp8 not usable: {type(exc).__name__}: {exc}", flush=True)
    return found


def main() -> None:
    p = argparse.ArgumentParser()
    p.add_argument("--workloads", default=",".join(SEQ))
    p.add_argument("--out")
    args = p.parse_args()
    gen = torch.Generator("cuda").manual_seed(0)
    cands = candidates()
    results = {"device": torch.cuda.get_device_name(), "torch": torch.__version__,
               "candidates": {n: s for n, (_, s) in cands.items()}, "rows": []}
    for name in args.workloads.split(","):
        s = SEQ[name]
        flops = 4 * s * s * HEADS * HEAD_DIM
        for kind, (gain, bias) in INPUTS.items():
            q, k = qk(s, gain, bias, gen)
            v = torch.randn(1, s, HEADS, HEAD_DIM, device="cuda", generator=gen).to(torch.bfloat16)
            ref = F.scaled_dot_product_attention(*(t[:, :, ERROR_HEADS].float().transpose(1, 2)
                                                   for t in (q, k, v))).transpose(1, 2)
            base_err = None
            for cname, (fn, _) in cands.items():
                try:
                    o = fn(q, k, v)
                    err = rel(o[:, :, ERROR_HEADS], ref)
                    ms = bench(lambda: fn(q, k, v)) if kind == "flat" else None
                except Exception as exc:  # noqa: BLE001 - one candidate failing must not lose the others
                    print(f"{cname} at {name}/{kind}: {type(exc).__name__}: {str(exc)[:300]}", flush=True)
                    continue
                if cname == "bf16-cudnn":
                    base_err = err
                row = dict(workload=name, seq=s, inputs=kind, candidate=cname, rel_err=round(err, 5),
                           finite=bool(torch.isfinite(o).all()))
                if ms is not None:
                    row.update(ms=round(ms, 4), tflops=round(flops / ms / 1e9, 1))
                results["rows"].append(row)
                print(json.dumps(row), flush=True)
            for row in results["rows"]:
                if row["workload"] == name and row["inputs"] == kind and base_err:
                    row["err_over_bf16"] = round(row["rel_err"] / base_err, 2)
    speed = {(r["workload"], r["candidate"]): r.get("ms") for r in results["rows"] if r["inputs"] == "flat"}
    print("| workload | candidate | ms (TFLOP/s) | speed vs bf16 cuDNN | rel err flat / sharp / sharp+bias "
          "| x bf16's error (worst) | adoptable |")
    print("|---|---|---|---|---|---|---|")
    for name in args.workloads.split(","):
        for cname in cands:
            rows = {r["inputs"]: r for r in results["rows"] if r["workload"] == name and r["candidate"] == cname}
            if not rows or speed.get((name, cname)) is None:
                continue
            ms, base = speed[(name, cname)], speed[(name, "bf16-cudnn")]
            worst = max(r.get("err_over_bf16", 0) for r in rows.values())
            errs = " / ".join(str(rows[k]["rel_err"]) if k in rows else "-" for k in INPUTS)
            ok = "yes" if worst <= 2.0 and ms < base and cname != "bf16-cudnn" else "no"
            print(f"| {name} | {cname} | {ms} ({rows['flat']['tflops']}) | {base / ms:.2f}x | "
                  f"{errs} | {worst} | {ok} |")
    if args.out:
        Path(args.out).write_text(json.dumps(results, indent=1))


if __name__ == "__main__":
    main()
