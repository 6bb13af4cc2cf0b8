"""The end-to-end effect of a quantised attention recipe on a request, whatever the recipe's speed.

Each recipe of sim_attention_quant_error.py (SageAttention-style roundings applied exactly in fp32) replaces the
server's attention for one request. Its image and latents are then compared with the same server's own output at
the same seed, beside `fp32` (exact attention, output rounded to bf16) and `bf16` (the simulated bf16 kernel). Those
two show how far a different but equally precise kernel moves the result: the floor any recipe is judged against.
On a GPU the real kernels of bench_attention_candidates.py run the same way (`kernel:` rows: sageattention 1.0.6,
cuDNN fp8 on smoothed K, FlashAttention-2 in bf16 as a second exact kernel), where their packages are installed.
The request runs eagerly (no compile, no CUDA graphs, so the replacement takes effect), on the fast tier's fp8 GEMMs
and DPM-Solver++ where the server prepared them. The replacement is diffusers' `dispatch_attention_fn`, which both
diffusers' Flux processor and the fused q/k norm + RoPE processor call (the seq-major switch's own cuDNN call is not
replaced: leave it off). Each recipe's call count is reported, so a replacement that never ran cannot pass unseen.
Random weights (synthetic-full) amplify any difference over the steps and say nothing of image quality. This
measures how far the result moves, not whether it looks worse.
Usage (GPU): python bench/attention_recipe_fidelity.py --model synthetic-full --workload edit-512 --out r.json
       (CPU): python bench/attention_recipe_fidelity.py --model tiny --device cpu --width 256 --height 256 --steps 2
"""
from __future__ import annotations

import argparse
import contextlib
import json
import sys
import time
from pathlib import Path

import torch

import sim_attention_quant_error as sim  # bench/ beside this script
from kontext_server.benchmark import fidelity
from kontext_server.benchmark.workloads import add_model_and_workload_args, workload_request
from kontext_server.request import InferenceRequest
from kontext_server.service import FluxService, ServiceConfig

GPU_OPTIMIZATIONS = "qkv_fusion,modulation_table,attention,low_precision,dpm_solver"
CPU_OPTIMIZATIONS = "qkv_fusion,modulation_table,dpm_solver"


def recipes() -> dict:
    """name -> fn(q, k, v) for one head, (S, D) fp32: exact attention first, then the simulated ones."""
    ident = lambda t: t  # noqa: E731
    return {"fp32": lambda q, k, v: sim.attend(q, k, v, ident, ident), **sim.recipes()}


def kernels() -> dict:
    """`kernel:NAME` -> fn(q, k, v) on (batch, seq, heads, head_dim) bf16: the real candidates this GPU can run (not
    the bf16 cuDNN kernel: it is the server's own)."""
    from bench_attention_candidates import candidates

    return {f"kernel:{name}": fn for name, (fn, _) in candidates().items()
            if name in ("bf16-flash", "sage-int8", "cudnn-fp8-smooth")}


def per_head(fn, query: torch.Tensor, key: torch.Tensor, value: torch.Tensor) -> torch.Tensor:
    """A one-head recipe over (batch, seq, heads, head_dim) tensors, in the query's dtype."""
    out = torch.empty_like(query)
    for b in range(query.shape[0]):
        for h in range(query.shape[2]):
            out[b, :, h] = fn(query[b, :, h].float(), key[b, :, h].float(), value[b, :, h].float()).to(query.dtype)
    return out


