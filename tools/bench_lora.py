#!/usr/bin/env python
"""What LoRA adapters cost a request: step time with and without one, the switch between two, their first load, and
the fp8 tier's fidelity with an adapter.

    python tools/bench_lora.py --model synthetic-full --workload edit-512 --out benchmarks/latest/lora.json
    python tools/bench_lora.py --model tiny --device cpu --small --out /tmp/lora.json     (CPU: that it runs)

For each rank (32 and 128; --small: 4 and 8) it writes two synthetic adapters on every linear of the 57 blocks
(random, non-zero, diffusers' layout) into a directory of their own, starts a FluxService on it (the server's start-up
optimisations, `auto` on a GPU: compile, CUDA graphs, the fp8 copy...; the slots' rank is that rank), and through the
service's own request path:
- warms up each tier without and with one adapter (each active adapter count compiles once: reported as cold starts);
- times the transformer per step, interleaved, for the exact tier and the fp8 tier, without and with adapter A;
- switches between the two loaded adapters A and B, request after request, recording the switch (`lora_switch`: the
  slot writes, synchronised) and counting dynamo's compiled graphs and the CUDA graphs captured (targets: <= 50 ms,
  no recompile, no capture);
- reports each adapter's first load (`lora_load`: read, validate, copy to the device);
- fidelity: fp8 + adapter against bf16 + adapter with the same seed (and fp8 against bf16 without an adapter, for
  comparison), and how far the adapter moves the bf16 output (so a small fp8 error means something).
Writes the JSON to --out and prints a table. On an H100 the whole run (model builds, compiles) takes about 6 minutes
with the default arguments; --ranks 32 alone about half.
"""
from __future__ import annotations

import argparse
import gc
import json
import statistics
import sys
import tempfile
import time
from pathlib import Path

import torch

from kontext_server.benchmark import fidelity
from kontext_server.benchmark.workloads import add_model_and_workload_args, workload_request
from kontext_server.request import InferenceRequest
from kontext_server.service import FluxService, ServiceConfig

BLOCKS = ("transformer_blocks.", "single_transformer_blocks.")


def block_linears(model: str, cache_dir: Path | None) -> dict[str, tuple[int, int]]:
    """Every linear of the transformer's blocks, (in, out) by name, from the model's config (built on the meta
    device: nothing is allocated)."""
    from diffusers import FluxTransformer2DModel

    if model == "synthetic-full":
        from kontext_server.models.config import full_configs

        cfg = full_configs()["transformer"]
    elif model == "tiny":
        from kontext_server import settings
        from kontext_server.models.tiny import ensure_tiny_saved

        cfg = FluxTransformer2DModel.load_config(ensure_tiny_saved(cache_dir or settings.default_cache_dir())
                                                 / "transformer")
    else:
        cfg = FluxTransformer2DModel.load_config(model, subfolder="transformer")
    with torch.device("meta"):
        t = FluxTransformer2DModel.from_config(cfg)
    return {n: (m.in_features, m.out_features) for n, m in t.named_modules()
            if isinstance(m, torch.nn.Linear) and n.startswith(BLOCKS)}


def write_adapter(path: Path, linears: dict, rank: int, seed: int, device: str = "cpu") -> int:
    """A random rank-`rank` adapter on every given linear (diffusers' layout, bf16; alpha = rank: scale 1), drawn on
    `device` (fast for rank 128 on a GPU). Its update is a few percent of a unit-scale layer's output. Returns the
    file's bytes."""
    from safetensors.torch import save_file

    g = torch.Generator(device).manual_seed(seed)
    sd = {}
    for name, (n_in, n_out) in linears.items():
        a = torch.randn(rank, n_in, generator=g, device=device) / n_in ** 0.5
        b = torch.randn(n_out, rank, generator=g, device=device) * 0.05 / rank ** 0.5
        sd[f"transformer.{name}.lora_A.weight"] = a.bfloat16().cpu()
        sd[f"transformer.{name}.lora_B.weight"] = b.bfloat16().cpu()
    save_file(sd, str(path))
    return path.stat().st_size


def dynamo_graphs() -> int:
    from torch._dynamo.utils import counters

    return int(counters["stats"]["unique_graphs"])


def cuda_graph_count(svc) -> int:
    cg = svc.registry["cuda_graphs"]
    return sum(len(r.graphs) for r in getattr(cg, "transformers", {}).values())


