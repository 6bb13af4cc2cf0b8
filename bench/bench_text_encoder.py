"""Where the T5-XXL prompt encode's time goes, and what graphs and compile buy, on a GPU (synthetic-full weights).

The fast tier at edit-512 spends ~25 ms of its ~650 ms budget in T5 even with CUDA graphs (GPU-bound): ~3x the
~8 ms its 4.7 TFLOP take at cuBLAS speed. This measures, for one 512-token prompt, bf16:
- eager, CUDA-graph replay, and (with --compile) its 24 blocks compiled by inductor;
- with the service's patches/t5_contiguous_position_bias.py applied, as the service loads T5 (--unpatched: without);
- a torch profiler summary of one eager call by kernel category (kontext_server.benchmark.profiling's categories);
- eager time with each attention implementation transformers offers T5 (eager, SDPA);
- the compiled output's relative difference from eager;
- T5's GEMM shapes alone, and fused (q/k/v, the gated FF's two inputs), in TFLOP/s.
Usage: python bench/bench_text_encoder.py [--compile] [--unpatched] [--out results.json]
       (--small: a 2-layer T5, CPU smoke test)
"""
from __future__ import annotations

import argparse
import json
import statistics
import time

import torch


from kontext_server.models import config, synthetic
from optimizations.cuda_graphs import CudaGraphEncoder
from patches import t5_contiguous_position_bias
from kontext_server.benchmark.profiling import category
from utils import cuda_ms


SMALL = dict(d_model=64, d_ff=128, d_kv=16, num_heads=4, num_layers=2, vocab_size=1000)  # CPU smoke test


def build_t5(device: str, small: bool = False, dtype: torch.dtype | None = None, **overrides):
    """The synthetic-full T5 (or SMALL's), random weights; dtype: bf16 on CUDA, fp32 on CPU unless given; overrides:
    config fields (e.g. num_layers)."""
    from transformers import T5Config, T5EncoderModel

    cfg = config.full_configs()["text_encoder_2"] | (SMALL if small else {}) | overrides
    dtype = dtype or (torch.bfloat16 if device.startswith("cuda") else torch.float32)
    with synthetic.building_on(device, dtype):
        model = T5EncoderModel(T5Config(**cfg))  # as build_synthetic_full builds it
    return model.eval().requires_grad_(False)


def report(res: dict, out: str | None) -> None:
    """Print the results as JSON and, with --out, write them there too."""
    print(json.dumps(res, indent=1))
    if out:
        with open(out, "w") as f:
            json.dump(res, f, indent=1)


def time_ms(fn, runs: int = 20) -> float:
    for _ in range(3):
        fn()
    times = []
    for _ in range(runs):
        if not torch.cuda.is_available():
            t0 = time.perf_counter()
            fn()
            times.append((time.perf_counter() - t0) * 1000)
            continue
        times.append(cuda_ms(fn))
    return round(statistics.median(times), 3)


def profile_call(fn) -> dict:
    """Time per kernel category of one call: device time on a GPU, CPU self time (aten ops) on CPU."""
    cuda = torch.cuda.is_available()
    fn()
    if cuda:
        torch.cuda.synchronize()
    activity = torch.profiler.ProfilerActivity.CUDA if cuda else torch.profiler.ProfilerActivity.CPU
    with torch.profiler.profile(activities=[activity]) as prof:
        fn()
        if cuda:
            torch.cuda.synchronize()
    attr = "self_device_time_total" if cuda else "self_cpu_time_total"
    kernels = [e for e in prof.key_averages() if getattr(e, attr) > 0
               and (not cuda or e.device_type == torch.autograd.DeviceType.CUDA)]
    per_cat: dict[str, float] = {}
    for e in kernels:
        per_cat[category(e.key)] = per_cat.get(category(e.key), 0.0) + getattr(e, attr) / 1000
    top = sorted(kernels, key=lambda e: -getattr(e, attr))[:12]
    return {"device_ms": round(sum(per_cat.values()), 3),
            "by_category_ms": {k: round(v, 3) for k, v in sorted(per_cat.items(), key=lambda kv: -kv[1])},
            "top": [{"kernel": e.key[:100], "ms": round(getattr(e, attr) / 1000, 3), "calls": e.count}
                    for e in top]}