@contextlib.contextmanager
def attention_replaced(fn, calls: list, whole: bool = False):
    """diffusers' dispatch_attention_fn replaced by fn for the duration: a one-head recipe (per_head), or with `whole`
    a function of (batch, seq, heads, head_dim) q, k, v; each call appends to `calls`. A mask or a parallel config
    is refused: the recipes have neither."""
    import diffusers.models.attention_dispatch as dispatch
    import diffusers.models.transformers.transformer_flux as flux

    originals = dispatch.dispatch_attention_fn, flux.dispatch_attention_fn

    def replaced(query, key, value, attn_mask=None, parallel_config=None, **_):
        if attn_mask is not None or parallel_config is not None:
            raise ValueError("an attention recipe takes neither a mask nor a parallel config")
        calls.append(query.shape[1])
        return fn(query, key, value).to(query.dtype) if whole else per_head(fn, query, key, value)

    dispatch.dispatch_attention_fn = flux.dispatch_attention_fn = replaced
    try:
        yield
    finally:
        dispatch.dispatch_attention_fn, flux.dispatch_attention_fn = originals


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    add_model_and_workload_args(p, "edit-512")
    p.set_defaults(optimizations=None)
    p.add_argument("--recipes", default=None,
                   help=f"comma list (default all: {','.join(recipes())}, and on a GPU the kernel: rows)")
    p.add_argument("--steps", type=int, default=None, help="default: the scheduler's (14 with DPM-Solver++)")
    p.add_argument("--seed", type=int, default=3)
    p.add_argument("--cache-dir", default=None)
    p.add_argument("--out", required=True)
    a = p.parse_args(argv)
    a.device = a.device or ("cuda" if torch.cuda.is_available() else "cpu")
    a.optimizations = a.optimizations or (GPU_OPTIMIZATIONS if a.device.startswith("cuda") else CPU_OPTIMIZATIONS)
    table = {**recipes(), **(kernels() if a.device.startswith("cuda") else {})}
    chosen = (a.recipes or ",".join(table)).split(",")
    unknown = [r for r in chosen if r not in table]
    if unknown:
        raise SystemExit(f"--recipes: unknown {unknown}; known here: {list(table)}")
    width, height, image = workload_request(a)
    svc = FluxService(ServiceConfig(model=a.model, device=a.device, optimizations=a.optimizations,
                                    compile_vae=False, cache_dir=Path(a.cache_dir) if a.cache_dir else None))
    svc.load()
    flags = {f: True for f, opt in (("use_mxfp4", "low_precision"), ("use_dpm_solver", "dpm_solver"))
             if opt in svc.prepared}
    req = InferenceRequest(prompt="make the car red", width=width, height=height, steps=a.steps, seed=a.seed,
                           **flags)
    svc.generate(req, image)  # warm-up
    reference = svc.generate(req, image)
    out = {"tool": "bench/attention_recipe_fidelity.py", "argv": sys.argv[1:] if argv is None else argv,
           "model": a.model, "device": str(torch.cuda.get_device_name() if a.device.startswith("cuda") else a.device),
           "torch": torch.__version__, "workload": a.workload, "width": width, "height": height,
           "prepared": sorted(svc.prepared), "flags": flags, "seed": a.seed,
           "reference": "the server's own attention", "recipes": {}}
    for name in chosen:
        calls: list = []
        t0 = time.perf_counter()
        try:
            with attention_replaced(table[name], calls, whole=name.startswith("kernel:")):
                result = svc.generate(req, image)
        except Exception as exc:  # noqa: BLE001 - one recipe failing must not lose the others
            row = {"error": f"{type(exc).__name__}: {str(exc)[:300]}", "attention_calls": len(calls)}
        else:
            row = {"attention_calls": len(calls), "sequence": calls[0] if calls else None,
                   "s": round(time.perf_counter() - t0, 1), **fidelity.fidelity(reference, result)}
        out["recipes"][name] = row
        print(json.dumps({"recipe": name, **row}), flush=True)
    Path(a.out).write_text(json.dumps(out, indent=1))
    floor = max(out["recipes"].get(n, {}).get("rel_latent_error", 0) for n in ("fp32", "bf16", "kernel:bf16-flash"))
    print("| recipe | attention calls | rel. latent error | PSNR (dB) or error | over the exact kernels' floor |")
    print("|---|---|---|---|---|")
    for name, row in out["recipes"].items():
        err = row.get("rel_latent_error")
        over = f"{err / floor:.1f}x" if err is not None and floor else "-"
        shown = row.get("psnr_db", "identical") if "error" not in row else row["error"]
        print(f"| {name} | {row['attention_calls']} | {err} | {shown} | {over} |")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
