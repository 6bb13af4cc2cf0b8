#!/usr/bin/env python
"""What a LoRA switch costs on the fp8 merge path (kontext_server/lora/fp8_merge.py), kernel by kernel: every block
linear of FLUX at its real shape, with the real merge code, for each way of adding the adapters' updates.

    python bench/bench_fp8_merge.py --ranks 32,128 --configs 32x128x4,64x64x4,64x128x8,128x64x8 --out merge.json
    TRITON_INTERPRET=1 python bench/bench_fp8_merge.py --small   (CPU: that it runs and is exact, no timing; the
        interpreter computes bf16 as the GPU does: optimizations/kernels/interpreter.py)
    TRITON_INTERPRET=1 python bench/bench_fp8_merge.py --host    (CPU: the host's part of a switch, built and replayed)

Builds the transformer's block linears as the fp8 copy holds them (19 double blocks: fused q/k/v of image and text,
their output projections, both MLPs; 38 single blocks: the fused q/k/v + MLP input, the two column halves of the
split proj_out), bf16 weights quantised by the merge's own kernel in torchao's rounding, and two adapters per rank
on every one of those linears. Times, per way of adding the updates (`gemm`: cuBLAS's addmm into scratch rows, then
the one-pass quantisation; `gemm-u`: s B A alone into them, W added by the one-pass kernel; or the tiled kernel at
BM rows x BK columns x warps; each with `-scalar` for the kernels without their 16-byte accesses): the switch
between the two adapters (`Fp8Merge.apply`, synchronised: the host's issue time and the total), both the first write
of an adapter (its launches built and recorded) and the median of the later ones (the recorded plan replayed, as a
server's switches between loaded adapters are), and the restore (`Fp8Merge.restore`, the one-pass kernel: the same
for every config but a `-scalar` one). Checks on the way: the restore gives the copy back bit for bit, and a merged
weight is the quantisation of W + s B A up to the GEMMs' summation order (the share of fp8 values that differ from
torch's fp32 addmm). Weights and adapters are random: the time depends only on the shapes. What it leaves out of a
real switch: the modulation table's slots, written on the host.
"""
from __future__ import annotations

import argparse
import json
import statistics
import sys
import time
from pathlib import Path
from types import SimpleNamespace

import torch

D, MLP, DOUBLE, SINGLE = 3072, 12288, 19, 38


def block_linears(d: int, mlp: int, double: int, single: int) -> list[tuple[str, int, int, list, slice | None]]:
    """(name, out, in, parts [(module, rows)], column block of a split proj_out) per fp8 linear."""
    out = []
    for i in range(double):
        p = f"transformer_blocks.{i}"
        out += [(f"{p}.attn.to_qkv", 3 * d, d, [(f"{p}.attn.to_{x}", d) for x in "qkv"], None),
                (f"{p}.attn.to_added_qkv", 3 * d, d, [(f"{p}.attn.add_{x}_proj", d) for x in "qkv"], None),
                (f"{p}.attn.to_out.0", d, d, [(f"{p}.attn.to_out.0", d)], None),
                (f"{p}.attn.to_add_out", d, d, [(f"{p}.attn.to_add_out", d)], None)]
        for ff in ("ff", "ff_context"):
            out += [(f"{p}.{ff}.net.0.proj", mlp, d, [(f"{p}.{ff}.net.0.proj", mlp)], None),
                    (f"{p}.{ff}.net.2", d, mlp, [(f"{p}.{ff}.net.2", d)], None)]
    for i in range(single):
        p = f"single_transformer_blocks.{i}"
        out += [(f"{p}.qkv_mlp", 3 * d + mlp, d, [(f"{p}.attn.to_{x}", d) for x in "qkv"] + [(f"{p}.proj_mlp", mlp)],
                 None),
                (f"{p}.proj_out.attn", d, d, [(f"{p}.proj_out", d)], slice(0, d)),
                (f"{p}.proj_out.mlp", d, mlp, [(f"{p}.proj_out", d)], slice(d, d + mlp))]
    return out


