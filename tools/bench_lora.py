#!/usr/bin/env python
"""What LoRA adapters cost a request: step time with and without one (the fused branch and the side branch, in one
server), the switch between two, their first load, and the fp8 tier's fidelity with an adapter.

    python tools/bench_lora.py --model synthetic-full --workload edit-512 --ranks 32 --out benchmarks/latest/lora.json
    python tools/bench_lora.py --model tiny --device cpu --small --out /tmp/lora.json     (CPU: that it runs)

For each rank (32 and 128; --small: 4 and 8) it writes two synthetic adapters on every linear of the 57 blocks
(random, non-zero, diffusers' layout) into a directory of their own, starts a FluxService on it (the server's start-up
optimisations, `auto` on a GPU: compile, CUDA graphs, the fp8 copy...; the slots' rank is that rank), and through the
service's own request path:
- warms up each tier without and with one adapter, on each branch of --lora-paths (`fused`: the adapters' rows
  appended under the weights, the exact tier's default; `unfused`: the side branch, what FLUX_LORA_FUSED_BRANCH=0
  gives; kontext_server/lora/slots.py, fused_rows.py; `merged`: the adapters merged into the tier's weights, the
  default where the tier has a merge: the fp8 copy's (lora/fp8_merge.py) and, where FLUX_LORA_EXACT_MERGE gives it
  its copies, the exact tier's (lora/exact_merge.py); without `merged` the tool's server builds neither). Each
  active adapter count and branch compiles once: reported as cold starts;
- times the transformer per step, interleaved, for the exact tier and the fp8 tier, without an adapter and with
  adapter A on each branch: each branch's overhead is a ratio against the same server's steps without an adapter;
- switches between the two loaded adapters A and B, request after request, on each timed branch of the tier,
  recording the switch (`lora_switch`: the slot writes, the fp8 copy's appended rows included, and on the merged
  path the merge, synchronised) and counting dynamo's compiled graphs and the CUDA graphs captured (targets:
  <= 50 ms, no recompile, no capture); on the merged path also the restore a request of the tier without adapters
  pays after one with them; on the others also the same switches written afresh, without the recorded plans a switch
  back to earlier adapters replays (lora/switch_plans.py), with the zeros and copies batched as foreach ops and one
  op each (lora/batched_writes.py);
- reports each adapter's first load (`lora_load`: read, validate, copy to the device);
- fidelity: fp8 + adapter against bf16 + adapter (the exact tier's branch) with the same seed, per branch (and fp8
  against bf16 without an adapter, for comparison), the exact merge against that branch, and how far the adapter
  moves the bf16 output (so a small error means something);
- the fp8 branch's own error, on any device (no fp8 tier needed, so on CPU too): the inputs every slotted layer of
  the exact tier sees in one step with adapter A (eager), put through the fp8 copy's branch as each branch computes
  it (fused: the input rows and A's rows quantised to e4m3, one GEMM; unfused: the input rows quantised, then
  dequantised for a bf16 GEMM with A), against the bf16 update x A^T B^T: relative to the update, and relative to
  the layer's output.
Writes the JSON to --out and prints a table. The run time is mostly each rank's server start and its compiles (one
per tier, active adapter count and branch; --lora-paths fused halves them), then 3 x 10 steps per timed row.
"""
from __future__ import annotations

import argparse
import contextlib
import cProfile
import gc
import json
import math
import pstats
import statistics
import sys
import tempfile
import time
from pathlib import Path

import torch