def measure_rank(a, rank: int, linears: dict, work: Path, width: int, height: int, image) -> dict:
    lib = work / f"rank{rank}"
    lib.mkdir(parents=True, exist_ok=True)
    t0 = time.perf_counter()
    draw_on = "cuda" if torch.cuda.is_available() and a.device != "cpu" else "cpu"
    sizes = {name: write_adapter(lib / f"{name}.safetensors", linears, rank, seed, draw_on)
             for name, seed in ((f"r{rank}a", rank), (f"r{rank}b", rank + 1))}
    write_s = time.perf_counter() - t0
    names = list(sizes)
    t0 = time.perf_counter()
    svc = FluxService(ServiceConfig(model=a.model, device=a.device, optimizations=a.optimizations,
                                    compile_vae=False, lora_dir=lib, lora_max_rank=rank, cache_dir=a.cache_dir))
    svc.load()
    load_s = time.perf_counter() - t0
    tiers = {"exact": {}} | ({"fp8": {"use_mxfp4": True}} if "low_precision" in svc.prepared else {})
    out: dict = {"rank": rank, "adapter_file_mib": {n: round(s / 2**20, 1) for n, s in sizes.items()},
                 "write_s": round(write_s, 1), "service_load_s": round(load_s, 1), "prepared": sorted(svc.prepared),
                 "slots": svc.health()["lora"]["slots"], "tiers": {}}
    if "low_precision" not in svc.prepared:
        out["fp8"] = "not prepared: " + str(svc.registry["low_precision"].available(svc.device_info))

    def req(flags: dict, loras=(), steps=a.steps, seed=1):
        return InferenceRequest(prompt="make the car red", width=width, height=height, steps=steps, seed=seed,
                                loras=[{"name": n, "scale": 1.0} for n in loras], **flags)

    # warm-ups (compile / capture) without and with one adapter; the first adapter request also loads it
    first_load = {}
    for tier, flags in tiers.items():
        cold = {}
        for label, loras in (("without", ()), ("with", (names[0],))):
            r = svc.generate(req(flags, loras, steps=2), image)
            cold[label] = round(r.timings_ms.get("cold_start", 0.0), 1)
            if "lora_load" in r.timings_ms:
                first_load[names[0]] = r.timings_ms["lora_load"]
        out["tiers"][tier] = {"cold_start_ms": cold}
    r = svc.generate(req(tiers["exact"], (names[1],), steps=1), image)
    first_load[names[1]] = r.timings_ms.get("lora_load")
    out["first_load_ms"] = first_load
    out["dynamo_graphs_after_warmups"] = dynamo_graphs()  # the counter below counts: compiles happened by now

    # step time, interleaved: exact / fp8 x without / with adapter A
    per_step = {(t, w): [] for t in tiers for w in ("without", "with")}
    for _ in range(a.runs):
        for tier, flags in tiers.items():
            for label, loras in (("without", ()), ("with", (names[0],))):
                r = svc.generate(req(flags, loras), image)
                per_step[(tier, label)].append(r.timings_ms["transformer_per_step"])
    for tier in tiers:
        without = statistics.median(per_step[(tier, "without")])
        with_ = statistics.median(per_step[(tier, "with")])
        out["tiers"][tier].update({"step_ms_without": round(without, 2), "step_ms_with": round(with_, 2),
                                   "overhead_pct": round(100 * (with_ / without - 1), 2),
                                   "runs": {k[1]: [round(v, 2) for v in vals] for k, vals in per_step.items()
                                            if k[0] == tier}})

    # switching between the two loaded adapters, under compile (and CUDA graphs where prepared)
    switch = {}
    for tier, flags in tiers.items():
        svc.generate(req(flags, (names[0],), steps=1), image)
        graphs, captures = dynamo_graphs(), cuda_graph_count(svc)
        times, colds = [], 0
        for i in range(a.switches):
            r = svc.generate(req(flags, (names[(i + 1) % 2],), steps=1), image)
            times.append(r.timings_ms.get("lora_switch", float("nan")))
            colds += "cold_start" in r.timings_ms
        switch[tier] = {"switch_ms": [round(t, 2) for t in times], "switch_ms_median": round(statistics.median(times), 2),
                        "dynamo_graphs_compiled_during_switches": dynamo_graphs() - graphs,
                        "cuda_graphs_captured_during_switches": cuda_graph_count(svc) - captures,
                        "cold_starts_during_switches": colds}
    out["switch"] = switch

    # fidelity: fp8 + adapter vs bf16 + adapter (same seed), fp8 vs bf16 without, and the adapter's own effect
    fid_steps = min(a.steps, 8)
    exact_with = svc.generate(req(tiers["exact"], (names[0],), steps=fid_steps, seed=5), image)
    exact_without = svc.generate(req(tiers["exact"], (), steps=fid_steps, seed=5), image)
    out["adapter_effect_bf16"] = fidelity.fidelity(exact_without, exact_with)
    if "fp8" in tiers:
        fp8_with = svc.generate(req(tiers["fp8"], (names[0],), steps=fid_steps, seed=5), image)
        fp8_without = svc.generate(req(tiers["fp8"], (), steps=fid_steps, seed=5), image)
        out["fidelity"] = {"fp8_with_adapter_vs_bf16_with_adapter": fidelity.fidelity(exact_with, fp8_with),
                           "fp8_vs_bf16_without_adapter": fidelity.fidelity(exact_without, fp8_without),
                           "steps": fid_steps}
    out["health_lora"] = {k: v for k, v in svc.health()["lora"].items() if k != "library"}
    del svc, exact_with, exact_without
    torch._dynamo.reset()  # compiled code holds the service's modules: let the next rank's service have the memory
    gc.collect()
    if torch.cuda.is_available():
        torch.cuda.empty_cache()
    return out


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    add_model_and_workload_args(p, "edit-512")
    p.set_defaults(optimizations=None)
    p.add_argument("--ranks", default=None, help="comma list (default 32,128; --small: 4,8)")
    p.add_argument("--steps", type=int, default=None, help="steps per timed request (default 10; --small: 2)")
    p.add_argument("--runs", type=int, default=None, help="timed requests per row (default 3; --small: 2)")
    p.add_argument("--switches", type=int, default=None, help="switch requests per tier (default 6; --small: 3)")
    p.add_argument("--small", action="store_true",
                   help="a quick run (the tiny model on CPU): small ranks, 256x256, few steps; compile uses dynamo's "
                        "eager backend (set --compile-backend to change)")
    p.add_argument("--compile-backend", default=None,
                   help="torch.compile backend for the blocks (default inductor; --small: eager)")
    p.add_argument("--cache-dir", default=None)
    p.add_argument("--work-dir", default=None, help="where the adapters are written (default: a temporary dir)")
    p.add_argument("--out", required=True, help="JSON file to write")
    a = p.parse_args(argv)
    a.argv = list(sys.argv[1:] if argv is None else argv)
    small = a.small
    a.steps = a.steps or (2 if small else 10)
    a.runs = a.runs or (2 if small else 3)
    a.switches = a.switches or (3 if small else 6)
    if a.optimizations is None:
        a.optimizations = "qkv_fusion,modulation_table,compile" if small else "auto"
    backend = a.compile_backend or ("eager" if small else None)
    from optimizations.compile import Compile

    original = Compile._kwargs
    if backend:  # a measuring tool's choice (the server always uses inductor); undone on the way out
        Compile._kwargs = lambda self: {**original(self), "backend": backend}
    try:
        return run(a, small, backend)
    finally:
        Compile._kwargs = original


