"""Would cuBLASLt's GELU epilogue speed up the exact tier? FLUX's FF / MLP input linears (3,072 -> 12,288, then a tanh
GELU), bf16, at its token counts.

The exact tier's bf16 step is 1.28-1.38x the floor model on the H100. In its profile at edit-512 (ed9fec7,
BENCHMARKS.md) the GEMMs take 44.6 of 63.9 ms and elementwise kernels 10.9 ms. About 3 ms of those are the GELUs
after the 76 FF / MLP input linears (in the single blocks fused with the concatenation before proj_out). This
measures three ways to compute gelu_tanh(x @ W^T + b) before anyone rewrites the blocks:
- `inductor`: torch.compile of F.gelu(F.linear(x, W, b), approximate="tanh"): cuBLAS GEMM + bias, then a Triton
  GELU kernel. This is what stage 2 runs;
- `epilogue`: torch._addmm_activation(b, x, W^T, use_gelu=True): on CUDA, cuBLASLt's GELU-bias epilogue (tanh GELU);
- `epilogue compiled`: the same inside torch.compile (inductor keeps the op as an extern call, `make_fallback`).
Reports us per call (median of triton's do_bench on a GPU) and each result's relative error against an fp32
reference. The numerics differ by construction: the epilogue applies GELU to the fp32 accumulator before rounding
to bf16, while the unfused path rounds the linear's output to bf16 first. On CPU, _addmm_activation applies the exact
GELU, not the tanh one. So `--small` on CPU is a smoke test of this script, not a measurement.
Usage: python bench/bench_gelu_epilogue.py [--out results.json] [--small] [--no-compile]
"""
from __future__ import annotations

import argparse
import json
import statistics
import time

import torch
import torch.nn.functional as F

TOKENS = {"text (double-block context FF)": 512, "edit-512 (single blocks)": 2560, "t2i-1024 (single blocks)": 4608,
          "edit-1024 (single blocks)": 8704}
K, N = 3072, 12288


def unfused(x, w, b):
    return F.gelu(F.linear(x, w, b), approximate="tanh")


def epilogue(x, w, b):
    return torch._addmm_activation(b, x, w.t(), use_gelu=True)


def time_us(fn) -> float:
    if torch.cuda.is_available():
        import triton.testing

        return float(triton.testing.do_bench(fn, warmup=25, rep=200, return_mode="median")) * 1000
    for _ in range(2):
        fn()
    times = []
    for _ in range(5):
        t0 = time.perf_counter()
        fn()
        times.append((time.perf_counter() - t0) * 1e6)
    return statistics.median(times)


def main(argv=None) -> list[dict]:
    p = argparse.ArgumentParser()
    p.add_argument("--out")
    p.add_argument("--small", action="store_true", help="small shapes (CPU smoke test)")
    p.add_argument("--no-compile", action="store_true")
    a = p.parse_args(argv)
    cuda = torch.cuda.is_available()
    device, dtype = ("cuda", torch.bfloat16) if cuda else ("cpu", torch.float32)
    tokens, k, n = ({"small": 64}, 32, 128) if a.small else (TOKENS, K, N)
    ways = {"inductor": torch.compile(unfused, dynamic=False) if not a.no_compile else unfused, "epilogue": epilogue}
    if not a.no_compile:
        ways["epilogue compiled"] = torch.compile(epilogue, dynamic=False)
    torch.manual_seed(0)
    w = torch.randn(n, k, device=device, dtype=dtype) / k ** 0.5
    b = torch.randn(n, device=device, dtype=dtype) * 0.1
    rows = []
    with torch.inference_mode():
        for name, m in tokens.items():
            x = torch.randn(m, k, device=device, dtype=dtype)
            ref = F.gelu(F.linear(x.float(), w.float(), b.float()), approximate="tanh")
            row = {"case": name, "m_k_n": [m, k, n], "gemm_tflop": round(2 * m * k * n / 1e12, 4)}
            for way, fn in ways.items():
                y = fn(x, w, b)
                row[f"{way}_us"] = round(time_us(lambda fn=fn: fn(x, w, b)), 1)
                row[f"{way}_rel_err"] = float((y.float() - ref).norm() / ref.norm())
            print(json.dumps(row), flush=True)
            rows.append(row)
    print("\n| case | " + " | ".join(f"{w} us (rel err)" for w in ways) + " |\n|---|" + "---|" * len(ways))
    for row in rows:
        print(f"| {row['case']} | " + " | ".join(f"{row[f'{w}_us']} ({row[f'{w}_rel_err']:.1e})" for w in ways) + " |")
    if a.out:
        with open(a.out, "w") as f:
            json.dump({"device": torch.cuda.get_device_name() if cuda else "cpu", "torch": torch.__version__,
                       "rows": rows}, f, indent=1)
    return rows


if __name__ == "__main__":
    main()