def build(linears, device: str, seed: int = 0):
    """The merge's targets over fresh weights, and the modules' input widths (a proj_out's whole input)."""
    from kontext_server.lora.fp8_merge import Target
    from optimizations.fp8.linear import Fp8Linear
    from optimizations.kernels.fp8_weight_quant import quantize_weight_rows

    g = torch.Generator(device=device).manual_seed(seed)
    targets, widths = [], {}
    full = {}  # a split proj_out's one weight, of which each half is a column block
    for name, n, k, parts, cols in linears:
        if cols is None:
            w = (torch.randn(n, k, generator=g, device=device) * 0.02).to(torch.bfloat16)
        else:
            base = name.rsplit(".", 1)[0]
            if base not in full:
                width = max(c.stop for other, _, _, _, c in linears if c is not None and other.startswith(base + "."))
                full[base] = (torch.randn(n, width, generator=g, device=device) * 0.02).to(torch.bfloat16)
            w = full[base][:, cols]
        q, s = quantize_weight_rows(w.contiguous(), True)
        linear = Fp8Linear(q, s, None, out_dtype=torch.bfloat16)
        offsets, rows = [], 0
        for module, size in parts:
            offsets.append((module, rows, size))
            rows += size
            widths[module] = k if cols is None else full[name.rsplit(".", 1)[0]].shape[1]
        targets.append(Target(name, linear, w, SimpleNamespace(name=name, parts=offsets), cols or slice(None),
                              "triton_torchao"))
    return targets, widths


def adapter(targets, widths: dict, rank: int, device: str, seed: int):
    from kontext_server.lora.store import DeviceAdapter, DeviceTarget

    g = torch.Generator(device=device).manual_seed(seed)
    mods = {}
    for t in targets:
        for module, _, size in t.slot.parts:
            if module not in mods:
                k = widths[module]
                mods[module] = DeviceTarget((torch.randn(rank, k, generator=g, device=device) / k ** 0.5)
                                            .to(torch.bfloat16),
                                            (torch.randn(size, rank, generator=g, device=device) * 0.01)
                                            .to(torch.bfloat16), 1.0)
    return DeviceAdapter(f"r{rank}-{seed}", rank, mods, (seed,), 0.0)  # as a store's: its writes are recorded