from kontext_server import settings
from kontext_server.benchmark import fidelity
from kontext_server.benchmark.workloads import add_model_and_workload_args, workload_request
from kontext_server.lora import batched_writes
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
    if draw_on == "cuda":
        torch.cuda.reset_peak_memory_stats()  # this rank's own peaks
    svc = FluxService(ServiceConfig(model=a.model, device=a.device, optimizations=a.optimizations,
                                    compile_vae=False, lora_dir=lib, lora_max_rank=rank, cache_dir=a.cache_dir))
    merged = "merged" in a.lora_paths
    with settings.process_env_set(settings.LORA_FP8_MERGE, "1" if merged else "0"), \
            settings.process_env_set(settings.LORA_EXACT_MERGE, settings.LORA_EXACT_MERGE.get() if merged else "0"):
        svc.load()  # the switches are read at the slots' install
    load_s = time.perf_counter() - t0
    memory = {"after_load": device_memory(svc.device)}
    tiers = {"exact": {}} | ({"fp8": {"use_mxfp4": True}} if "low_precision" in svc.prepared else {})
    default_path = svc.lora.path
    merges = {tier: svc.lora.merge_for(tier) for tier in ("exact", "fp8")}  # each tier's merge, or None
    paths = [p for p in a.lora_paths if p == "unfused" or (p == "fused" and svc.lora.fuse)
             or (p == "merged" and any(merges.values()))]
    health = svc.health()["lora"]
    out: dict = {"rank": rank, "adapter_file_mib": {n: round(s / 2**20, 1) for n, s in sizes.items()},
                 "write_s": round(write_s, 1), "service_load_s": round(load_s, 1), "prepared": sorted(svc.prepared),
                 "slots": health["slots"], "branch": health["branch"], "paths": paths,
                 "default_path": default_path, "tiers": {}}
    if "low_precision" not in svc.prepared:
        out["fp8"] = "not prepared: " + str(svc.registry["low_precision"].available(svc.device_info))
    if merged and merges["fp8"] is None:
        out["merged"] = "not timed: " + ("no fp8 tier" if "low_precision" not in svc.prepared else
                                         "the server built no fp8 merge")
    if merged and merges["exact"] is None:
        out["exact_merge"] = "not timed: " + str(svc.lora.exact_merge_off)
    untimed = [t for t in tiers if not any(p != "merged" or merges[t] is not None for p in paths)]
    if untimed:  # every tier needs a branch with an adapter to time (its step, switch and fidelity rows)
        raise SystemExit(f"--lora-paths {','.join(a.lora_paths)}: the {' and '.join(untimed)} tier has no branch to "
                         f"time on this server ({out.get('exact_merge') or out.get('merged') or 'none built'}); "
                         "add fused or unfused")

    def req(flags: dict, loras=(), steps=a.steps, seed=1):
        return InferenceRequest(prompt="make the car red", width=width, height=height, steps=steps, seed=seed,
                                loras=[{"name": n, "scale": 1.0} for n in loras], **flags)

    def run(flags: dict, loras=(), path: str = default_path, **kw):
        svc.lora.set_path(path)
        return svc.generate(req(flags, loras, **kw), image)

    # warm-ups (compile / capture) without and with one adapter on each branch; the first adapter request also loads it
    def rows(tier: str) -> list:
        timed = [p for p in paths if p != "merged" or merges[tier] is not None]
        return [("without", (), default_path)] + [(f"with_{p}", (names[0],), p) for p in timed]

    first_load = {}
    for tier, flags in tiers.items():
        cold = {}
        for label, loras, path in rows(tier):
            r = run(flags, loras, path, steps=2)
            cold[label] = round(r.timings_ms.get("cold_start", 0.0), 1)
            if "lora_load" in r.timings_ms:
                first_load[names[0]] = r.timings_ms["lora_load"]
        out["tiers"][tier] = {"cold_start_ms": cold}
    r = run(tiers["exact"], (names[1],), steps=1)
    first_load[names[1]] = r.timings_ms.get("lora_load")
    out["first_load_ms"] = first_load
    out["dynamo_graphs_after_warmups"] = dynamo_graphs()  # the counter below counts: compiles happened by now

    # step time, interleaved: exact / fp8 x without / with adapter A on each branch
    per_step = {(t, label): [] for t in tiers for label, _, _ in rows(t)}
    for _ in range(a.runs):
        for tier, flags in tiers.items():
            for label, loras, path in rows(tier):
                per_step[(tier, label)].append(run(flags, loras, path).timings_ms["transformer_per_step"])
    for tier in tiers:
        without = statistics.median(per_step[(tier, "without")])
        t = out["tiers"][tier]
        t["step_ms_without"] = round(without, 2)
        t["paths"] = {}
        for label, _, path in rows(tier)[1:]:
            with_ = statistics.median(per_step[(tier, label)])
            t["paths"][path] = {"step_ms_with": round(with_, 2), "overhead_pct": round(100 * (with_ / without - 1), 2)}
        main = t["paths"].get(default_path) or next(iter(t["paths"].values()))
        t.update(main)  # the default branch's figures at the top level, as before
        t["runs"] = {k[1]: [round(v, 2) for v in vals] for k, vals in per_step.items() if k[0] == tier}

    # switching between the two loaded adapters on each timed branch, under compile (and CUDA graphs where prepared);
    # the default branch's figures at the tier's top level, as before
    switch = {}
    for tier, flags in tiers.items():
        by_path = {}
        for _, _, path in rows(tier)[1:]:
            merge = merges[tier] if path == "merged" else None
            by_path[path] = time_switches(svc, run, flags, names, path, a.switches, merge)
            if a.profile_switches:
                by_path[path]["host_profile"] = profile_switches(svc, run, flags, names, path, a.switches)
            if merge is not None:  # a request of the tier without adapters after one with: the weights restored
                restores, issued = [], []
                for i in range(a.switches):
                    run(flags, (names[i % 2],), path, steps=1)
                    restores.append(run(flags, (), path, steps=1).timings_ms.get("lora_switch", float("nan")))
                    issued.append(merge.last_issue_ms)
                by_path[path]["restore_ms"] = [round(t, 2) for t in restores]
                by_path[path]["restore_ms_median"] = round(statistics.median(restores), 2)
                by_path[path]["restore_issue_ms_median"] = round(statistics.median(issued), 2)
        main = by_path.get(default_path) or by_path.get("fused") or next(iter(by_path.values()))
        switch[tier] = {**main, "paths": by_path}
    out["switch"] = switch

    # fidelity: fp8 + adapter vs bf16 + adapter (same seed) on each branch, fp8 vs bf16 without, the adapter's effect
    fid_steps = min(a.steps, 8)
    # the bf16 reference: the exact tier's branch ("fused" where the rows exist), whatever the server's default
    exact_branch = "fused" if svc.lora.fuse else "unfused"
    exact_with = run(tiers["exact"], (names[0],), exact_branch, steps=fid_steps, seed=5)
    exact_without = run(tiers["exact"], (), steps=fid_steps, seed=5)
    out["adapter_effect_bf16"] = fidelity.fidelity(exact_without, exact_with)
    if merges["exact"] is not None:  # the exact merge's one rounding of W + s B A against the branch's arithmetic
        out["exact_merged_vs_branch"] = fidelity.fidelity(
            exact_with, run(tiers["exact"], (names[0],), "merged", steps=fid_steps, seed=5))
    if "fp8" in tiers:
        fp8_without = run(tiers["fp8"], (), steps=fid_steps, seed=5)
        out["fidelity"] = {"fp8_vs_bf16_without_adapter": fidelity.fidelity(exact_without, fp8_without),
                           "steps": fid_steps, "bf16_reference_path": exact_branch}
        for path in paths:
            fp8_with = run(tiers["fp8"], (names[0],), path, steps=fid_steps, seed=5)
            out["fidelity"][f"fp8_with_adapter_vs_bf16_with_adapter_{path}"] = fidelity.fidelity(exact_with,
                                                                                                  fp8_with)
        del fp8_with, fp8_without
    eager = {**tiers["exact"], **({"use_cuda_graphs": False} if "cuda_graphs" in svc.prepared else {})}
    out["fp8_branch_error"] = fp8_branch_error(svc, lambda: run(eager, (names[0],), steps=1), a.branch_rows)
    svc.lora.set_path(default_path)
    out["health_lora"] = {k: v for k, v in svc.health()["lora"].items() if k != "library"}
    out["memory_gib"] = {**memory, "end": device_memory(svc.device)}  # the room the exact merge's `auto` judges
    svc = exact_with = exact_without = None  # freed before the next rank's server (run() is not called after)
    torch._dynamo.reset()  # compiled code holds the service's modules: let the next rank's service have the memory
    gc.collect()
    if torch.cuda.is_available():
        torch.cuda.empty_cache()
    return out


