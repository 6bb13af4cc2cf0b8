#!/usr/bin/env python
"""Memory tiers measured: for each `--memory-budget`, the tier chosen, peak GPU memory and latency per workload.

    # on a GPU machine (the measurement that counts: synthetic-full, the fast tier, the process limited to each budget)
    bash tools/gpu_session.sh py tools/memory_tiers.py --budgets 24GB,16GB --workloads t2i-1024,edit-1024 \
        --runs 3 --json-out "$OUT/memory_tiers.json"
    # the tiers the planner chooses for the full model, without loading it (no GPU needed)
    python tools/memory_tiers.py --plan 48GB,24GB,16GB,12GB,8GB
    # on a CPU, with the tiny model placed as the full model would be (the hooks run with onload device cpu)
    python tools/memory_tiers.py --model tiny --device cpu --budgets 10GB --workloads t2i-1024 --size 256 \
        --steps 2 --runs 1 --plan-sizes full

Each budget runs in a fresh process, which limits itself with `torch.cuda.set_per_process_memory_fraction(budget /
total)` before anything is loaded, then starts the service with `--memory-budget` (the model loaded into host memory
and placed by the tier), and runs every workload once as a warm-up (its CUDA graphs are captured there) and `--runs`
times timed, on the fast tier (`--tier exact` for the exact one): fp8 GEMMs + DPM-Solver++ (14 steps) + CUDA graphs,
with QKV fusion, channels-last, the attention backend and the modulation table prepared. torch.compile is left out
(`--optimizations`' default is `auto` without it): compiling the fp8 transformer takes minutes. The unlimited
baseline (no budget, no fraction) runs the same way, last unless `--baseline first`, for the ratios. Per workload:
peak memory allocated and reserved (reset before its warm-up, so capture included), the median request total, the
tier's own peak estimate beside the measured one, and an out-of-memory if one happened (the service answers it and
goes on with the next workload). Per budget, the host side too: the resident set's peak over the load and after the
requests (kontext_server/models/host_memory.py; the pinned copies of what streams are resident). A budget that
fails, even by killing its process, loses only its own row: each child writes its result as it finishes, and
`--deadline-s` skips what cannot start in time, saying so.
On a CPU there is no memory to measure (peaks are null) and no fp8: the tool then checks the machinery.
"""
from __future__ import annotations

import argparse
import json
import statistics
import subprocess
import sys
import tempfile
import threading
import time
import traceback
from pathlib import Path

BASELINE = "unlimited"
DEFAULT_OPTIMIZATIONS = "auto-no-compile"
TIERS = {"fast": {"use_mxfp4": True, "use_dpm_solver": True},  # the OpenAI quality "low"
         "exact": {"use_mxfp4": False, "use_dpm_solver": False}}  # the server's default request (28 Euler steps)


def _optimizations(spec: str, device: str) -> str:
    if spec != DEFAULT_OPTIMIZATIONS:
        return spec
    from optimizations.base import DeviceInfo
    from optimizations.registry import build_registry, resolve_names

    names = resolve_names("auto", build_registry(), DeviceInfo.detect(device))
    return ",".join(n for n in names if n != "compile") or "none"


def _use_full_sizes() -> None:
    """Plan with the full model's sizes whatever is loaded (the tiny model then placed as the full one would be)."""
    from kontext_server.service import memory_sizes

    measure = memory_sizes.measure
    memory_sizes.measure = lambda pipe, fp8, warmup_sizes=(): measure(memory_sizes.meta_pipeline(), fp8,
                                                                      warmup_sizes)


def _stacks_text(me: int, start: float) -> str:
    """Every other thread's stack now, as text. The frames are dropped on return: a frame kept until the next sample
    keeps its locals alive after its function returns (a deepcopy's memo, holding a copy's replaced parameters,
    kept a start's freed weights on the device and ran it out of memory)."""
    frames = {t: f for t, f in sys._current_frames().items() if t != threading.get_ident()}
    text = [f"--- {time.monotonic() - start:.1f} s\n"]
    for tid, frame in frames.items():
        text.append(f"thread {tid}{' (main)' if tid == me else ''}\n")
        text.append("".join(traceback.format_stack(frame)[-12:]))
    return "".join(text)


