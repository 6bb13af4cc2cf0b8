"""A/B of the fp8 GELU -> linear (optimizations/fp8/gelu_quant.py) against torchao's path, on a GPU.

For FLUX's 12,288-wide GELU activations at each workload's token count: torchao's quantised linear after a GELU,
compiled (inductor fuses GELU + amax + cast as it does in the model), against GeluFp8Linear (the Triton pass +
_scaled_mm), compiled the same way; and the quantisation alone. Also the relative error of each against the bf16
linear. Usage: python bench/bench_gelu_quant.py [--out results.json]
"""
from __future__ import annotations

import argparse
import copy
import json

import torch
import torch.nn.functional as F


from optimizations.fp8.gelu_quant import GeluFp8Linear, _op, gelu_quant_reference
from optimizations.low_precision import quant_config

TOKENS = {"edit-512": 2560, "t2i-1024": 4608, "edit-1024": 8704}


def time_ms(fn, x, reps: int = 50) -> float:
    for _ in range(5):
        fn(x)
    torch.cuda.synchronize()
    start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
    start.record()
    for _ in range(reps):
        fn(x)
    end.record()
    torch.cuda.synchronize()
    return start.elapsed_time(end) / reps


def rel(a, b) -> float:
    return float((a.float() - b.float()).norm() / b.float().norm())


def main() -> None:
    p = argparse.ArgumentParser()
    p.add_argument("--out")
    args = p.parse_args()
    from torchao.quantization import quantize_

    torch.manual_seed(0)
    k, n = 12288, 3072  # the MLP width -> model width (single blocks' proj_out.mlp, double blocks' ff.net.2)
    bf16 = torch.nn.Linear(k, n, device="cuda", dtype=torch.bfloat16)
    torchao_lin = copy.deepcopy(bf16)
    quantize_(torchao_lin, quant_config(torch.cuda.get_device_capability())[0])
    fused = GeluFp8Linear.from_torchao(torchao_lin)
    paths = {
        "torchao (inductor GELU+quant) + GEMM": torch.compile(lambda x: torchao_lin(F.gelu(x, approximate="tanh"))),
        "fused Triton GELU+quant + GEMM": torch.compile(fused),
        "quant only: inductor": torch.compile(gelu_quant_reference),
        "quant only: Triton": _op(),
    }
    rows = []
    for workload, m in TOKENS.items():
        x = torch.randn(m, k, device="cuda", dtype=torch.bfloat16) * 2
        with torch.inference_mode():
            ref = bf16(F.gelu(x, approximate="tanh"))
            q_ref, s_ref = gelu_quant_reference(x)
            q_tri, s_tri = _op()(x)
            row = {"workload": workload, "tokens": m, "width": k,
                   "rel_err_vs_bf16": {"torchao": rel(paths["torchao (inductor GELU+quant) + GEMM"](x), ref),
                                       "fused": rel(paths["fused Triton GELU+quant + GEMM"](x), ref)},
                   "triton_vs_reference": {"scale_max_rel": float(((s_tri - s_ref).abs() / s_ref).max()),
                                           "q_mismatch_frac": float((q_tri.float() != q_ref.float()).float().mean())},
                   "us": {name: round(time_ms(fn, x) * 1000, 1) for name, fn in paths.items()}}
        bytes_once = m * k * 2 + m * k  # read bf16 once, write fp8 once
        bandwidth = 4.8e12 if "H200" in torch.cuda.get_device_name() else 3.35e12  # HBM3e / HBM3 spec
        row["quant_floor_us"] = round(bytes_once / bandwidth * 1e6, 1)
        rows.append(row)
        print(json.dumps(row))
    out = {"device": torch.cuda.get_device_name(), "torch": torch.__version__, "rows": rows}
    if args.out:
        with open(args.out, "w") as f:
            json.dump(out, f, indent=1)


if __name__ == "__main__":
    main()
