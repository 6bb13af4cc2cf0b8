"""Variants of the fp8 copy's two row-quantisation kernels, timed the way the model runs them, on a GPU.

The fp8 step's profile (BENCHMARKS.md) has the GELU + row-quantisation kernel at ~60% of HBM bandwidth and the
norm + modulation + row-quantisation kernel at ~40-55%; together 7.3 ms of an 83.5 ms step at t2i-1024. This tool
times candidate kernels against the ones in optimizations/:
- GELU (12,288 wide): the current kernel (the row padded to 16,384 lanes) at 8 / 16 / 32 warps; the row as three
  unpadded 4,096-wide chunks held in registers; two passes over the row (amax, then quantise: the second read comes
  from L2).
- norm (3,072 wide): the current kernel at several (rows per program, warps); the row as three unpadded 1,024-wide
  chunks.
Timing: each candidate is captured 20 times in a CUDA graph over rotating inputs larger than L2 (so the reads come
from HBM, as in the model, where the input is a GEMM's output of 25-200 MB), median of 7 replays. Each candidate's
fp8 values and scales are compared with the current kernel's: the GELU variants must match bit for bit; the norm
variants may differ by one fp8 step where fp32 sums in another order round differently.
Usage: python tools/bench_row_quant.py [--out results.json]
"""
from __future__ import annotations

import argparse
import json
import os
import statistics
import sys

import torch

sys.path.insert(0, os.path.join(os.path.dirname(os.path.abspath(__file__)), ".."))

import triton  # noqa: E402
import triton.language as tl  # noqa: E402

from benchmark import WORKLOADS, seq_len_for  # noqa: E402
from optimizations import fp8_norm_quant  # noqa: E402
from optimizations.fp8_gelu_quant import _gelu_quant_rows_kernel  # noqa: E402

GELU_K, NORM_K, TEXT = 12288, 3072, 512
# image tokens per workload (+ TEXT for the single blocks), as the stage table's sequence length counts them
TOKENS = {name: seq_len_for(*WORKLOADS[name], text_tokens=0) for name in ("edit-512", "t2i-1024", "edit-1024")}


@triton.jit
def _gelu(x):
    return x * tl.sigmoid(2.0 * 0.7978845608028654 * (x + 0.044715 * x * x * x))


@triton.jit
def gelu_quant_chunks(x_ptr, q_ptr, s_ptr, stride_x, stride_q, CHUNK: tl.constexpr, CHUNKS: tl.constexpr):
    """The row as CHUNKS unpadded CHUNK-wide pieces (CHUNKS <= 4), all in registers."""
    row = tl.program_id(0)
    offs = tl.arange(0, CHUNK)
    xr, qr = x_ptr + row * stride_x, q_ptr + row * stride_q
    y0 = _gelu(tl.load(xr + offs).to(tl.float32))
    amax = tl.max(tl.abs(y0), axis=0)
    if CHUNKS > 1:
        y1 = _gelu(tl.load(xr + CHUNK + offs).to(tl.float32))
        amax = tl.maximum(amax, tl.max(tl.abs(y1), axis=0))
    if CHUNKS > 2:
        y2 = _gelu(tl.load(xr + 2 * CHUNK + offs).to(tl.float32))
        amax = tl.maximum(amax, tl.max(tl.abs(y2), axis=0))
    if CHUNKS > 3:
        y3 = _gelu(tl.load(xr + 3 * CHUNK + offs).to(tl.float32))
        amax = tl.maximum(amax, tl.max(tl.abs(y3), axis=0))
    scale = tl.maximum(amax, 1e-12) / 448.0
    inv = 1.0 / scale
    tl.store(qr + offs, tl.clamp(y0 * inv, -448.0, 448.0).to(tl.float8e4nv))
    if CHUNKS > 1:
        tl.store(qr + CHUNK + offs, tl.clamp(y1 * inv, -448.0, 448.0).to(tl.float8e4nv))
    if CHUNKS > 2:
        tl.store(qr + 2 * CHUNK + offs, tl.clamp(y2 * inv, -448.0, 448.0).to(tl.float8e4nv))
    if CHUNKS > 3:
        tl.store(qr + 3 * CHUNK + offs, tl.clamp(y3 * inv, -448.0, 448.0).to(tl.float8e4nv))
    tl.store(s_ptr + row, scale)


@triton.jit
def gelu_quant_two_pass(x_ptr, q_ptr, s_ptr, K, stride_x, stride_q, BLOCK: tl.constexpr):
    """Pass 1: the row's amax, BLOCK lanes at a time. Pass 2: read the row again (from L2), quantise, store."""
    row = tl.program_id(0)
    offs = tl.arange(0, BLOCK)
    xr, qr = x_ptr + row * stride_x, q_ptr + row * stride_q
    acc = tl.zeros([BLOCK], dtype=tl.float32)
    for k0 in range(0, K, BLOCK):
        acc = tl.maximum(acc, tl.abs(_gelu(tl.load(xr + k0 + offs).to(tl.float32))))
    scale = tl.maximum(tl.max(acc, axis=0), 1e-12) / 448.0
    inv = 1.0 / scale
    for k0 in range(0, K, BLOCK):
        y = _gelu(tl.load(xr + k0 + offs).to(tl.float32))
        tl.store(qr + k0 + offs, tl.clamp(y * inv, -448.0, 448.0).to(tl.float8e4nv))
    tl.store(s_ptr + row, scale)