def device_memory(device) -> dict | None:
    """Free, allocated and reserved device memory now, and the peaks so far, in GiB (None off CUDA)."""
    if torch.device(device).type != "cuda":
        return None
    free, total = torch.cuda.mem_get_info(device)
    gib = 2 ** 30
    return {"free": round(free / gib, 2), "total": round(total / gib, 2),
            "allocated": round(torch.cuda.memory_allocated(device) / gib, 2),
            "reserved": round(torch.cuda.memory_reserved(device) / gib, 2),
            "peak_allocated": round(torch.cuda.max_memory_allocated(device) / gib, 2),
            "peak_reserved": round(torch.cuda.max_memory_reserved(device) / gib, 2)}


def alternating_switches(run, flags: dict, names: list, path: str, n: int) -> list:
    """n requests alternating between adapters B and A on `path` (one step each): each one's `lora_switch` (NaN where
    it switched nothing)."""
    return [run(flags, (names[(i + 1) % 2],), path, steps=1).timings_ms.get("lora_switch", float("nan"))
            for i in range(n)]


def profile_switches(svc, run, flags: dict, names: list, path: str, n: int, top: int = 25) -> dict:
    """n more switches between adapters A and B on `path`, with cProfile on only while the manager switches (from
    entering `applied` to its yield, the synchronisation included, as `lora_switch` times it): per switch, the
    profiled wall time, and the functions with the most cumulative time (file:line(name), calls, tottime and cumtime
    per switch). Where `torch.cuda.synchronize` takes much of it, the GPU's work is what a switch waits for; else the
    host's."""
    manager, prof, entered = svc.lora, cProfile.Profile(), []
    original = manager.applied

    @contextlib.contextmanager
    def profiled(*args, **kw):
        cm = original(*args, **kw)
        t0 = time.perf_counter()
        prof.enable()
        try:
            value = cm.__enter__()
        finally:
            prof.disable()
            entered.append((time.perf_counter() - t0) * 1000)
        with contextlib.ExitStack() as stack:
            stack.push(cm)
            yield value

    manager.applied = profiled
    try:
        switched = alternating_switches(run, flags, names, path, n)
    finally:
        del manager.applied  # the class's method again
    stats = pstats.Stats(prof)
    rows = sorted(stats.stats.items(), key=lambda kv: kv[1][3], reverse=True)[:top]
    return {"switches": n, "switch_ms": [None if math.isnan(t) else round(t, 2) for t in switched],
            "profiled_ms_per_switch": round(sum(entered) / n, 2),
            "top_cumulative": [{"function": f"{Path(f).name}:{line}({name})", "calls_per_switch": round(nc / n, 1),
                                "tottime_ms": round(tt / n * 1000, 3), "cumtime_ms": round(ct / n * 1000, 3)}
                               for (f, line, name), (_, nc, tt, ct, _) in rows]}