def gemm_tflops(m: int, d_model: int, d_ff: int, device: str) -> dict:
    """TFLOP/s of T5's GEMM shapes alone, and of the shapes fusing would make: with 512 tokens a 4,096-wide output
    is few output tiles for 132 SMs, so q/k/v (3 x 4,096) and the gated FF's two inputs (2 x 10,240) may run faster
    as one GEMM each. This says whether fusing them is worth building."""
    dtype = torch.bfloat16 if device == "cuda" else torch.float32
    shapes = {"q|k|v|o (n=d_model)": (d_model, d_model), "qkv fused": (d_model, 3 * d_model),
              "wi_0|wi_1 (n=d_ff)": (d_model, d_ff), "wi fused": (d_model, 2 * d_ff), "wo (k=d_ff)": (d_ff, d_model)}
    out = {}
    for name, (k, n) in shapes.items():
        x, w = torch.randn(m, k, device=device, dtype=dtype), torch.randn(n, k, device=device, dtype=dtype)
        ms = time_ms(lambda: torch.nn.functional.linear(x, w))
        out[name] = {"m_k_n": [m, k, n], "ms": ms, "tflops": round(2 * m * k * n / ms / 1e9, 3)}
    return out


def main(argv=None) -> dict:
    p = argparse.ArgumentParser()
    p.add_argument("--compile", action="store_true", help="also compile the 24 blocks with inductor")
    p.add_argument("--small", action="store_true", help="a 2-layer T5 (CPU smoke test of this script)")
    p.add_argument("--unpatched", action="store_true", help="T5 as transformers builds it, without the service's patch")
    p.add_argument("--out")
    a = p.parse_args(argv)
    torch.manual_seed(0)
    device = "cuda" if torch.cuda.is_available() else "cpu"
    t5 = build_t5(device, a.small)
    patched = 0 if a.unpatched else t5_contiguous_position_bias.apply(t5)
    ids = torch.randint(0, t5.config.vocab_size, (1, 512), device=device)
    params = sum(p.numel() for p in t5.parameters())
    flops = 2 * (params - t5.shared.weight.numel()) * ids.shape[1]  # linears; attention scores are ~2% more
    res: dict = {"device": torch.cuda.get_device_name() if device == "cuda" else "cpu", "torch": torch.__version__,
                 "tokens": ids.shape[1], "linear_tflop": round(flops / 1e12, 2),
                 "attn_implementation": t5.config._attn_implementation, "t5_contiguous_position_bias": patched}
    with torch.inference_mode():
        ref = t5(ids)[0]
        res["eager_ms"] = time_ms(lambda: t5(ids))
        if device == "cuda":
            graph = CudaGraphEncoder(t5)
            res["graph_ms"] = time_ms(lambda: graph(ids))
        res["eager_profile"] = profile_call(lambda: t5(ids))
        # T5's attention implementation: a model built from its config (synthetic-full) may get a different default
        # from one loaded with from_pretrained, and transformers added SDPA for T5 only recently.
        res["by_attn_implementation_ms"] = {}
        built_with = t5.config._attn_implementation
        for impl in ("eager", "sdpa"):
            try:
                t5.set_attn_implementation(impl)
                out = t5(ids)[0]
                res["by_attn_implementation_ms"][impl] = {
                    "ms": time_ms(lambda: t5(ids)),
                    "rel_diff_vs_built": float((out.float() - ref.float()).norm() / ref.float().norm())}
            except Exception as exc:  # not supported by this transformers version: say so
                res["by_attn_implementation_ms"][impl] = f"{type(exc).__name__}: {exc}"[:200]
        t5.set_attn_implementation(built_with)
        if a.compile:
            t0 = time.perf_counter()
            for block in t5.encoder.block:
                block.compile(dynamic=False)
            out = t5(ids)[0]
            if device == "cuda":
                torch.cuda.synchronize()
            res["compile_s"] = round(time.perf_counter() - t0, 1)
            res["compiled_rel_diff"] = float((out.float() - ref.float()).norm() / ref.float().norm())
            res["compiled_ms"] = time_ms(lambda: t5(ids))
            res["compiled_profile"] = profile_call(lambda: t5(ids))
            # No graph capture of the compiled blocks: on the H100 (torch 2.11) inductor recompiled a block during
            # capture and failed (cudaErrorStreamCaptureUnsupported), and the failed capture left the CUDA RNG in
            # capture state, so the process could not go on.
    res["gemm_tflops"] = gemm_tflops(ids.shape[1], t5.config.d_model, t5.config.d_ff, device)
    res["floor_ms_at_790_tflops"] = round(flops / 790e12 * 1000, 2)
    report(res, a.out)
    return res


if __name__ == "__main__":
    main()