def sample_stacks(path: Path, every_s: float) -> None:
    """Where a slow start spends its time: every other thread's stack, every `every_s` seconds, appended to `path` by
    a daemon thread (sys._current_frames under the GIL; faulthandler's timer dumps without it and can crash). No
    frame is held between samples (_stacks_text)."""
    me, start = threading.get_ident(), time.monotonic()

    def run():
        while True:
            time.sleep(every_s)
            text = _stacks_text(me, start)
            with path.open("a") as f:
                f.write(text)

    threading.Thread(target=run, name="stack-sampler", daemon=True).start()


def live_by_origin(snapshot: dict, top: int = 25) -> list[dict]:
    """What holds the device's memory: the live blocks of a `torch.cuda.memory._snapshot()` summed by the innermost
    frame of this repository (or of torch / diffusers / torchao when none is ours), largest first."""
    mine = ("kontext_server/", "optimizations/", "patches/", "tools/")
    sums: dict[str, list] = {}
    for seg in snapshot.get("segments", []):
        for block in seg.get("blocks", []):
            if block.get("state") != "active_allocated":
                continue
            frames = block.get("frames") or []
            ours = [f for f in frames if any(m in f.get("filename", "") for m in mine)]
            f = (ours or frames or [{"filename": "?", "line": 0, "name": "?"}])[0]
            name = f.get("filename", "?")
            cut = min((name.find(m) for m in mine if m in name), default=-1)
            name = name[cut:] if cut >= 0 else "/".join(name.split("/")[-3:])  # ours from the repo root
            where = f"{name}:{f['line']} {f['name']}"
            s = sums.setdefault(where, [0, 0])
            s[0] += block["size"]
            s[1] += 1
    rows = sorted(sums.items(), key=lambda kv: -kv[1][0])[:top]
    return [{"where": w, "gib": round(b / 2**30, 3), "blocks": n} for w, (b, n) in rows]


