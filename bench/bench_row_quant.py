"""Layouts of the fp8 copy's two row-quantisation kernels, timed the way the model runs them, on a GPU.

The fp8 step's profile (BENCHMARKS.md) had the GELU + row-quantisation kernel at ~60% of HBM bandwidth and the
norm + modulation + row-quantisation kernel at ~40-55%; together 7.3 ms of an 83.5 ms step at t2i-1024. This tool
times the kernels in use in optimizations/ against other layouts of the same computation:
- GELU (12,288 wide): in use, the row as three unpadded 4,096-wide chunks held in registers (fp8/gelu_quant.py's
  chunked kernel), on its own warps and others; the padded layout before it (the row padded to 16,384 lanes, 16
  warps) and at 8 / 32 warps; two passes over the row (amax, then quantise: the second read comes from L2).
- norm (3,072 wide), in its three cases (a double block's norm1 on the image rows; its norm2 with the attention
  residual before it, h = x + gate * delta written too; a single block's norm over [text; image] rows read from
  two tensors): in use, the row as three unpadded 1,024-wide chunks (fp8/norm_quant.py's chunked kernel) on its own
  warps and others; the padded layout before it (1 row x 4 warps, each row padded to 4,096 lanes) and other
  (rows per program, warps).
The chunked layouts in use were chosen from this tool's H100 figures (BENCHMARKS.md, "The fp8 row-quantisation
kernels: other layouts" and "power cap"). Timing: each variant is captured 20 times in a CUDA graph over rotating
inputs larger than L2 (so the reads come from HBM, as in the model, where the input is a GEMM's output of 25-200
MB), median of 7 replays.
Each variant's fp8 values and scales are compared with the kernel in use (`matches` in each row; the tool exits
non-zero when one does not): the GELU variants must match bit for bit; the norm variants may differ by one fp8 step
in a few values (NORM_MAX_MISMATCH) and by NORM_SCALE_RTOL in the scales, where fp32 sums in another order round
differently, and must write the same residual stream h.
Usage: python bench/bench_row_quant.py [--out results.json]
"""
from __future__ import annotations

import argparse
import json
import statistics
import sys

import torch


import triton
import triton.language as tl

from kontext_server.benchmark.floor import IMAGE_TOKENS
from optimizations.fp8 import norm_quant as fp8_norm_quant
from optimizations.fp8.gelu_quant import _gelu_quant_chunks_kernel, launch_gelu_quant_chunks
from utils import cuda_ms

import row_quant_padded as padded_layouts  # bench/: beside this script

GELU_K, NORM_K, TEXT = 12288, 3072, 512
# How far a norm variant may be from the kernel in use: fp32 sums in another order move an fp8 value by one step in
# at most this fraction of the values, and a scale by this relative amount.
NORM_MAX_MISMATCH, NORM_SCALE_RTOL = 1e-3, 1e-6
IN_USE, BEFORE = " (in use)", " (before)"  # the layout in use now, and the one it replaced
# image tokens per workload (+ TEXT for the single blocks), as the stage table's sequence length counts them
TOKENS = {name: IMAGE_TOKENS[name] for name in ("edit-512", "t2i-1024", "edit-1024")}


@triton.jit
def _gelu(x):
    return x * tl.sigmoid(2.0 * 0.7978845608028654 * (x + 0.044715 * x * x * x))


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
    return statistics.median(cuda_ms(g.replay) * 1000 / calls for _ in range(replays))