def check(targets, merge, a, pristine) -> dict:
    """Merged bytes against torch's fp32 addmm + the same quantiser, then the restore against the copy as built."""
    from kontext_server.lora.fp8_merge import QUANTISERS

    merge.apply(("check", a.name), [(a, 1.0)])
    differ = total = 0
    for t in targets[:: max(1, len(targets) // 12)]:
        q, _ = QUANTISERS["triton_torchao"](t.merged([(a, 1.0)]))
        differ += (q.view(torch.uint8) != t.rows.view(torch.uint8)).sum().item()
        total += q.numel()
    merge.restore()
    exact = all(torch.equal(t.rows.view(torch.uint8), p[0]) and torch.equal(t.linear.weight_scale, p[1])
                for t, p in zip(targets, pristine))
    return {"merged_fp8_values_differing_from_torch": differ / total, "restore_bit_identical": exact}


def timed(fn, sync) -> float:
    t0 = time.perf_counter()
    fn()
    sync()
    return (time.perf_counter() - t0) * 1000


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--ranks", default="32,128")
    p.add_argument("--configs", default="gemm,gemm-scalar,32x128x4,32x128x4-scalar",
                   help="`gemm` (cuBLAS's addmm into scratch rows, then the one-pass kernel), `gemm-u` (cuBLAS "
                        "writes s B A alone, the one-pass kernel adds W) and tiles of "
                        "merge_rows_fp8_kernel, BMxBKxWARPS; `-scalar`: the same with the kernels' 16-byte accesses "
                        "off (fp8_weight_quant.VECTOR_ACCESS), restores included")
    p.add_argument("--restore-rows", default="4,8,16",
                   help="rows per program of the one-pass kernel to time a restore with (ONE_PASS_ROWS)")
    p.add_argument("--switches", type=int, default=8)
    p.add_argument("--small", action="store_true", help="CPU: small shapes under Triton's interpreter, no timing")
    p.add_argument("--host", action="store_true",
                   help="CPU: the host's time for a gemm-first switch over FLUX's linears (small shapes, the kernels "
                        "not run): built each time against replayed (Fp8Merge's plans)")
    p.add_argument("--profile", default=None, metavar="CONFIG",
                   help="one of --configs: after its timing at each rank, two replayed switches under torch's "
                        "profiler, each kernel's total device time and count in the JSON (`profile`)")
    p.add_argument("--out", type=Path)
    a = p.parse_args(argv)
    if a.small or a.host:  # Triton's interpreter, made to round and multiply bf16 as the GPU does
        from optimizations.kernels.interpreter import match_the_gpu

        match_the_gpu()
    if a.host:
        out = {"tool": "bench/bench_fp8_merge.py", "argv": sys.argv[1:], "host_ms": host_time(a.switches)}
        print(json.dumps(out))
        if a.out:
            a.out.write_text(json.dumps(out, indent=1))
        return 0
    from kontext_server.lora import fp8_merge
    from kontext_server.lora.fp8_merge import Fp8Merge
    from optimizations.kernels import fp8_weight_quant

    device = "cpu" if a.small else "cuda"
    sync = torch.cuda.synchronize if device == "cuda" else (lambda: None)
    linears = block_linears(32, 64, 1, 1) if a.small else block_linears(D, MLP, DOUBLE, SINGLE)
    targets, widths = build(linears, device)
    pristine = [(t.rows.view(torch.uint8).clone(), t.linear.weight_scale.clone()) for t in targets]
    merge = Fp8Merge(targets, {})
    configs = {c: fp8_merge.kernel_from_spec(c.removesuffix("-scalar")) for c in a.configs.split(",")}
    default = dict(fp8_merge.KERNEL)
    out = {"tool": "bench/bench_fp8_merge.py", "argv": sys.argv[1:], "device": torch.cuda.get_device_name()
           if device == "cuda" else "cpu", "torch": torch.__version__, "linears": len(targets),
           "weights_gib": round(sum(t.source.numel() for t in targets) * 2 / 2**30, 2), "default": default,
           "default_way": fp8_merge.merge_way(),
           "ranks": {}}
    for rank in map(int, a.ranks.split(",")):
        pair = [adapter(targets, widths, rank, device, seed) for seed in (1, 2)]
        r = out["ranks"][rank] = {"configs": {}}
        for key, c in configs.items():
            fp8_merge.KERNEL.update(c)
            fp8_weight_quant.VECTOR_ACCESS = not key.endswith("-scalar")
            try:
                checked = check(targets, merge, pair[0], pristine)
                switch, issue, first = [], [], {}
                for i in range(0 if a.small else a.switches + 2):
                    ad = pair[i % 2]
                    ms = timed(lambda: merge.apply((ad.name, key), [(ad, 1.0)]), sync)
                    if i == 1:  # the second adapter's first write: built and recorded (check() compiled)
                        first = {"first_switch_ms": round(ms, 2), "first_issue_ms": round(merge.last_issue_ms, 2)}
                    elif i > 1:  # replays of the recorded writes (Fp8Merge's plans)
                        switch.append(ms)
                        issue.append(merge.last_issue_ms)
                if key == a.profile:
                    r.setdefault("profile", {})[key] = profile_switches(merge, pair, key, device)
                restore = [] if a.small else restores(merge, pair[0], key, 4, sync)
                r["configs"][key] = {**checked, **first, **({"switch_ms_median": round(statistics.median(switch), 2),
                                                            "issue_ms_median": round(statistics.median(issue), 2),
                                                            "restore_ms_median": round(statistics.median(restore), 2)}
                                                           if switch else {})}
            except Exception as exc:  # noqa: BLE001 - a tile that does not compile or fit is reported, not fatal
                r["configs"][key] = {"error": f"{type(exc).__name__}: {exc}"[:300]}
            finally:
                fp8_merge.KERNEL.update(default)
                fp8_weight_quant.VECTOR_ACCESS = True
            print(rank, key, r["configs"][key], flush=True)
    if not a.small:
        out["restore_by_rows"] = restore_by_rows(merge, pair[0], [int(x) for x in a.restore_rows.split(",")], sync)
        print("restore by rows per program", out["restore_by_rows"], flush=True)
    if a.out:
        a.out.write_text(json.dumps(out, indent=1))
    print(table(out))
    return 0


def profile_switches(merge, pair, key: str, device: str, switches: int = 2, top: int = 12) -> dict:
    """Where a replayed switch's device time goes: `switches` switches under torch.profiler, the kernels (or on a
    CPU the ops) with the most self time, summed over them, per switch."""
    from torch.profiler import ProfilerActivity, profile

    for i in range(2):  # both adapters recorded before the profile: it sees replays only
        merge.apply((pair[i % 2].name, key), [(pair[i % 2], 1.0)])
    activities = [ProfilerActivity.CPU] + ([ProfilerActivity.CUDA] if device == "cuda" else [])
    with profile(activities=activities) as prof:
        for i in range(switches):
            merge.apply((pair[i % 2].name, key), [(pair[i % 2], 1.0)])
        if device == "cuda":
            torch.cuda.synchronize()
    attr = "self_device_time_total" if device == "cuda" else "self_cpu_time_total"
    events = timed_events(prof.key_averages(), attr)
    events.sort(key=lambda e: -getattr(e, attr))
    total = sum(getattr(e, attr) for e in events)
    return {"per_switch_ms": round(total / 1000 / switches, 2), "time": attr,
            "top": [{"name": e.key[:120], "ms_per_switch": round(getattr(e, attr) / 1000 / switches, 3),
                     "calls_per_switch": e.count / switches} for e in events[:top]]}


def timed_events(events, attr: str) -> list:
    """The events that carry `attr`'s time once. On a GPU only the device's own (kernels, copies, memsets): the ops
    and runtime calls that launched them (aten::addmm, cuLaunchKernelEx) report the same device time again."""
    from torch.autograd import DeviceType

    cuda = attr == "self_device_time_total"
    return [e for e in events if getattr(e, attr, 0) > 0 and (not cuda or e.device_type == DeviceType.CUDA)]


def host_time(switches: int, double: int = DOUBLE, single: int = SINGLE) -> dict:
    """Median milliseconds of the host's part of a switch between two adapters (rank 16) over FLUX's 266 block
    linears (or those of `double` and `single` blocks) at small widths on the CPU, with the kernels' launches replaced
    by nothing (their tables are built and copied; the addmms run, on the CPU): each switch built (no plan kept)
    against replayed."""
    from kontext_server.lora import fp8_merge
    from kontext_server.lora.fp8_merge import Fp8Merge
    from optimizations.kernels import fp8_weight_quant

    targets, widths = build(block_linears(32, 64, double, single), "cpu")  # quantised with the real kernel
    pair = [adapter(targets, widths, 16, "cpu", seed) for seed in (1, 2)]

    class NoLaunch:
        def __getitem__(self, grid):
            return lambda *args, **kwargs: None

    saved = (fp8_weight_quant.restore_rows_fp8_kernel, fp8_weight_quant.merge_rows_fp8_kernel, dict(fp8_merge.KERNEL))
    fp8_weight_quant.restore_rows_fp8_kernel = fp8_weight_quant.merge_rows_fp8_kernel = NoLaunch()
    fp8_merge.KERNEL.update(gemm_first=True, config=None)
    res = {}
    try:
        for name, plans in (("built", 0), ("replayed", Fp8Merge.PLANS)):
            merge = Fp8Merge(targets, {})
            merge.PLANS = plans
            times = []
            for i in range(switches + 2):
                ad = pair[i % 2]
                times.append(timed(lambda: merge.apply((ad.name, i), [(ad, 1.0)]), lambda: None))
            res[name] = round(statistics.median(times[2:]), 2)  # the first two record (or build) each adapter once
    finally:
        fp8_weight_quant.restore_rows_fp8_kernel, fp8_weight_quant.merge_rows_fp8_kernel = saved[:2]
        fp8_merge.KERNEL.clear()
        fp8_merge.KERNEL.update(saved[2])
    return res


def restores(merge, ad, key, n: int, sync) -> list[float]:
    """n restores, each after a merge of adapter `ad` (under a key of its own): their milliseconds."""
    times = []
    for i in range(n):
        merge.apply((key, i), [(ad, 1.0)])
        sync()
        times.append(timed(merge.restore, sync))
    return times


def restore_by_rows(merge, ad, rows: list[int], sync) -> dict:
    """The restore's time (median of 4) for each number of rows per program of the one-pass kernel."""
    from optimizations.kernels import fp8_weight_quant

    default, res = fp8_weight_quant.ONE_PASS_ROWS, {}
    try:
        for n in rows:
            fp8_weight_quant.ONE_PASS_ROWS = n
            res[n] = round(statistics.median(restores(merge, ad, ("rows", n), 5, sync)[1:]), 2)  # the first compiles
    finally:
        fp8_weight_quant.ONE_PASS_ROWS = default
    return res


def table(out: dict) -> str:
    rows = ["| rank | kernel (gemm, gemm-u, or tile BMxBKxwarps) | switch, replayed (ms) | host issue (ms) | "
            "first switch, built (ms) | its host issue (ms) | restore (ms) | merged values off torch's | "
            "restore exact |", "|---|---|---|---|---|---|---|---|---|"]
    for rank, r in out["ranks"].items():
        for key, c in r["configs"].items():
            rows.append(f"| {rank} | {key} | {c.get('switch_ms_median', c.get('error', ''))} | "
                        f"{c.get('issue_ms_median', '')} | {c.get('first_switch_ms', '')} | "
                        f"{c.get('first_issue_ms', '')} | {c.get('restore_ms_median', '')} | "
                        f"{c.get('merged_fp8_values_differing_from_torch', '')} | "
                        f"{c.get('restore_bit_identical', '')} |")
    gb = out["weights_gib"] * 2**30 * 1.5 / 1e9  # bf16 read + fp8 written: the least a switch can move
    rows.append(f"\nLeast traffic of a switch or restore (bf16 weights read once, fp8 written once): {gb:.1f} GB, "
                f"{gb / 3.35:.1f} ms at the H100 SXM's 3.35 TB/s.")
    if out.get("restore_by_rows"):
        rows.append("Restore by rows per program of the one-pass kernel (ms): " + ", ".join(
            f"{n}: {ms}" for n, ms in out["restore_by_rows"].items()))
    return "\n".join(rows)


if __name__ == "__main__":
    sys.exit(main())