def run_child(a) -> dict:
    """One configuration in this process: limit, load, run every workload; returns the row."""
    import torch

    from kontext_server.benchmark.floor import WORKLOADS
    from kontext_server.models import host_memory
    from kontext_server.benchmark.timing import test_image
    from kontext_server.engine import free_device_memory, is_oom
    from kontext_server.request import InferenceRequest
    from kontext_server.service import FluxService, ServiceConfig
    from kontext_server.service.memory_tiers import parse_budget

    device = a.device or ("cuda" if torch.cuda.is_available() else "cpu")
    cuda = device.startswith("cuda")
    if a.stacks_every:
        sample_stacks(Path(a.child_out).with_suffix(".stacks.txt"), a.stacks_every)
    if a.memory_history and cuda:
        torch.cuda.memory._record_memory_history(max_entries=200_000)  # each live block's allocating stack
    budget = None if a.budget == BASELINE else a.budget
    row: dict = {"budget": a.budget, "device": device, "tier_requested": a.tier, "workloads": {}}
    if cuda:
        idx = torch.device(device).index or 0
        total = torch.cuda.get_device_properties(idx).total_memory
        row.update(gpu=torch.cuda.get_device_name(idx), total_gib=round(total / 2**30, 2))
        if budget is not None:
            parsed = parse_budget(budget)
            if parsed.bytes is not None:
                fraction = min(1.0, parsed.bytes / total)
                torch.cuda.set_per_process_memory_fraction(fraction, idx)  # before anything is allocated
                row["memory_fraction"] = round(fraction, 4)
    if a.plan_sizes == "full":
        _use_full_sizes()
    opts = _optimizations(a.optimizations, device)
    row["optimizations"] = opts
    svc = FluxService(ServiceConfig(model=a.model, device=device, optimizations=opts, memory_budget=budget,
                                    cache_dir=Path(a.cache_dir) if a.cache_dir else None))
    t0 = time.perf_counter()
    try:
        with host_memory.measure() as host:  # the host side of a budget: the model, pinned copies of what streams
            svc.load()
    except BaseException as exc:  # noqa: BLE001 - the row says why this budget could not load
        row.update(load_error=f"{type(exc).__name__}: {str(exc)[:500]}", oom_at_load=is_oom(exc),
                   load_traceback=traceback.format_exception(exc)[-14:])
        if a.memory_history and cuda:
            row["live_at_load_error"] = live_by_origin(torch.cuda.memory._snapshot())
        return row
    row["load_s"] = round(time.perf_counter() - t0, 2)
    if cuda:  # the start's own peak (a budget must hold at load too, not only per request)
        row["load_peak_allocated_gib"] = round(torch.cuda.max_memory_allocated() / 2**30, 2)
    row["host_memory_load"] = host_memory.summary(host.result)
    health = svc.health()
    tier = health.get("memory_tier")
    row["tier"] = tier["summary"] if tier and "summary" in tier else "everything resident (no budget)"
    row["tier_detail"] = tier
    print(f"[{a.budget}] loaded in {row['load_s']} s: {row['tier']}", flush=True)
    if cuda:
        row["after_load_allocated_gib"] = round(torch.cuda.memory_allocated() / 2**30, 2)
        row["load_peak_allocated_gib"] = round(torch.cuda.max_memory_allocated() / 2**30, 2)
    for name in a.workloads:
        w, h, edit = WORKLOADS[name]
        w, h = a.size or w, a.size or h
        image = test_image(w, h) if edit else None
        req = InferenceRequest(prompt="a red car on a mountain road", width=w, height=h, steps=a.steps, seed=0,
                               **TIERS[a.tier])
        out: dict = {"width": w, "height": h, "edit": edit}
        if cuda:
            torch.cuda.synchronize()
            torch.cuda.reset_peak_memory_stats()
        try:
            warm = svc.generate(req, image, output_type="np")
            out["warmup_ms"] = round(warm.timings_ms["total"], 1)
            out["cold_start_ms"] = round(warm.timings_ms.get("cold_start", 0.0), 1)
            totals = [svc.generate(req, image, output_type="np").timings_ms["total"] for _ in range(a.runs)]
            out.update(total_ms_median=round(statistics.median(totals), 1) if totals else None,
                       totals_ms=[round(t, 1) for t in totals],
                       steps=warm.steps, memory_tier=warm.memory_tier,
                       applied=[k for k, d in warm.optimizations.items() if d.applied],
                       not_applied={k: d.detail for k, d in warm.optimizations.items()
                                    if d.requested and not d.applied}, oom=False)
        except BaseException as exc:  # noqa: BLE001 - one workload's failure must not lose the others
            out.update(oom=is_oom(exc), error=f"{type(exc).__name__}: {str(exc)[:300]}")
            free_device_memory()
        out["peak_allocated_gib"] = round(torch.cuda.max_memory_allocated() / 2**30, 2) if cuda else None
        out["peak_reserved_gib"] = round(torch.cuda.max_memory_reserved() / 2**30, 2) if cuda else None
        row["workloads"][name] = out
        peak = f"peak {out['peak_allocated_gib']} GiB allocated / {out['peak_reserved_gib']} reserved" if cuda else ""
        print(f"[{a.budget}] {name}: {out.get('total_ms_median')} ms {peak}{' OOM' if out.get('oom') else ''}",
              flush=True)
    row["host_rss_after_gib"] = host_memory.gib(host_memory.rss_bytes())  # serving, pinned copies included
    return row


def _child_argv(a, budget: str, out: Path) -> list[str]:
    argv = [sys.executable, str(Path(__file__).resolve()), "--child", "--budget", budget, "--child-out", str(out),
            "--model", a.model, "--optimizations", a.optimizations, "--runs", str(a.runs),
            "--workloads", ",".join(a.workloads), "--plan-sizes", a.plan_sizes, "--tier", a.tier]
    for flag, value in (("--device", a.device), ("--size", a.size), ("--steps", a.steps),
                        ("--cache-dir", a.cache_dir), ("--stacks-every", a.stacks_every)):
        if value is not None:
            argv += [flag, str(value)]
    if a.memory_history:
        argv.append("--memory-history")
    return argv