def n_rotating(bytes_per_input: int, l2: int = 50 * 2**20) -> int:
    return max(2, -(-2 * l2 // bytes_per_input))


def gelu_variants(m: int, k: int, xs, qs, ss) -> dict:
    """name -> launch(i) on input i; the first is the kernel in use, launched as its torch op launches it."""
    chunks_kernel, padded_kernel = _gelu_quant_chunks_kernel(), padded_layouts._gelu_quant_rows_kernel()
    chunk, nchunk = fp8_norm_quant.row_chunks(k)
    default_warps = fp8_norm_quant.chunk_warps(chunk)

    def chunks(warps=None):
        return lambda i: launch_gelu_quant_chunks(chunks_kernel, xs[i], qs[i], ss[i], num_warps=warps)

    def padded(warps):
        block = triton.next_power_of_2(k)
        return lambda i: padded_kernel[(m,)](xs[i], qs[i], ss[i], k, k, k, BLOCK=block, num_warps=warps)

    def two_pass(block, warps):
        return lambda i: gelu_quant_two_pass[(m,)](xs[i], qs[i], ss[i], k, k, k, BLOCK=block, num_warps=warps)

    variants = {f"{nchunk} x {chunk} chunks, {default_warps} warps{IN_USE}": chunks()}
    for w in (4, 8, 16):
        if w != default_warps:
            variants[f"{nchunk} x {chunk} chunks, {w} warps"] = chunks(w)
    for w in (16, 8, 32):
        variants[f"padded to {triton.next_power_of_2(k)} lanes, {w} warps" + (BEFORE if w == 16 else "")] = \
            padded(w)
    for blk, w in ((1024, 4), (2048, 4), (2048, 8), (4096, 8)):
        variants[f"two passes, {blk} lanes, {w} warps"] = two_pass(blk, w)
    return variants


def gelu_rows(m: int, bandwidth: float) -> list[dict]:
    k = GELU_K
    n = n_rotating(m * k * 2)
    xs = [torch.randn(m, k, device="cuda", dtype=torch.bfloat16) * 2 for _ in range(n)]
    qs = [torch.empty(m, k, device="cuda", dtype=torch.float8_e4m3fn) for _ in range(n)]
    ss = [torch.empty(m, 1, device="cuda", dtype=torch.float32) for _ in range(n)]
    moved = m * k * 3 + m * 4
    variants = gelu_variants(m, k, xs, qs, ss)
    next(iter(variants.values()))(0)  # the kernel in use: the reference
    q_ref, s_ref = qs[0].clone(), ss[0].clone()
    rows = []
    for name, launch in variants.items():
        qs[0].zero_(), ss[0].zero_()
        launch(0)
        torch.cuda.synchronize()
        mismatch = int((qs[0].view(torch.uint8) != q_ref.view(torch.uint8)).sum())
        scale_equal = bool(torch.equal(ss[0], s_ref))
        us = graph_us(launch, n)
        rows.append({"kernel": "gelu_quant", "rows": m, "variant": name, "us": round(us, 1),
                     "tb_s": round(moved / us / 1e6, 2), "floor_us": round(moved / bandwidth * 1e6, 1),
                     "q_mismatch": mismatch, "scale_equal": scale_equal,
                     "matches": mismatch == 0 and scale_equal})  # bit for bit
        print(json.dumps(rows[-1]), flush=True)
    return rows


# The norm's cases as the blocks call it: which chunks of the AdaLN output are (shift, scale, gate).
NORM_CASES = {"plain": (0, 1, -1), "residual": (3, 4, 2), "concatenated": (0, 1, -1)}


def norm_case_inputs(case: str, m: int, n: int, text: int = TEXT, device: str = "cuda"):
    """n rotating inputs of a case for m image rows: (i -> (x, tail, delta), rows out, bytes moved per call).
    plain: a double block's norm1 on the image rows; residual: its norm2 after the attention residual
    (h = x + gate * delta, written too); concatenated: a single block's norm over [text; image] rows, read from the
    two tensors."""
    k = NORM_K
    r = lambda *shape: torch.randn(*shape, device=device, dtype=torch.bfloat16)  # noqa: E731
    xs = [r(1, m, k) for _ in range(n)]
    if case == "residual":
        deltas = [r(1, m, k) for _ in range(n)]
        return (lambda i: (xs[i], None, deltas[i])), m, m * k * 7 + m * 4
    if case == "concatenated":
        texts = [r(1, text, k) for _ in range(n)]
        return (lambda i: (texts[i], xs[i], None)), m + text, (m + text) * (k * 3 + 4)
    return (lambda i: (xs[i], None, None)), m, m * (k * 3 + 4)


def norm_variants(inputs, mod, chunks, outs) -> dict:
    """name -> launch(i) on input i (outputs (q, scale, h) into outs[i]); the first is the kernel in use, launched as
    its torch op launches it. inputs: i -> (x, tail, delta); chunks: the (shift, scale, gate) chunks of mod."""
    kernels = fp8_norm_quant._kernels()
    chunk, nchunk = fp8_norm_quant.row_chunks(NORM_K)
    default_warps = fp8_norm_quant.chunk_warps(chunk)

    def chunked(warps=None):
        def launch(i):
            outs[i] = fp8_norm_quant.launch_norm_modulate_quant(
                kernels.norm_modulate_quant_kernel, *inputs(i), mod, *chunks, 1e-6, num_warps=warps)
        return launch

    def padded(rows_per, warps):
        def launch(i):
            outs[i] = padded_layouts.launch_norm_modulate_quant_padded(
                padded_layouts.norm_modulate_quant_padded_kernel, *inputs(i), mod, *chunks, 1e-6, rows=rows_per,
                num_warps=warps)
        return launch

    variants = {f"{nchunk} x {chunk} chunks, {default_warps} warps{IN_USE}": chunked()}
    for w in (2, 4, 8):
        if w != default_warps:
            variants[f"{nchunk} x {chunk} chunks, {w} warps"] = chunked(w)
    before = (padded_layouts.PADDED_NORM_ROWS, padded_layouts.PADDED_NORM_WARPS)
    for r, w in ((1, 4), (1, 2), (1, 8), (2, 4), (2, 8), (4, 4), (4, 8), (8, 8)):
        name = f"padded, {r} row{'s' if r > 1 else ''} x {w} warps" + (BEFORE if (r, w) == before else "")
        variants[name] = padded(r, w)
    return variants


def norm_agreement(out, ref) -> dict:
    """How far a norm variant's (q, scale, h) is from the kernel in use's, and whether that is within tolerance: fp8
    values one step apart in a few places and scales within NORM_SCALE_RTOL (fp32 sums in another order); the
    residual stream h bit for bit (no sum before it)."""
    (q, s, h), (q_ref, s_ref, h_ref) = out, ref
    mismatch_frac = float((q.view(torch.uint8) != q_ref.view(torch.uint8)).float().mean())
    steps = fp8_steps_apart(q, q_ref)
    scale_rel = float(((s - s_ref).abs() / s_ref).max())
    h_equal = bool(torch.equal(h, h_ref))
    return {"q_mismatch_frac": mismatch_frac, "q_max_steps": steps, "scale_max_rel": scale_rel, "h_equal": h_equal,
            "matches": mismatch_frac <= NORM_MAX_MISMATCH and steps <= 1 and scale_rel <= NORM_SCALE_RTOL and h_equal}


def norm_rows(case: str, m: int, bandwidth: float) -> list[dict]:
    n = n_rotating(m * NORM_K * 2)
    inputs, n_rows, moved = norm_case_inputs(case, m, n)
    mod = torch.randn(1, 6 * NORM_K, device="cuda", dtype=torch.bfloat16) * 0.1
    outs = [None] * n
    variants = norm_variants(inputs, mod, NORM_CASES[case], outs)
    next(iter(variants.values()))(0)  # the kernel in use: the reference
    torch.cuda.synchronize()
    ref = [t.clone() for t in outs[0]]
    rows = []
    for name, launch in variants.items():
        launch(0)
        torch.cuda.synchronize()
        agreement = norm_agreement(outs[0], ref)
        us = graph_us(launch, n)
        rows.append({"kernel": f"norm_quant, {case}", "rows": n_rows, "variant": name, "us": round(us, 1),
                     "tb_s": round(moved / us / 1e6, 2), "floor_us": round(moved / bandwidth * 1e6, 1), **agreement})
        print(json.dumps(rows[-1]), flush=True)
    return rows


def fp8_steps_apart(q: torch.Tensor, ref: torch.Tensor) -> float:
    """The largest distance between two e4m3 tensors in fp8 steps of the reference (8 steps per octave; a fixed
    2^-9 below 2^-6, where e4m3 is subnormal)."""
    g, w = q.float(), ref.float()
    return float(((g - w).abs() / (w.abs().clamp(min=2**-6) / 8)).max())


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
            for case in NORM_CASES:
                rows += norm_rows(case, img, bandwidth)
    out = {"device": name, "torch": torch.__version__, "triton": triton.__version__, "rows": rows}
    if args.out:
        with open(args.out, "w") as f:
            json.dump(out, f, indent=1)
    wrong = sorted({f"{r['kernel']}: {r['variant']}" for r in rows if not r["matches"]})
    if wrong:
        sys.exit("these variants do not compute what the kernel in use computes: " + "; ".join(wrong))


if __name__ == "__main__":
    main()