def time_switches(svc, run, flags: dict, names: list, path: str, n: int, merge=None) -> dict:
    """n requests alternating between adapters A and B on `path`: each one's `lora_switch`, and what compiled,
    captured or started cold meanwhile; `merge`: the tier's merge on the merged path (its host issue time)."""
    run(flags, (names[0],), path, steps=1)
    graphs, captures = dynamo_graphs(), cuda_graph_count(svc)
    times, issued, colds = [], [], 0
    for i in range(n):
        r = run(flags, (names[(i + 1) % 2],), path, steps=1)
        times.append(r.timings_ms.get("lora_switch", float("nan")))
        if merge is not None:
            issued.append(merge.last_issue_ms)
        colds += "cold_start" in r.timings_ms
    extra = {"merge_issue_ms_median": round(statistics.median(issued), 2)} if issued else {}
    if merge is None:  # the same switches written afresh (no recorded plan), batched and one op each
        plans = svc.lora.plans
        plans.enabled = False
        try:
            fresh = alternating_switches(run, flags, names, path, n)
            batched_writes.FOREACH = False
            each = alternating_switches(run, flags, names, path, n)
        finally:
            batched_writes.FOREACH, plans.enabled = True, True
        extra["switch_ms_median_fresh"] = round(statistics.median(fresh), 2)
        extra["switch_ms_median_one_op_each"] = round(statistics.median(each), 2)
    return {"switch_ms": [round(t, 2) for t in times], "switch_ms_median": round(statistics.median(times), 2), **extra,
            "dynamo_graphs_compiled_during_switches": dynamo_graphs() - graphs,
            "cuda_graphs_captured_during_switches": cuda_graph_count(svc) - captures,
            "cold_starts_during_switches": colds, "path": path}