@triton.jit
def norm_quant_chunks(x_ptr, mod_ptr, q_ptr, s_ptr, K, shift_at, scale_at, eps, CHUNK: tl.constexpr):
    """A double block's norm1 on contiguous rows, K = 3 * CHUNK: LayerNorm, * (1 + scale) + shift, row-wise fp8,
    with the row as three unpadded chunks (the current kernel pads 3,072 to 4,096 lanes)."""
    row = tl.program_id(0)
    c = tl.arange(0, CHUNK)
    xr = x_ptr + row * K
    x0 = tl.load(xr + c).to(tl.float32)
    x1 = tl.load(xr + CHUNK + c).to(tl.float32)
    x2 = tl.load(xr + 2 * CHUNK + c).to(tl.float32)
    mean = (tl.sum(x0, axis=0) + tl.sum(x1, axis=0) + tl.sum(x2, axis=0)) / K
    x0, x1, x2 = x0 - mean, x1 - mean, x2 - mean
    var = (tl.sum(x0 * x0, axis=0) + tl.sum(x1 * x1, axis=0) + tl.sum(x2 * x2, axis=0)) / K
    rstd = 1.0 / tl.sqrt(var + tl.cast(eps, tl.float32))
    y0 = x0 * rstd * (1.0 + tl.load(mod_ptr + scale_at + c).to(tl.float32)) + tl.load(mod_ptr + shift_at + c).to(tl.float32)
    y1 = x1 * rstd * (1.0 + tl.load(mod_ptr + scale_at + CHUNK + c).to(tl.float32)) \
        + tl.load(mod_ptr + shift_at + CHUNK + c).to(tl.float32)
    y2 = x2 * rstd * (1.0 + tl.load(mod_ptr + scale_at + 2 * CHUNK + c).to(tl.float32)) \
        + tl.load(mod_ptr + shift_at + 2 * CHUNK + c).to(tl.float32)
    amax = tl.maximum(tl.maximum(tl.max(tl.abs(y0), axis=0), tl.max(tl.abs(y1), axis=0)), tl.max(tl.abs(y2), axis=0))
    scale = tl.maximum(amax, 1e-12) / 448.0
    inv = 1.0 / scale
    qr = q_ptr + row * K
    tl.store(qr + c, tl.clamp(y0 * inv, -448.0, 448.0).to(tl.float8e4nv))
    tl.store(qr + CHUNK + c, tl.clamp(y1 * inv, -448.0, 448.0).to(tl.float8e4nv))
    tl.store(qr + 2 * CHUNK + c, tl.clamp(y2 * inv, -448.0, 448.0).to(tl.float8e4nv))
    tl.store(s_ptr + row, scale)


def graph_us(launch, n_inputs: int, calls: int = 20, replays: int = 7) -> float:
    """us per call: `calls` launches over rotating inputs captured in one CUDA graph, median of `replays`."""
    for i in range(n_inputs):  # compile / warm up outside the capture
        launch(i)
    torch.cuda.synchronize()
    g = torch.cuda.CUDAGraph()
    with torch.cuda.graph(g):
        for i in range(calls):
            launch(i % n_inputs)
    g.replay()
    torch.cuda.synchronize()
    times = []
    for _ in range(replays):
        start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
        start.record()
        g.replay()
        end.record()
        torch.cuda.synchronize()
        times.append(start.elapsed_time(end) * 1000 / calls)
    return statistics.median(times)