def run_all(a) -> dict:
    """Every budget and the baseline, each in its own process, within the deadline."""
    start = time.monotonic()
    rows: list[dict] = []
    result = {"model": a.model, "workloads": a.workloads, "runs": a.runs, "rows": rows, "tier": a.tier,
              "flags": TIERS[a.tier], "command": " ".join(sys.argv)}
    configs = ([BASELINE] if a.baseline == "first" else []) + list(a.budgets) + \
        ([BASELINE] if a.baseline == "last" else [])
    with tempfile.TemporaryDirectory(prefix="memory-tiers-") as tmp:
        for i, budget in enumerate(configs):
            left = a.deadline_s - (time.monotonic() - start)
            if left < 20:
                rows.append({"budget": budget, "skipped": f"out of time ({a.deadline_s:.0f} s deadline)"})
                continue
            out = Path(tmp) / f"row-{i}.json"
            print(f"== {budget} ({left:.0f} s left)", flush=True)
            try:
                proc = subprocess.run(_child_argv(a, budget, out), capture_output=True, text=True,
                                      timeout=min(a.child_timeout_s, left))
                rc, tail = proc.returncode, (proc.stdout + proc.stderr)[-2000:]
                sys.stdout.write(proc.stdout)
            except subprocess.TimeoutExpired as exc:
                rc, tail = "timeout", ((exc.stdout or b"").decode(errors="replace")
                                       + (exc.stderr or b"").decode(errors="replace"))[-2000:]
            if out.exists():
                row = json.loads(out.read_text())
            else:
                row = {"budget": budget, "error": f"the process ended without a result (exit {rc})", "log_tail": tail}
            row["exit"] = rc
            stacks = out.with_suffix(".stacks.txt")
            if stacks.exists() and a.json_out:  # kept beside the JSON, one file per budget
                kept = Path(a.json_out).with_suffix(f".{budget}.stacks.txt")
                kept.write_text(stacks.read_text())
                row["stacks"] = kept.name
            rows.append(row)
            if a.json_out:  # after every child: a later failure loses nothing written
                Path(a.json_out).write_text(json.dumps(result, indent=1) + "\n")
    add_ratios(rows)
    result["elapsed_s"] = round(time.monotonic() - start, 1)
    return result


def add_ratios(rows: list[dict]) -> None:
    base = next((r for r in rows if r.get("budget") == BASELINE and r.get("workloads")), None)
    for row in rows:
        for name, w in row.get("workloads", {}).items():
            b = (base or {}).get("workloads", {}).get(name, {})
            if base is not None and row is not base and w.get("total_ms_median") and b.get("total_ms_median"):
                w["vs_unlimited"] = round(w["total_ms_median"] / b["total_ms_median"], 2)


def markdown(result: dict) -> str:
    lines = ["| budget | tier chosen | workload | median total (s) | vs unlimited | peak allocated / reserved (GiB) | "
             "tier's peak estimate (GiB) | load (s) | host peak at load (GiB) | OOM |", "|---" * 10 + "|"]
    for row in result["rows"]:
        if not row.get("workloads"):
            why = row.get("skipped") or row.get("load_error") or row.get("error") or "no result"
            lines.append(f"| {row['budget']} | - | - | - | - | - | - | - | - | {why} |")
            continue
        estimate = (row.get("tier_detail") or {}).get("peak_estimate_gib", "-")
        for name, w in row["workloads"].items():
            total = f"{w['total_ms_median'] / 1000:.3f}" if w.get("total_ms_median") else "-"
            peak = (f"{w['peak_allocated_gib']} / {w['peak_reserved_gib']}" if w.get("peak_allocated_gib") is not None
                    else "-")
            oom = "yes" if w.get("oom") else (w.get("error", "no")[:60] if w.get("error") else "no")
            lines.append(f"| {row['budget']} | {row.get('tier', '-')} | {name} | {total} | "
                         f"{w.get('vs_unlimited', '-')} | {peak} | {estimate} | {row.get('load_s', '-')} | "
                         f"{(row.get('host_memory_load') or {}).get('peak_rss_gib', '-')} | {oom} |")
    return "\n".join(lines)


