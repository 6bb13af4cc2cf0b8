#!/usr/bin/env python
"""Which way of running a LoRA adapter beside FLUX's GEMMs can cost <= 5% of a step? One step's block GEMMs, replayed
as a CUDA graph per variant, at FLUX's shapes (bench/probe_kernel_bound.py's list), bf16 and fp8.

    python bench/bench_lora_branches.py --workload edit-512 --ranks 32,128 --out lora_branches.json
    python bench/bench_lora_branches.py --small          (CPU: that every variant runs and agrees, no timing)

Variants, per GEMM y = x W^T (W: N x K) with an adapter A (r x K), B (N x r), its scale folded into B; a GEMM that
fuses several projections (q, k, v; a single block's q, k, v and MLP input) carries one rank-r adapter per
projection, taken here as one of rank r x projections with a dense B (the slots pad the same way):
- `base`: the GEMM alone;
- `side`: the side branch (FLUX_LORA_FUSED_BRANCH=0): y = x W^T, then y += (x A^T) B^T (two more GEMMs, y read
  and written);
- `rows`: the fused-rows branch (the server's default): [y | u] = x [W; A]^T in one GEMM, then y += u B^T;
- `kext`: the update inside the base GEMM's reduction: u = x A^T, then y = [x | u] [W | B]^T, one GEMM over K + r.
  Here x is already in a K + r wide buffer (its producer would write it there) and u is written beside it; the
  weight is stored K + r wide once, a switch writes only B's columns;
- `kext-base`: the same storage with no adapter: y = x W^T through the K-wide views (what a request without an adapter
  would run on that storage).
fp8 (row-wise scales, torch._scaled_mm as the fp8 copy runs its GEMMs): `base`, `side` (u from the bf16 input, the
update in bf16 added to the fp8 GEMM's output) and `kext` ([x | u] quantised with one row scale, [W | B] with W's
row scales: B's columns rounded to e4m3 on W's scale). The fp8 variants' error is their output's against the bf16
model with the adapter (fp32), beside the fp8 base's against the base, on random operands (x ~ N(0, 1),
W ~ U(+-1/sqrt(K)), A ~ N(0, 1/K), B ~ N(0, 0.01^2)): random adapters
say nothing of a trained one's ranges; it tells only whether the arithmetic holds.
Reports per variant: ms per step (median of --replays graph replays), the ratio to `base` of the same precision,
and each variant's relative error against an fp32 reference on the largest GEMM. And the cost of the other route,
merging the adapter into the fp8 copy's weights at each change of adapters (`switch_ms`): `merge` writes the fp8 rows
of W + B A over every block weight, `restore` those of W alone (in torch ops; the time a switch would add to the
request that makes it, against the per-step ratios above times the steps).
"""
from __future__ import annotations

import argparse
import json
import statistics
import sys
from pathlib import Path

import torch

from probe_kernel_bound import IMAGE_TOKENS, block_ops  # bench/ (this script's directory)

D, MLP = 3072, 12288
FP8 = torch.float8_e4m3fn
E4M3_MAX = 448.0


def projections(k: int, n: int) -> int:
    """How many of the model's linears one GEMM of block_ops fuses (each with its own adapter)."""
    return {(D, 3 * D): 3, (D, 3 * D + MLP): 4}.get((k, n), 1)


def _quantise_rows_into(t: torch.Tensor, q: torch.Tensor, scale: torch.Tensor) -> None:
    """`t`'s rows in e4m3 into `q`, their float32 scales (row amax / 448) into `scale`: in place, as a captured
    graph replays it."""
    amax = t.abs().amax(dim=1, keepdim=True).float().clamp(min=1e-12)
    torch.div(amax, E4M3_MAX, out=scale)
    q.copy_((t.float() / scale).clamp(-E4M3_MAX, E4M3_MAX))