# ---- the fp8 branch's own error, from the exact tier's activations ----------------------------------------------
def capture_inputs(variant, generate, rows: int) -> dict:
    """The inputs of every LoRA wrapper of `variant` on its first call during `generate()` (run eagerly: compiled
    code would not call the hooks), `rows` of them evenly spaced over the tokens: wrapper -> tuple of (rows, in)."""
    from kontext_server.lora.slots import WRAPPERS

    captured: dict = {}

    def hook(module, args):
        if module not in captured:
            flat = [t.reshape(-1, t.shape[-1]) for t in args if torch.is_tensor(t)]
            step = max(1, flat[0].shape[0] // rows)
            captured[module] = tuple(t[::step][:rows].detach().clone() for t in flat)

    handles = [m.register_forward_pre_hook(hook) for m in variant.modules() if isinstance(m, WRAPPERS)]
    try:
        with torch.compiler.set_stance("force_eager"):
            generate()
    finally:
        for h in handles:
            h.remove()
    return captured


def _scaled_rows(out: int, n_in: int, slot, cols: slice, device):
    """An fp8 linear of the layer's shape whose appended rows are the slot's A (its weight is irrelevant here: only
    the appended columns are read)."""
    from kontext_server.lora.slots import ScaledRows
    from optimizations.fp8.linear import Fp8Linear

    fp8 = Fp8Linear(torch.zeros(out, n_in, dtype=torch.float8_e4m3fn, device=device),
                    torch.ones(out, 1, device=device), None, out_dtype=slot.A.dtype)
    rows = ScaledRows(fp8, slot.A.shape[0], cols)
    rows.refresh(slot.A, 0, slot.A.shape[0])
    return fp8, rows


@torch.no_grad()
def branch_errors(wrapper, inputs: tuple) -> dict:
    """One wrapper's update (its slot's adapters, k as set) on the captured inputs: the fp8 copy's fused branch and its
    side branch against the bf16 update x A^T B^T (the exact tier's), as norms relative to the update and to the
    layer's output. The fp8 input rows are the bf16 inputs quantised per row (in the fp8 tier the producing kernel
    quantises the fp8 tier's own activations, which differ a little; the MLP halves' inputs are post-GELU here)."""
    from kontext_server.lora.slots import LoraGeluOutput, _dense
    from optimizations.fp8.linear import Fp8Rows, quantize_rows

    slot = wrapper.slot
    n, out = slot.k * slot.rows, slot.out_features
    a, b = slot.A[:n].float(), slot.B[:, :n].float()
    linear = wrapper.base.proj if isinstance(wrapper, LoraGeluOutput) and wrapper.via_proj else wrapper.base
    halves = list(inputs)
    splits = [slice(0, slot.in_features)] if len(halves) == 1 else \
        [slice(0, slot.in_split), slice(slot.in_split, slot.in_features)]
    x = torch.cat(halves, -1).float()
    ref = (x @ a.t()) @ b.t()
    base = x @ linear.weight.float().t()
    fused_h = side_h = 0
    for half, cols in zip(halves, splits):
        rows = Fp8Rows(*quantize_rows(half))
        fp8, appended = _scaled_rows(out, half.shape[-1], slot, cols, half.device)
        fused_h = fused_h + appended(fp8, rows, n)[:, out:].float()
        side_h = side_h + torch.nn.functional.linear(_dense(rows, slot.A.dtype), slot.A[:n, cols]).float()
    result = {}
    for path, h in (("fused", fused_h), ("unfused", side_h)):
        err = (h @ b.t() - ref).norm()
        result[path] = {"vs_update": float(err / ref.norm().clamp_min(1e-30)),
                        "vs_output": float(err / (base + ref).norm().clamp_min(1e-30))}
    result["update_vs_output"] = float(ref.norm() / (base + ref).norm().clamp_min(1e-30))
    return result


def fp8_branch_error(svc, generate, rows: int) -> dict:
    """The fp8 branch's error (branch_errors) over every slotted layer of the exact tier, adapter A active: median
    and max per branch, and the three worst layers of the fused branch."""
    exact = svc.transformer_variants["exact"]
    captured = capture_inputs(exact, generate, rows)
    names = {m: n for n, m in exact.named_modules()}
    per_layer = {}
    slots = {w.slot for w in captured}
    for slot in slots:
        slot.k = 1  # adapter A is in slot 0 (the capture request wrote it); the request set k back to 0
    try:
        for wrapper, inputs in captured.items():
            per_layer[names[wrapper]] = branch_errors(wrapper, inputs)
    finally:
        for slot in slots:
            slot.k = 0
    summary: dict = {"layers": len(per_layer), "rows_per_layer": rows}
    for path in ("fused", "unfused"):
        for key in ("vs_update", "vs_output"):
            values = [e[path][key] for e in per_layer.values()]
            summary[f"{path}_{key}_median"] = round(statistics.median(values), 5) if values else None
            summary[f"{path}_{key}_max"] = round(max(values), 5) if values else None
    if per_layer:
        summary["update_vs_output_median"] = round(statistics.median(e["update_vs_output"]
                                                                     for e in per_layer.values()), 5)
    worst = sorted(per_layer.items(), key=lambda kv: -kv[1]["fused"]["vs_update"])[:3]
    summary["worst_fused"] = {name: round(e["fused"]["vs_update"], 5) for name, e in worst}
    return summary


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    add_model_and_workload_args(p, "edit-512")
    p.set_defaults(optimizations=None)
    p.add_argument("--ranks", default=None, help="comma list (default 32,128; --small: 4,8)")
    p.add_argument("--steps", type=int, default=None, help="steps per timed request (default 10; --small: 2)")
    p.add_argument("--runs", type=int, default=None, help="timed requests per row (default 3; --small: 2)")
    p.add_argument("--switches", type=int, default=None, help="switch requests per tier (default 6; --small: 3)")
    p.add_argument("--lora-paths", default="fused,unfused,merged",
                   help="the branches to time, comma-separated: fused (the adapters' rows under the weights), "
                        "unfused (the side branch), merged (the adapters merged into the weights of each tier that "
                        "has a merge, its default; left out, the tool's server builds neither merge); each is a "
                        "ratio against the same server's steps without an adapter")
    p.add_argument("--merge-kernel", default=None,
                   help="how the fp8 merge adds the updates: gemm, gemm-u, a tile BMxBKxWARPS, or a JSON file of "
                        "bench/bench_fp8_merge.py (its fastest exact way at the lowest rank); default: the server's")
    p.add_argument("--profile-switches", action="store_true",
                   help="after each path's timed switches, as many again under cProfile (only the manager's switch): "
                        "where a switch's time goes, host or GPU (the JSON's host_profile)")
    p.add_argument("--branch-rows", type=int, default=128,
                   help="activation rows per layer for the fp8 branch error (default 128)")
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
    a.lora_paths = [p.strip() for p in a.lora_paths.split(",") if p.strip()]
    if not a.lora_paths or set(a.lora_paths) - {"fused", "unfused", "merged"}:
        p.error("--lora-paths: any of fused, unfused, merged")
    small = a.small
    a.steps = a.steps or (2 if small else 10)
    a.runs = a.runs or (2 if small else 3)
    a.switches = a.switches or (3 if small else 6)
    if a.optimizations is None:
        a.optimizations = "qkv_fusion,modulation_table,compile" if small else "auto"
    backend = a.compile_backend or ("eager" if small else None)
    from optimizations.compile import Compile

    from kontext_server.lora import fp8_merge

    original, kernel = Compile._kwargs, dict(fp8_merge.KERNEL)
    if backend:  # a measuring tool's choice (the server always uses inductor); undone on the way out
        Compile._kwargs = lambda self: {**original(self), "backend": backend}
    if a.merge_kernel:
        a.merge_kernel = fastest_merge_kernel(a.merge_kernel) if a.merge_kernel.endswith(".json") else a.merge_kernel
        fp8_merge.KERNEL.update(fp8_merge.kernel_from_spec(a.merge_kernel))
    try:
        return run(a, small, backend)
    finally:
        Compile._kwargs = original
        fp8_merge.KERNEL.update(kernel)


def fastest_merge_kernel(path: str) -> str:
    """The way with the fastest switch at the lowest rank of a bench/bench_fp8_merge.py JSON, among those whose
    restore was bit-identical and whose merged values stayed within 1% of torch's."""
    ranks = json.loads(Path(path).read_text())["ranks"]
    configs = ranks[min(ranks, key=int)]["configs"]
    fine = {k: c["switch_ms_median"] for k, c in configs.items() if "switch_ms_median" in c
            and c.get("restore_bit_identical") and c.get("merged_fp8_values_differing_from_torch", 1) < 0.01}
    if not fine:
        raise SystemExit(f"{path}: no merge kernel ran exactly")
    return min(fine, key=fine.get)


def run(a, small: bool, backend: str | None) -> int:
    from kontext_server.lora.fp8_merge import merge_way

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
               "merge_kernel": a.merge_kernel or "default", "merge_way": merge_way(),
               "device": torch.cuda.get_device_name() if torch.cuda.is_available() and a.device != "cpu" else "cpu",
               "torch": torch.__version__, "block_linears": len(linears), "ranks": {}}
    out = Path(a.out)
    out.parent.mkdir(parents=True, exist_ok=True)
    for rank in ranks:
        t0 = time.perf_counter()
        results["ranks"][str(rank)] = measure_rank(a, rank, linears, work, width, height, image)
        results["ranks"][str(rank)]["phase_s"] = round(time.perf_counter() - t0, 1)
        print(f"rank {rank}: {results['ranks'][str(rank)]['phase_s']} s", file=sys.stderr)
        results["total_s"] = round(time.perf_counter() - t_start, 1)
        out.write_text(json.dumps(results, indent=1))  # after each rank: a run cut short keeps the ranks it finished
    print(table(results))
    print(f"\nJSON: {out}")
    return 0


