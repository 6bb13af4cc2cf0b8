"""A/B of the fp8 copy's norm / attention-output quantisation kernels (optimizations/fp8/norm_quant.py) against
inductor's fusion of the same ops, at FLUX's shapes, on a GPU.

Per workload, bf16, batch 1, 3,072 features:
- `norm`: LayerNorm + modulation + row-wise fp8 (a double block's norm1 on the image rows);
- `residual norm`: h = x + gate * delta, then the same (norm2 after the attention residual; h is written too);
- `concatenated norm`: the same over [text; image] rows read from two tensors (a single block's norm);
- `attention output`: row-wise fp8 of a (batch, seq, heads, head_dim) view of cuDNN's (batch, heads, seq, head_dim)
  output (a single block's).
The reference is the code the fp8 copy ran before the kernels (diffusers' norm and modulation in bf16, then
fp8_linear.quantize_rows) compiled by torch.compile. Prints microseconds per call (median of triton's do_bench)
and the bandwidth over the bytes that must move: for the norm, the chunked kernel in use and several tile shapes
(rows per program x warps) of the padded layout before it; for the attention output, several tile shapes. Usage:
python bench/bench_norm_quant.py [--out results.json]
"""
from __future__ import annotations

import argparse
import json

import torch
import torch.nn.functional as F


from kontext_server.benchmark import floor
from optimizations.fp8 import norm_quant as fp8_norm_quant
from optimizations.fp8.linear import quantize_rows

import row_quant_padded as padded_layouts  # bench/: beside this script

IMAGE_TOKENS = {name: floor.IMAGE_TOKENS[name] for name in ("edit-512", "t2i-1024", "edit-1024")}
TEXT, K, HEADS, D = 512, 3072, 24, 128
NORM_TILES = [(1, 4), (1, 8), (2, 4), (2, 8), (4, 8)]  # (rows per program, warps) of the padded layout
HEADS_TILES = [(1, 4), (2, 4), (2, 8), (4, 8)]  # (tokens per program, warps)


def ref_norm(x, tail, delta, mod):
    shift, scale, gate = mod.chunk(6, 1)[3], mod.chunk(6, 1)[4], mod.chunk(6, 1)[2]  # norm2's chunks, as the kernel
    h = None
    if tail is not None:
        x = torch.cat([x, tail], 1)
    if delta is not None:
        h = x = x + gate[:, None] * delta
    y = F.layer_norm(x, (K,), eps=1e-6) * (1 + scale[:, None]) + shift[:, None]
    q, s = quantize_rows(y.reshape(-1, K))
    return q, s, h


def ref_heads(o):
    return quantize_rows(o.flatten(2, 3).reshape(-1, HEADS * D))


def main() -> None:
    import triton.testing

    p = argparse.ArgumentParser()
    p.add_argument("--out")
    args = p.parse_args()
    torch.manual_seed(0)
    kernels = fp8_norm_quant._kernels()
    torch._dynamo.config.recompile_limit = 64  # one reference graph per (workload, case)
    ref_n = torch.compile(ref_norm, fullgraph=True, dynamic=False)
    ref_h = torch.compile(ref_heads, fullgraph=True, dynamic=False)
    bench = lambda fn: float(triton.testing.do_bench(fn, warmup=50, rep=500, return_mode="median"))  # noqa: E731
    r = lambda *shape: torch.randn(*shape, device="cuda", dtype=torch.bfloat16)  # noqa: E731
    rows = []
    for name, n_img in IMAGE_TOKENS.items():
        mod = r(1, 6 * K) * 0.5
        x, tail, delta = r(1, TEXT, K) * 3 + 1, r(1, n_img, K), r(1, n_img, K)
        cases = {  # name: (x, tail, delta, rows, bytes moved)
            "norm": (tail, None, None, n_img, n_img * K * 3),
            "residual norm": (tail, None, delta, n_img, n_img * K * 7),
            "concatenated norm": (x, tail, None, n_img + TEXT, (n_img + TEXT) * K * 3),
        }
        for case, (a, t, d, n, moved) in cases.items():
            want = ref_n(a, t, d, mod)
            row = dict(workload=name, case=case, rows=n,
                       inductor_us=round(1000 * bench(lambda: ref_n(a, t, d, mod)), 1))
            gate = 2 if d is not None else -1
            calls = {"chunked": lambda: fp8_norm_quant.launch_norm_modulate_quant(  # the kernel in use
                kernels.norm_modulate_quant_kernel, a, t, d, mod, 3, 4, gate, 1e-6)}
            for nr, nw in NORM_TILES:  # the padded layout before it
                calls[f"padded_{nr}x{nw}"] = lambda nr=nr, nw=nw: padded_layouts.launch_norm_modulate_quant_padded(
                    padded_layouts.norm_modulate_quant_padded_kernel, a, t, d, mod, 3, 4, gate, 1e-6,
                    rows=nr, num_warps=nw)
            for tile, call in calls.items():
                q, s, _ = call()
                row[f"kernel_{tile}_us"] = round(1000 * bench(call), 1)
                # against a reference that rounds the modulated norm to bf16 before quantising (diffusers' bf16 code)
                row[f"kernel_{tile}_fp8_mismatch"] = float((q.reshape(-1, K).float() != want[0].float())
                                                          .float().mean())
            rows.append(_finish(row, moved))
        o = r(1, HEADS, n_img + TEXT, D).transpose(1, 2)
        want = ref_h(o)
        row = dict(workload=name, case="attention output", rows=n_img + TEXT,
                   inductor_us=round(1000 * bench(lambda: ref_h(o)), 1))
        for nt, nw in HEADS_TILES:
            def call(nt=nt, nw=nw):
                return fp8_norm_quant.launch_quantize_heads(kernels.quantize_heads_kernel, o, tokens=nt, num_warps=nw)
            q, s = call()
            row[f"kernel_{nt}x{nw}_us"] = round(1000 * bench(call), 1)
            row[f"kernel_{nt}x{nw}_fp8_mismatch"] = float((q.reshape(-1, K).float() != want[0].float())
                                                         .float().mean())
        rows.append(_finish(row, (n_img + TEXT) * K * 3))
    print("| workload | case | inductor us (TB/s) | kernel tiles: us | best TB/s |\n|---|---|---|---|---|")
    for row in rows:
        tiles = ", ".join(f"{k[7:-3]} {v}" for k, v in row.items() if k.startswith("kernel_") and k.endswith("_us"))
        print(f"| {row['workload']} | {row['case']} | {row['inductor_us']} ({row['inductor_tb_s']}) | {tiles} | "
              f"{row['best_tb_s']} |")
    if args.out:
        with open(args.out, "w") as f:
            json.dump({"device": torch.cuda.get_device_name(), "torch": torch.__version__, "rows": rows}, f, indent=1)


def _finish(row: dict, moved: int) -> dict:
    best = min((k for k in row if k.startswith("kernel_") and k.endswith("_us")), key=row.get)
    row.update(best=best, moved_bytes=moved, best_tb_s=round(moved / (row[best] * 1e-6) / 1e12, 2),
               inductor_tb_s=round(moved / (row["inductor_us"] * 1e-6) / 1e12, 2))
    print(json.dumps(row), flush=True)
    return row


if __name__ == "__main__":
    main()