def plan_table(budgets: list[str], fp8: bool = True, modulation_table: bool = True) -> str:
    """The tiers the planner chooses for the full model at each budget (sizes from a meta-device build)."""
    from kontext_server.service import memory_sizes
    from kontext_server.service.memory_tiers import (T5, TRANSFORMER, TRANSFORMER_FP8, BudgetTooSmall, parse_budget,
                                                     plan_tier)

    sizes = memory_sizes.measure(memory_sizes.meta_pipeline(), fp8=fp8)
    names = [TRANSFORMER_FP8, T5, TRANSFORMER] if fp8 else [TRANSFORMER, T5]
    lines = ["| budget | " + " | ".join(names) + " | VAE | resident (GiB) | peak estimate (GiB) |",
             "|---|" + "---|" * (len(names) + 3)]
    refused = []
    for spec in budgets:
        try:
            tier = plan_tier(parse_budget(spec).bytes, sizes, fp8=fp8, modulation_table=modulation_table, spec=spec)
        except BudgetTooSmall as exc:
            lines.append(f"| {spec} | " + " | ".join(["too small"] * (len(names) + 1)) + " | - | - |")
            refused.append(str(exc))
            continue

        def cell(name):
            p = tier.placements[name]
            if p.modulation_on_host:
                return "resident, modulation weights on the host"
            return "resident" if p.resident else ("offloaded (block level)" if "block" in p.how
                                                  else "offloaded (leaf level)")
        vae = f"tiled at {tier.vae_tile} px" if tier.vae_tile else "whole"
        lines.append(f"| {spec} | " + " | ".join(cell(n) for n in names)
                     + f" | {vae} | {tier.resident_bytes / 2**30:.2f} | {tier.peak_estimate / 2**30:.2f} |")
    return "\n".join(lines + [""] + refused) + (f"\n\nDesign request: {sizes.design}; its working memory "
                                                f"{sizes.step_working / 2**30:.2f} GiB.")


def _names(spec: str) -> list[str]:
    return [s.strip() for s in spec.split(",") if s.strip()]


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--budgets", type=_names, default=["24GB", "16GB"], help="comma-separated, e.g. 24GB,16GB")
    p.add_argument("--workloads", type=_names, default=["t2i-1024", "edit-1024"])
    p.add_argument("--runs", type=int, default=3, help="timed runs per workload after one warm-up")
    p.add_argument("--model", default="synthetic-full")
    p.add_argument("--device", default=None)
    p.add_argument("--optimizations", default=DEFAULT_OPTIMIZATIONS,
                   help="prepared at start-up (default: auto without compile)")
    p.add_argument("--tier", choices=sorted(TIERS), default="fast",
                   help="the requests' tier: fast (fp8 + DPM-Solver++ + CUDA graphs) or exact (bf16, 28 steps: "
                        "streamed per step where the tier offloads the exact transformer, so slow)")
    p.add_argument("--size", type=int, default=None, help="override every workload's side (e.g. 256 on a CPU)")
    p.add_argument("--steps", type=int, default=None, help="denoising steps (default: the fast tier's 14)")
    p.add_argument("--cache-dir", default=None)
    p.add_argument("--plan-sizes", choices=["measured", "full"], default="measured",
                   help="full: plan with the full model's sizes whatever is loaded (a CPU check of the machinery)")
    p.add_argument("--baseline", choices=["last", "first", "none"], default="last",
                   help="when the unlimited baseline runs (default last: the budgets' rows come first)")
    p.add_argument("--deadline-s", type=float, default=290.0,
                   help="wall-clock seconds for everything: a budget that cannot start in time is skipped")
    p.add_argument("--child-timeout-s", type=float, default=240.0)
    p.add_argument("--stacks-every", type=float, default=None,
                   help="seconds: each budget's process writes every thread's stack this often (sys._current_frames) "
                        "to a file beside --json-out, to show where a slow start spends its time")
    p.add_argument("--memory-history", action="store_true",
                   help="record the device's allocations (torch.cuda.memory._record_memory_history); a load that fails "
                        "reports the live memory by the code that allocated it")
    p.add_argument("--json-out", help="write the result as JSON here (after each budget, and at the end)")
    p.add_argument("--plan", type=_names, default=None,
                   help="only print the tiers the planner chooses for the full model at these budgets")
    p.add_argument("--child", action="store_true", help=argparse.SUPPRESS)
    p.add_argument("--budget", help=argparse.SUPPRESS)
    p.add_argument("--child-out", help=argparse.SUPPRESS)
    a = p.parse_args(argv)
    if a.plan:
        print(plan_table(a.plan))
        return 0
    if a.child:
        row = run_child(a)
        Path(a.child_out).write_text(json.dumps(row, indent=1) + "\n")
        return 0
    from kontext_server.service.memory_tiers import parse_budget

    try:
        for b in a.budgets:
            parse_budget(b)
    except ValueError as exc:
        p.error(str(exc))
    result = run_all(a)
    print("\n" + markdown(result))
    if a.json_out:
        Path(a.json_out).write_text(json.dumps(result, indent=1) + "\n")
        print(f"JSON: {a.json_out}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