def table(results: dict) -> str:
    rows = ["| rank | tier | branch | step without (ms) | step with (ms) | overhead | switch median (ms) | "
            "recompiles | captures | first load (ms) |", "|---|---|---|---|---|---|---|---|---|---|"]
    for rank, r in results["ranks"].items():
        loads = ", ".join(f"{v:.0f}" for v in r["first_load_ms"].values() if v is not None)
        for tier, t in r["tiers"].items():
            s = r["switch"][tier]
            for path, p in t["paths"].items():
                each, fresh = s.get("switch_ms_median_one_op_each"), s.get("switch_ms_median_fresh")
                afresh = f" (afresh: {fresh}, one op each: {each})" if each is not None else ""
                switch = (f"{s['switch_ms_median']}{afresh} | "
                          f"{s['dynamo_graphs_compiled_during_switches']} | "
                          f"{s['cuda_graphs_captured_during_switches']}") if path == s["path"] else "| |"
                rows.append(f"| {rank} | {tier} | {path} | {t['step_ms_without']} | {p['step_ms_with']} | "
                            f"{p['overhead_pct']:+.1f}% | {switch} | {loads} |")
        for tier in r["switch"]:
            m = r["switch"][tier].get("paths", {}).get("merged")
            if m:
                rows.append(f"| {rank} | {tier} merge | merged | switch {m['switch_ms_median']} ms (host "
                            f"{m['merge_issue_ms_median']}), restore {m['restore_ms_median']} ms (host "
                            f"{m['restore_issue_ms_median']}) | | | | | | |")
        if r.get("exact_merged_vs_branch"):
            rows.append(f"| {rank} | exact fidelity | merged | vs the branch: {r['exact_merged_vs_branch']} "
                        f"| | | | | | |")
        for key, fid in r.get("fidelity", {}).items():
            if key.startswith("fp8_with_adapter_vs_bf16_with_adapter_"):
                rows.append(f"| {rank} | fp8 fidelity | {key.rsplit('_', 1)[1]} | vs bf16 with the adapter: {fid} "
                            f"| | | | | | |")
        err = r.get("fp8_branch_error") or {}
        for path in ("fused", "unfused"):
            if err.get(f"{path}_vs_update_median") is not None:
                rows.append(f"| {rank} | fp8 branch error | {path} | median {err[f'{path}_vs_update_median']} "
                            f"(max {err[f'{path}_vs_update_max']}) of the update, {err[f'{path}_vs_output_median']} "
                            f"of the output | | | | | | |")
    return "\n".join(rows)


if __name__ == "__main__":
    sys.exit(main())