def _rowwise(t: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """e4m3 rows and their float32 scales (amax / 448 per row), new tensors."""
    q = torch.empty(t.shape, dtype=FP8, device=t.device)
    scale = torch.empty(t.shape[0], 1, dtype=torch.float32, device=t.device)
    _quantise_rows_into(t, q, scale)
    return q, scale


class Gemm:
    """One GEMM's operands for every variant (the same x, W, A, B)."""

    def __init__(self, m: int, k: int, n: int, r: int, device: str, fp8: bool):
        g = torch.Generator(device).manual_seed(m * 7 + k * 3 + n)
        bf = torch.bfloat16
        self.m, self.k, self.n, self.r = m, k, n, r
        self.xc = torch.empty(m, k + r, dtype=bf, device=device)  # x and, beside it, u (kext)
        self.x = self.xc[:, :k]
        self.x.normal_(generator=g)
        self.wide = torch.empty(n, k + r, dtype=bf, device=device)  # [W | B], the kext storage
        self.w = self.wide[:, :k]
        self.w.uniform_(-k ** -0.5, k ** -0.5, generator=g)
        self.b = self.wide[:, k:]
        self.b.normal_(0.0, 0.01, generator=g)
        self.a = torch.empty(r, k, dtype=bf, device=device).normal_(0.0, k ** -0.5, generator=g)
        self.w_plain = self.w.contiguous()
        self.b_plain = self.b.contiguous()
        self.rows = torch.cat([self.w_plain, self.a])  # [W; A], the fused-rows storage
        self.y = torch.empty(m, n, dtype=bf, device=device)
        self.yu = torch.empty(m, n + r, dtype=bf, device=device)
        self.u = torch.empty(m, r, dtype=bf, device=device)
        self.fp8 = fp8
        if fp8:
            self.wq, self.sw = _rowwise(self.w_plain)
            self.xq, self.sx = _rowwise(self.x)
            # kext: B's columns on W's row scales, [x | u] on one row scale (computed when u is known)
            self.wideq = torch.cat([self.wq, (self.b.float() / self.sw).clamp(-E4M3_MAX, E4M3_MAX).to(FP8)], dim=1)
            self.xcq = torch.empty(m, k + r, dtype=FP8, device=device)
            self.sxc = torch.empty(m, 1, dtype=torch.float32, device=device)
            self.mq = torch.empty_like(self.wq)  # merge: the fp8 weight a switch writes, and its row scales
            self.ms = torch.empty_like(self.sw)

    # ---- bf16 ----
    def base(self):
        torch.mm(self.x, self.w_plain.t(), out=self.y)

    def side(self):
        torch.mm(self.x, self.w_plain.t(), out=self.y)
        torch.mm(self.x, self.a.t(), out=self.u)
        self.y.addmm_(self.u, self.b_plain.t())

    def rows_branch(self):
        torch.mm(self.x, self.rows.t(), out=self.yu)
        y = self.yu[:, :self.n]
        y.addmm_(self.yu[:, self.n:], self.b_plain.t())
        return y

    def kext(self):
        torch.mm(self.x, self.a.t(), out=self.u)
        self.xc[:, self.k:].copy_(self.u)
        torch.mm(self.xc, self.wide.t(), out=self.y)

    def kext_base(self):
        torch.mm(self.x, self.w.t(), out=self.y)

    # ---- fp8 ----
    def fp8_base(self):
        return torch._scaled_mm(self.xq, self.wq.t(), scale_a=self.sx, scale_b=self.sw.t(), out_dtype=torch.bfloat16)

    def fp8_side(self):
        y = self.fp8_base()
        torch.mm(self.x, self.a.t(), out=self.u)
        return y.addmm_(self.u, self.b_plain.t())

    def fp8_kext(self):
        torch.mm(self.x, self.a.t(), out=self.u)
        self.xc[:, self.k:].copy_(self.u)
        _quantise_rows_into(self.xc, self.xcq, self.sxc)  # the producer's row amax, with u
        return torch._scaled_mm(self.xcq, self.wideq.t(), scale_a=self.sxc, scale_b=self.sw.t(),
                                out_dtype=torch.bfloat16)

    def fp8_quantise(self):
        """What the fp8 base pays to quantise x (the producer's kernel, here as torch ops): `fp8_kext`'s own
        quantisation replaces it, so the timing adds it to `fp8_base` and `fp8_side` for a like-for-like step."""
        _quantise_rows_into(self.x, self.xq, self.sx)

    # ---- merging the adapter into the fp8 weights: a cost per switch of adapters, not per step ----
    def fp8_merge(self):
        """The fp8 rows of W + B A (bf16), written over the copy's weight: what a switch to this adapter would cost
        if adapters were merged into the fp8 copy instead of run beside it (torch ops, not one fused pass)."""
        _quantise_rows_into(torch.addmm(self.w_plain, self.b_plain, self.a), self.mq, self.ms)

    def fp8_restore(self):
        """The fp8 rows of W alone again: a request without adapters after a merged one."""
        _quantise_rows_into(self.w_plain, self.mq, self.ms)


VARIANTS = {"bf16": {"base": [Gemm.base], "side": [Gemm.side], "rows": [Gemm.rows_branch], "kext": [Gemm.kext],
                     "kext-base": [Gemm.kext_base]},
            "fp8": {"base": [Gemm.fp8_quantise, Gemm.fp8_base], "side": [Gemm.fp8_quantise, Gemm.fp8_side],
                    "kext": [Gemm.fp8_kext]},
            # once per change of adapters, over every block weight of the model (a step's GEMMs each have their own)
            "switch": {"merge": [Gemm.fp8_merge], "restore": [Gemm.fp8_restore]}}


def step_gemms(workload: str, rank: int, device: str, fp8: bool, small: bool) -> list[Gemm]:
    ops = [op for op in block_ops(IMAGE_TOKENS[workload]) if op[0] == "gemm"]
    if small:  # CPU smoke test: a few scaled-down GEMMs
        ops = [("gemm", 64, 96, 288), ("gemm", 64, 96, 96)]
    made: dict[tuple, Gemm] = {}  # operands once per distinct shape, as probe_kernel_bound.build_step (its docstring)
    for _, m, k, n in ops:
        key = (m, k, n, rank * (projections(k, n) if not small else 1))
        if key not in made:
            made[key] = Gemm(*key, device, fp8)
    return [made[(m, k, n, rank * (projections(k, n) if not small else 1))] for _, m, k, n in ops]


def errors(g: Gemm) -> dict:
    """Relative error (Frobenius) against fp32 of each variant's output, and of its update alone."""
    x, w, a, b = g.x.float(), g.w_plain.float(), g.a.float(), g.b_plain.float()
    base = x @ w.t()
    update = (x @ a.t()) @ b.t()
    ref = base + update

    def rel(out, target):
        return round(((out.float() - target).norm() / target.norm()).item(), 6)

    out = {}
    g.side()
    out["side"] = {"output": rel(g.y, ref), "update": rel(g.y.float() - base, update)}
    y = g.rows_branch()
    out["rows"] = {"output": rel(y, ref), "update": rel(y.float() - base, update)}
    g.kext()
    out["kext"] = {"output": rel(g.y, ref), "update": rel(g.y.float() - base, update)}
    g.kext_base()
    kb = g.y.clone()
    g.base()
    out["kext-base"] = {"output": rel(kb, base), "equals_base": bool(torch.equal(kb, g.y))}
    if g.fp8:
        g.fp8_quantise()
        fb = g.fp8_base().float()
        out["fp8 base"] = {"output": rel(fb, base)}
        # against the bf16 model with the adapter, beside the fp8 base's own error (an update "alone" is not
        # separable here: kext's row scale covers u too, so its x rounds differently from the base's)
        out["fp8 side"] = {"output": rel(g.fp8_side(), ref)}
        out["fp8 kext"] = {"output": rel(g.fp8_kext(), ref)}
    return out


def time_variant(gemms: list[Gemm], fns: list, replays: int) -> float:
    """ms per step: the variant's calls for every GEMM of a step, captured in one CUDA graph, median of replays."""
    def step():
        for g in gemms:
            for fn in fns:
                fn(g)

    s = torch.cuda.Stream()
    s.wait_stream(torch.cuda.current_stream())
    with torch.cuda.stream(s):
        for _ in range(2):
            step()
    torch.cuda.current_stream().wait_stream(s)
    graph = torch.cuda.CUDAGraph()
    with torch.cuda.graph(graph):
        step()
    for _ in range(3):
        graph.replay()
    times = []
    for _ in range(replays):
        start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
        start.record()
        graph.replay()
        end.record()
        end.synchronize()
        times.append(start.elapsed_time(end))
    del graph
    return statistics.median(times)


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--workload", default="edit-512", choices=sorted(IMAGE_TOKENS))
    p.add_argument("--ranks", default="32,128")
    p.add_argument("--replays", type=int, default=20)
    p.add_argument("--rounds", type=int, default=3, help="each variant timed this many times, interleaved")
    p.add_argument("--small", action="store_true", help="CPU smoke test: tiny GEMMs, errors only")
    p.add_argument("--out")
    a = p.parse_args(argv)
    cuda = torch.cuda.is_available() and not a.small
    device = "cuda" if cuda else "cpu"
    fp8 = cuda and torch.cuda.get_device_capability() >= (8, 9)
    result: dict = {"workload": a.workload, "device": torch.cuda.get_device_name() if cuda else "cpu",
                    "torch": torch.__version__, "command": " ".join(sys.argv), "ranks": {}}
    for rank in [int(r) for r in a.ranks.split(",")]:
        gemms = step_gemms(a.workload, rank, device, fp8, a.small)
        row: dict = {"gemms_per_step": len(gemms),
                     "errors_largest_gemm": errors(max(gemms, key=lambda g: g.m * g.k * g.n))}
        if cuda:
            ms: dict = {}
            for _ in range(a.rounds):
                for precision, variants in VARIANTS.items():
                    if precision in ("fp8", "switch") and not fp8:
                        continue
                    for name, fns in variants.items():
                        ms.setdefault(f"{precision} {name}", []).append(time_variant(gemms, fns, a.replays))
            row["ms_per_step"] = {k: round(statistics.median(v), 3) for k, v in ms.items()}
            row["switch_ms"] = {k.split()[1]: row["ms_per_step"].pop(k) for k in list(row["ms_per_step"])
                                if k.startswith("switch ")}
            row["vs_base"] = {k: round(v / row["ms_per_step"][f"{k.split()[0]} base"], 4)
                              for k, v in row["ms_per_step"].items()}
        result["ranks"][str(rank)] = row
        del gemms
        if cuda:
            torch.cuda.empty_cache()
        print(json.dumps({rank: row}, indent=1), flush=True)
    if a.out:
        Path(a.out).write_text(json.dumps(result, indent=1) + "\n")
    return 0


if __name__ == "__main__":
    sys.exit(main())