def n_rotating(bytes_per_input: int, l2: int = 50 * 2**20) -> int:
    return max(2, -(-2 * l2 // bytes_per_input))


def gelu_rows(m: int, bandwidth: float) -> list[dict]:
    k = GELU_K
    n = n_rotating(m * k * 2)
    xs = [torch.randn(m, k, device="cuda", dtype=torch.bfloat16) * 2 for _ in range(n)]
    qs = [torch.empty(m, k, device="cuda", dtype=torch.float8_e4m3fn) for _ in range(n)]
    ss = [torch.empty(m, 1, device="cuda", dtype=torch.float32) for _ in range(n)]
    moved = m * k * 3 + m * 4

    def current(warps):
        return lambda i: _gelu_quant_rows_kernel()[(m,)](xs[i], qs[i], ss[i], k, k, k, BLOCK=16384, num_warps=warps)

    def chunks(chunk, warps):
        return lambda i: gelu_quant_chunks[(m,)](xs[i], qs[i], ss[i], k, k, CHUNK=chunk, CHUNKS=k // chunk,
                                                 num_warps=warps)

    def two_pass(block, warps):
        return lambda i: gelu_quant_two_pass[(m,)](xs[i], qs[i], ss[i], k, k, k, BLOCK=block, num_warps=warps)

    variants = {"current, 16 warps (in use)": current(16), "current, 8 warps": current(8),
                "current, 32 warps": current(32)}
    for w in (4, 8, 16):
        variants[f"3 x 4096 chunks, {w} warps"] = chunks(4096, w)
    for blk, w in ((1024, 4), (2048, 4), (2048, 8), (4096, 8)):
        variants[f"two passes, {blk} lanes, {w} warps"] = two_pass(blk, w)
    variants["current, 16 warps (in use)"](0)
    q_ref, s_ref = qs[0].clone(), ss[0].clone()
    rows = []
    for name, launch in variants.items():
        qs[0].zero_(), ss[0].zero_()
        launch(0)
        torch.cuda.synchronize()
        us = graph_us(launch, n)
        rows.append({"kernel": "gelu_quant", "rows": m, "variant": name, "us": round(us, 1),
                     "tb_s": round(moved / us / 1e6, 2), "floor_us": round(moved / bandwidth * 1e6, 1),
                     "q_mismatch": int((qs[0].view(torch.uint8) != q_ref.view(torch.uint8)).sum()),
                     "scale_equal": bool(torch.equal(ss[0], s_ref))})
        print(json.dumps(rows[-1]), flush=True)
    return rows


def norm_rows(m: int, bandwidth: float) -> list[dict]:
    k = NORM_K
    n = n_rotating(m * k * 2)
    xs = [torch.randn(1, m, k, device="cuda", dtype=torch.bfloat16) for _ in range(n)]
    mod = torch.randn(1, 6 * k, device="cuda", dtype=torch.bfloat16) * 0.1
    outs = [None] * n
    moved = m * k * 3 + m * 4
    kern = fp8_norm_quant._kernels().norm_modulate_quant_kernel

    def current(rows_per, warps):
        def launch(i):
            outs[i] = fp8_norm_quant.launch_norm_modulate_quant(kern, xs[i], None, None, mod, 0, 1, -1, 1e-6,
                                                                rows=rows_per, num_warps=warps)
        return launch

    qs = [torch.empty(m, k, device="cuda", dtype=torch.float8_e4m3fn) for _ in range(n)]
    ss = [torch.empty(m, 1, device="cuda", dtype=torch.float32) for _ in range(n)]

    def chunks(warps):
        def launch(i):
            norm_quant_chunks[(m,)](xs[i], mod, qs[i], ss[i], k, 0, k, 1e-6, CHUNK=1024, num_warps=warps)
            outs[i] = (qs[i], ss[i], None)
        return launch

    variants = {f"current, {r} rows x {w} warps" + (" (in use)" if (r, w) == (1, 4) else ""): current(r, w)
                for r, w in ((1, 4), (1, 2), (1, 8), (2, 4), (2, 8), (4, 4), (4, 8), (8, 8))}
    for w in (2, 4, 8):
        variants[f"3 x 1024 chunks, {w} warps"] = chunks(w)
    first = next(iter(variants.values()))
    first(0)
    torch.cuda.synchronize()
    q_ref, s_ref = outs[0][0].reshape(m, k).clone(), outs[0][1].reshape(m).clone()
    rows = []
    for name, launch in variants.items():
        launch(0)
        torch.cuda.synchronize()
        q, s = outs[0][0].reshape(m, k), outs[0][1].reshape(m)
        mismatch = int((q.view(torch.uint8) != q_ref.view(torch.uint8)).sum())
        scale_rel = float(((s - s_ref).abs() / s_ref).max())
        us = graph_us(launch, n)
        rows.append({"kernel": "norm_quant", "rows": m, "variant": name, "us": round(us, 1),
                     "tb_s": round(moved / us / 1e6, 2), "floor_us": round(moved / bandwidth * 1e6, 1),
                     "q_mismatch_frac": mismatch / q.numel(), "scale_max_rel": scale_rel})
        print(json.dumps(rows[-1]), flush=True)
    return rows


def main() -> None:
    p = argparse.ArgumentParser()
    p.add_argument("--out")
    p.add_argument("--workloads", default=",".join(TOKENS))
    args = p.parse_args()
    torch.manual_seed(0)
    name = torch.cuda.get_device_name()
    bandwidth = 4.8e12 if "H200" in name else 3.35e12  # HBM3e / HBM3 spec
    rows = []
    with torch.inference_mode():
        for w in args.workloads.split(","):
            img = TOKENS[w]
            rows += gelu_rows(img + TEXT, bandwidth)  # a single block's MLP half
            rows += gelu_rows(TEXT, bandwidth)  # a double block's text feed-forward
            rows += norm_rows(img, bandwidth)  # a double block's norm1 on the image rows
    out = {"device": name, "torch": torch.__version__, "triton": triton.__version__, "rows": rows}
    if args.out:
        with open(args.out, "w") as f:
            json.dump(out, f, indent=1)


if __name__ == "__main__":
    main()