def run(a, small: bool, backend: str | None) -> int:
    ranks = [int(r) for r in (a.ranks or ("4,8" if small else "32,128")).split(",")]
    if small:
        a.width, a.height = a.width or 256, a.height or 256
    a.cache_dir = Path(a.cache_dir) if a.cache_dir else None
    width, height, image = workload_request(a)
    t_start = time.perf_counter()
    linears = block_linears(a.model, a.cache_dir)
    work = Path(a.work_dir) if a.work_dir else Path(tempfile.mkdtemp(prefix="bench-lora-"))
    results = {"tool": "tools/bench_lora.py", "argv": a.argv, "model": a.model,
               "workload": a.workload, "width": width, "height": height, "edit": image is not None,
               "steps": a.steps, "runs": a.runs, "compile_backend": backend or "inductor",
               "device": torch.cuda.get_device_name() if torch.cuda.is_available() and a.device != "cpu" else "cpu",
               "torch": torch.__version__, "block_linears": len(linears), "ranks": {}}
    for rank in ranks:
        t0 = time.perf_counter()
        results["ranks"][str(rank)] = measure_rank(a, rank, linears, work, width, height, image)
        results["ranks"][str(rank)]["phase_s"] = round(time.perf_counter() - t0, 1)
        print(f"rank {rank}: {results['ranks'][str(rank)]['phase_s']} s", file=sys.stderr)
    results["total_s"] = round(time.perf_counter() - t_start, 1)
    out = Path(a.out)
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(json.dumps(results, indent=1))
    print(table(results))
    print(f"\nJSON: {out}")
    return 0


def table(results: dict) -> str:
    rows = ["| rank | tier | step without (ms) | step with (ms) | overhead | switch median (ms) | recompiles | "
            "captures | first load (ms) |", "|---|---|---|---|---|---|---|---|---|"]
    for rank, r in results["ranks"].items():
        loads = ", ".join(f"{v:.0f}" for v in r["first_load_ms"].values() if v is not None)
        for tier, t in r["tiers"].items():
            s = r["switch"][tier]
            rows.append(f"| {rank} | {tier} | {t['step_ms_without']} | {t['step_ms_with']} | {t['overhead_pct']:+.1f}% "
                        f"| {s['switch_ms_median']} | {s['dynamo_graphs_compiled_during_switches']} | "
                        f"{s['cuda_graphs_captured_during_switches']} | {loads} |")
        fid = r.get("fidelity", {}).get("fp8_with_adapter_vs_bf16_with_adapter")
        if fid:
            rows.append(f"| {rank} | fp8 fidelity | vs bf16 with the adapter: {fid} | | | | | | |")
    return "\n".join(rows)


if __name__ == "__main__":
    sys.exit(main())
