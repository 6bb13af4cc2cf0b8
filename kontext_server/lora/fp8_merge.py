"""The fp8 copy with the request's adapters merged into its weights: no branch beside its GEMMs.

What: for an fp8-tier request with adapters, every fp8 linear of the copy that a slot covers is re-quantised in
place from the exact tier's weight plus the adapters' updates, W8 = Q(W + sum_j s_j B_j A_j), taken straight from
the loaded adapters (the store's device copies: the slots are not written for it); a later fp8 request without
adapters, or with others, re-quantises again from W. The storage is the same, so compiled code and captured CUDA
graphs run on as they are, and the step runs the base model's code: no per-step cost. Why: the branch costs every
step of every request (BENCHMARKS.md); a merge is a pass over the covered weights per change of adapters, paid only
when they change. On a GPU a change's writes go out in a few launches (optimizations/kernels/fp8_weight_quant.py,
many linears each): one launch per linear made the switch bound by the host. That kernel is checked at build on a
small weight against torch's sum (`merge_kernel_problem`); if it fails, merges are written linear by linear, and
`report()` says why.

Contract: a restore is bit-identical to the copy as built. Q must be the function that quantised the copy, so at
build time each candidate is tried on each target's exact weight, in order (on a GPU first the one-pass kernel of
optimizations/kernels/fp8_weight_quant.py in torchao's rounding and in ours, then torchao's own
`Float8Tensor.from_hp`, which the GPU's copy came from, torchao's row primitives, this repository's
`quantize_rows`), and a target is merged, with the first one that fits, only where one of them reproduces its
stored fp8 bytes and scales exactly. The others keep the branch, with the reason (`report()`); so does everything
the copy keeps in bf16 (the modulation linears or their table, the top-level linears).
What the copy and each target hold, and which linears a change writes (those the new adapters reach and those the
old ones reached, never the rest), is merged_weights.py's bookkeeping. The source W is the exact tier's weight, or,
where the exact tier merges adapters into its own weights (exact_merge.py), its copy of the base values.

Limits: the fp8 tier only (the exact tier's own merge is exact_merge.py); both copies on one device (the service
refuses LoRA slots under a memory budget anyway). The merged weight is rounded once to the exact weight's
dtype (W + sum s B A accumulated in fp32) and then quantised, as quantising a merged bf16 model would be: the
fp8 error of the merged weights is the fp8 tier's own, measured against bf16 with the same adapters by
tools/bench_lora.py. Not stateless: the copy holds one request's adapters at a time (requests run one at a time
on the worker thread).
"""
from __future__ import annotations

import collections
import logging
from dataclasses import dataclass
from typing import Callable, NamedTuple

import torch

from kontext_server.lora.adapter_plans import AdapterPlans
from kontext_server.lora.merged_weights import MergedWeights, exact_weights, part_updates
from optimizations.fp8.linear import Fp8Linear, quantize_rows
from optimizations.fusions.split_proj_out import SplitProjOut

log = logging.getLogger("flux.lora")
Quantiser = Callable[[torch.Tensor], tuple[torch.Tensor, torch.Tensor]]  # (out, in) -> fp8 (out, in), scales


def _torchao_from_hp(w: torch.Tensor):
    """What torchao's quantize_ does to a weight with Float8DynamicActivationFloat8WeightConfig(PerRow()): its own
    choice of kernel included."""
    from torchao.quantization import PerRow
    from torchao.quantization.quantize_.workflows.float8.float8_tensor import Float8Tensor

    t = Float8Tensor.from_hp(w, float8_dtype=torch.float8_e4m3fn, granularity=PerRow())
    return t.qdata, t.scale


def _torchao_rows(w: torch.Tensor):
    """torchao's row-wise primitives (its torch path): the scale is amax / 448 in the weight's dtype."""
    from torchao.quantization.quant_primitives import _choose_scale_float8, _quantize_affine_float8

    scale = _choose_scale_float8(w, block_size=[1, w.shape[1]], float8_dtype=torch.float8_e4m3fn)
    return _quantize_affine_float8(w, scale, torch.float8_e4m3fn), scale


def _triton(scale_in_weight_dtype: bool) -> Quantiser:
    """optimizations/kernels/fp8_weight_quant.py with no update: torchao's rounding (True) or quantize_rows'. A
    target recognised by it is written by that kernel's grouped launch (`Target.grouped`)."""
    def quantise(w: torch.Tensor):
        from optimizations.kernels.fp8_weight_quant import quantize_weight_rows

        return quantize_weight_rows(w, scale_in_weight_dtype)
    return quantise


# Tried in this order at install (on a GPU the one-pass kernels first: the fastest that reproduces a linear is used
# for it; on a CPU they would run in Triton's interpreter, so they are left out there).
QUANTISERS: dict[str, Quantiser] = {"triton_torchao": _triton(True), "triton_rows": _triton(False),
                                    "torchao": _torchao_from_hp, "torchao_rows": _torchao_rows,
                                    "quantize_rows": quantize_rows}


# How the grouped writes add the updates (optimizations/kernels/fp8_weight_quant.py's Launch); bench/bench_fp8_merge.py
# compares the ways:
# - update_rows (DEFAULT_WAY, at every rank): cuBLAS writes s B A alone into scratch rows, and the one-pass kernel adds
#   W as it quantises, so W is read once, by the kernel. The fastest switch measured, at rank 32 and at 128. s B A is
#   rounded to bf16 before the sum.
# - gemm_first alone: addmm(W, B, A) into the scratch rows (torch copies W there first), then the one-pass kernel:
#   W + s B A rounded to bf16 once, as the exact merge writes it.
# - the tiled kernel: the update computed in its tiles and the fp32 sum quantised; it reads A again per tile of rows,
#   so it slows with the rank. Its tables hold the scales: its recorded writes replay only for the same scales (the
#   gemm-first ways read them when they run).
# KERNEL's gemm_first None means DEFAULT_WAY; tools force a way (kernel_from_spec).
KERNEL: dict = {"gemm_first": None, "config": None, "update_rows": False}
DEFAULT_WAY: dict = {"gemm_first": True, "config": None, "update_rows": True}


def merge_way() -> dict:
    """Launch's gemm_first, config and update_rows for a write: KERNEL where a tool forced a way, else DEFAULT_WAY."""
    return dict(KERNEL) if KERNEL.get("gemm_first") is not None else dict(DEFAULT_WAY)


def kernel_from_spec(spec: str) -> dict:
    """KERNEL's value for a tool's spelling of it: `gemm` (gemm_first), `gemm-u` (gemm_first with update_rows) or a
    tile of the tiled kernel, BMxBKxWARPS."""
    if spec in ("gemm", "gemm-u"):
        return {"gemm_first": True, "config": None, "update_rows": spec == "gemm-u"}
    try:
        bm, bk, warps = (int(x) for x in spec.split("x"))
    except ValueError:
        raise ValueError(f"a merge kernel: gemm, gemm-u or BMxBKxWARPS (e.g. 64x64x4), not {spec!r}") from None
    return {"gemm_first": False, "config": {"BM": bm, "BK": bk, "num_warps": warps}, "update_rows": False}


def candidates(device: torch.device) -> list[str]:
    return [q for q in QUANTISERS if device.type == "cuda" or not q.startswith("triton")]


class _Scale:
    """A request's scale for its i-th adapter as a recorded write reads it: cell[i], read anew each time the write
    runs. Standing in for the request scale in part_updates, it becomes that update's scale: times the adapter's own
    (`own`), the same product in the same order."""
    __slots__ = ("cell", "i", "own")

    def __init__(self, cell: list, i: int, own: float = 1.0):
        self.cell, self.i, self.own = cell, i, own

    def __mul__(self, own: float) -> "_Scale":
        return _Scale(self.cell, self.i, self.own * own)

    def __float__(self) -> float:
        return self.cell[self.i] * self.own


class _PlanKey(NamedTuple):
    """What a recorded write is keyed by (Fp8Merge._plan_key)."""
    settings: tuple  # the kernels' settings
    scale_free: bool  # the gemm-first way: its steps read the request's scales when they run
    written: tuple  # (target index, with adapters) per target written
    held: tuple  # (adapter id, its scale, or None where scale_free) per adapter


@dataclass
class Target:
    """One fp8 linear to merge into: its weight rows and scales (views of the live storage), the exact weight it was
    quantised from, the slot whose modules' adapters it takes (`slot.parts`: each module's rows of it) and which of
    their input columns it sees."""
    name: str
    linear: Fp8Linear
    source: torch.Tensor  # (out, in_cols), the exact tier's weight (a view)
    slot: object  # LoraSlot
    cols: slice
    quantiser: str
    holds: object = None  # None: the base weight; a key: those adapters merged; DIRTY: a write that failed

    @property
    def rows(self) -> torch.Tensor:
        return self.linear.weight_t.t()  # (out, in) row-major fp8: the storage the GEMM reads

    @property
    def grouped(self) -> bool:
        """Written by the one-launch kernel (with every other such target) rather than on its own."""
        return self.quantiser.startswith("triton") and self.linear.weight_scale.is_contiguous()

    def add_to(self, launch, adapters, cell: list | None = None) -> None:
        """Its rows to the kernel's launch, one segment per part of the slot with the updates of the adapters that
        reach that part. `adapters`: [(DeviceAdapter, request scale)]; `cell`: a list whose i-th value stands for the
        i-th adapter's request scale wherever the launch reads it (_Scale), so that a recording replays at others."""
        scale, c = self.linear.weight_scale.reshape(-1), self.cols.start or 0
        rows = self.rows
        if cell is not None:
            adapters = [(a, _Scale(cell, i)) for i, (a, _) in enumerate(adapters)]
        for module, offset, size in self.slot.parts:
            if size:
                launch.add(self.source, rows, scale, offset, size,
                           [(t.a, c, t.b, s) for t, s in part_updates(adapters, module)])

    @torch.no_grad()
    def merged(self, adapters) -> torch.Tensor:
        """W + sum s B A over the adapters that reach each part, accumulated in fp32 and rounded once to W's dtype:
        what the kernel computes (up to the GEMMs' summation order)."""
        w = self.source.float()
        for module, offset, size in self.slot.parts:
            if not size:
                continue
            for t, s in part_updates(adapters, module):
                w[offset:offset + size].addmm_(t.b.float(), t.a[:, self.cols].float(), alpha=s)
        return w.to(self.source.dtype)

    @torch.no_grad()
    def write(self, adapters) -> None:
        """On its own (the targets that are not `grouped`): the quantisation of the merge, or of W with none."""
        w = self.merged(adapters) if adapters else self.source.contiguous()
        q, s = QUANTISERS[self.quantiser](w)
        self.rows.copy_(q)
        self.linear.weight_scale.copy_(s.reshape(self.linear.weight_scale.shape))


def write_targets(jobs: list[tuple[Target, list]], grouped_merges: bool = True, arena: torch.Tensor | None = None,
                  record: list | None = None, cell: list | None = None, kernel: dict | None = None) -> bool:
    """Write each (target, adapters) (no adapters: the base weight): the grouped targets in a few launches per rounding,
    the rest one by one; `grouped_merges=False`: those with adapters one by one too (the merge kernel failed its
    check, `merge_kernel_problem`). `arena`, `record`: the launches' (fp8_weight_quant.Launch): the grouped writes'
    steps are appended to `record`; `cell`: Target.add_to's; `kernel`: the way (default: merge_way()). Returns
    whether replaying `record` (and writing the ungrouped ones again) would write the same."""
    from optimizations.kernels.fp8_weight_quant import Launch

    if kernel is None:
        kernel = merge_way()
    replayable = True
    for rounding in ("triton_torchao", "triton_rows"):
        group = [(t, adapters) for t, adapters in jobs if _grouped(t, adapters, grouped_merges)
                 and t.quantiser == rounding]
        if group:
            launch = Launch(group[0][0].source.dtype, group[0][0].source.device, rounding == "triton_torchao",
                            **kernel, arena=arena, record=record)
            for t, adapters in group:
                t.add_to(launch, adapters, cell)
            launch.run()
            replayable = replayable and launch.replayable
    write_ungrouped(jobs, grouped_merges)
    return replayable


def _grouped(t: Target, adapters, grouped_merges: bool) -> bool:
    return t.grouped and (grouped_merges or not adapters)


def write_ungrouped(jobs: list[tuple[Target, list]], grouped_merges: bool) -> None:
    """The jobs that write_targets leaves out of its launches, each written on its own."""
    for t, adapters in jobs:
        if not _grouped(t, adapters, grouped_merges):
            t.write(adapters)


@torch.no_grad()
def merge_kernel_problem(device: torch.device, dtype: torch.dtype) -> str | None:
    """None if the grouped merge (the way merge_way gives) runs here and merges a small weight with one update as
    torch's fp32 sum does (e4m3's rounding aside), else why not: checked at build, before any linear trusts
    it (a restore's kernel is checked by `_matches` on every linear)."""
    from optimizations.kernels.fp8_weight_quant import Segment, merge_weight_rows, quantize_weight_rows

    g = torch.Generator().manual_seed(0)
    w, a, b = ((torch.randn(*shape, generator=g) * std).to(dtype).to(device)
               for shape, std in (((48, 256), 0.02), ((16, 256), 0.1), ((48, 16), 0.05)))
    way = merge_way()
    try:
        rq, rs = quantize_weight_rows(torch.addmm(w.float(), b.float(), a.float(), alpha=0.7).to(dtype), True)
        ref = rq.float() * rs.reshape(-1, 1)
        # zeros, not empty: rows the kernel failed to write read as zero, never as an earlier result left in memory
        q = torch.zeros(48, 256, dtype=torch.float8_e4m3fn, device=device)
        s = torch.zeros(48, dtype=torch.float32, device=device)
        merge_weight_rows([Segment(w, q, s, [(a, b, 0.7)])], True, **way)
        err = ((q.float() * s[:, None] - ref).norm() / ref.norm()).item()
        # NaN fails too; update_rows rounds s B A on its own: about 1% on this weight (0.97% on the CPU), whose
        # update is near W's size, so it gets 2% where the other ways keep 1%
        if not err < (0.02 if way.get("update_rows") else 0.01):
            return f"merged a test weight {err:.3f} away from torch's sum"
    except Exception as exc:  # noqa: BLE001 - a kernel that cannot run here is reported, and the merge goes on without
        return f"{type(exc).__name__}: {exc}"[:300]
    return None


def _matches(linear: Fp8Linear, source: torch.Tensor, quantiser: Quantiser) -> bool:
    try:
        q, s = quantiser(source.contiguous())
    except Exception as exc:  # noqa: BLE001 - a candidate that cannot run here is simply not the one
        log.debug("fp8 merge: a quantiser failed: %s", exc)
        return False
    rows, scale = linear.weight_t.t(), linear.weight_scale
    return q.shape == rows.shape and q.dtype == rows.dtype \
        and torch.equal(q.view(torch.uint8), rows.view(torch.uint8)) \
        and torch.equal(s.reshape(-1).float(), scale.reshape(-1))


def _fp8_linears(wrapper) -> list[Fp8Linear] | str:
    """The fp8 copy's linears of a slot's module (attention columns first for a split proj_out), or why none."""
    from kontext_server.lora.slots import LoraLinear, LoraProjOut

    if wrapper is None:
        return "the modulation table"
    if not isinstance(wrapper, (LoraLinear, LoraProjOut)):
        return f"a {type(wrapper).__name__}"
    base = wrapper.base
    halves = [base.attn, base.mlp] if isinstance(base, SplitProjOut) else [base]
    if not all(isinstance(h, Fp8Linear) for h in halves):
        return "kept in bf16 in the fp8 copy (" + ", ".join(type(h).__name__ for h in halves) + ")"
    return halves


class Fp8Merge(MergedWeights):
    """The targets of one fp8 copy (see the module docstring and merged_weights.py).

    Replays: a change of adapters is hundreds of segments to describe, and with the kernels fast the host's building
    of their tables became most of a switch. So each write is recorded (fp8_weight_quant.Launch's `record`: its
    addmms and its launches, their tables already on the device) and kept in an LRU of PLANS, keyed by what it wrote
    (which targets, with which adapter objects, under which kernel settings); the same write again is a replay of
    those steps. The gemm-first way (the default) reads the request's scales when its addmms run, so a replay serves
    any scales; the tiled kernel's scales are in its tables, so there a new scale is a new plan. The gemm-first
    way's scratch rows go to one arena of the merge's (SCRATCH_BYTES of device memory at most, allocated at its
    first write), so that a replay writes where the recording did.
    A plan holds the adapters' tensors, not the adapters: when a store drops an adapter (its object is collected),
    every plan that used it is dropped at the next write, so its device memory is freed then and a reload with new
    tensors is recorded anew. Adapters that cannot be weakly referenced are never recorded. Contract: the targets'
    tensors (the live model's weights) are not reallocated while the merge lives."""

    PLANS = 8

    def __init__(self, targets: list[Target], kept: dict[str, int], merge_kernel_problem: str | None = None):
        super().__init__(targets, kept)
        self.merge_kernel_problem = merge_kernel_problem  # None, or why merges are written linear by linear
        self.index = {id(t): i for i, t in enumerate(targets)}
        self.plans = AdapterPlans(lambda key: [a for a, _ in key.held])  # key -> (recorded steps, scale cell)
        self.arena: torch.Tensor | None = None
        self.replays = 0

    def _write(self, jobs: list[tuple[Target, list]]) -> None:
        from optimizations.kernels import fp8_weight_quant

        grouped_merges = self.merge_kernel_problem is None
        key, adapters, kernel = self._plan_key(jobs)
        plan = self.plans.lookup(key)
        if plan is not None:
            steps, cell = plan
            if cell is not None:  # this request's scales, where the recorded steps read them (gemm-first)
                cell[:] = [s for _, s in adapters]
            for step in steps:
                step()
            write_ungrouped(jobs, grouped_merges)
            self.replays += 1
            return
        if self.arena is None and kernel["gemm_first"]:
            grouped = [t for t in self.targets if t.grouped]
            if grouped:
                self.arena = fp8_weight_quant.scratch_arena(grouped[0].source.device, sum(
                    t.source.numel() * t.source.element_size() for t in grouped))
        record = [] if key is not None else None  # a write that cannot be recorded builds no steps to replay
        cell = [s for _, s in adapters] if key is not None and key.scale_free else None
        if write_targets(jobs, grouped_merges, self.arena, record, cell, kernel) and key is not None:
            self.plans.keep(key, (record, cell), [a for a, _ in adapters], self.PLANS)

    def _plan_key(self, jobs: list[tuple[Target, list]]) -> tuple[_PlanKey | None, list, dict]:
        """(what a write's plan is keyed by, the request's [(adapter, scale)], the way it is written: merge_way), the
        key None where the write cannot be recorded (an adapter that cannot be weakly referenced; jobs with different
        adapter lists). The gemm-first way reads the scales when it runs (_Scale): its key leaves them out, so a replay
        serves any scales; the tiled kernel's are in its launch tables, so they are part of its key."""
        from optimizations.kernels import fp8_weight_quant as k

        adapters = next((pairs for _, pairs in jobs if pairs), [])
        kernel = merge_way()
        if any(pairs and pairs is not adapters for _, pairs in jobs) \
                or any(not hasattr(type(a), "__weakref__") for a, _ in adapters):
            return None, adapters, kernel
        scale_free = bool(kernel["gemm_first"])
        settings = (repr(kernel), k.VECTOR_ACCESS, k.ONE_PASS_ROWS, k.SCRATCH_BYTES, k.CHUNK_SEGMENTS, k.SEGMENT_ROWS)
        written = tuple((self.index[id(t)], bool(pairs)) for t, pairs in jobs)
        held = tuple((id(a), None if scale_free else s) for a, s in adapters)
        return _PlanKey(settings, scale_free, written, held), adapters, kernel

    @classmethod
    @torch.no_grad()
    def build(cls, exact_wrappers: dict, fp8_wrappers: dict, slots: dict,
              pristine: Callable[[torch.Tensor], torch.Tensor] | None = None) -> "Fp8Merge":
        """Targets for every slot whose fp8 module is an fp8 linear quantised from the exact module's weight by a
        known quantiser (checked bit for bit). `*_wrappers`: slot name -> that variant's wrapper (None: the table).
        `pristine`: an exact weight -> the copy of its base values to quantise from (where the exact tier merges
        adapters into its own weights: exact_merge.py), else the weight itself."""
        targets, kept = [], {}

        def keep(reason: str) -> None:
            kept[reason] = kept.get(reason, 0) + 1

        for group, slot in slots.items():
            linears = _fp8_linears(fp8_wrappers.get(group))
            if isinstance(linears, str):
                keep(linears)
                continue
            sources = exact_weights(exact_wrappers.get(group))
            if sources is None:
                keep("no exact weight to quantise from")
                continue
            if pristine is not None:
                sources = [pristine(w) for w in sources]
            if len(linears) == 2 and len(sources) == 1:  # split fp8 halves of an unsplit exact proj_out
                s = slot.in_split
                sources = [sources[0][:, :s], sources[0][:, s:]]
            if len(linears) != len(sources):
                keep("the two tiers split the module differently")
                continue
            found, offset = [], 0
            for i, (linear, source) in enumerate(zip(linears, sources)):
                cols = slice(offset, offset + source.shape[1]) if len(linears) > 1 else slice(None)
                offset += source.shape[1]
                if source.device != linear.weight_t.device:
                    found = "the exact weight is on another device"
                    break
                name = next((q for q in candidates(source.device) if _matches(linear, source, QUANTISERS[q])), None)
                if name is None:
                    found = "its fp8 weight is not a known quantisation of the exact weight (e.g. stored fp8)"
                    break
                suffix = (".attn", ".mlp")[i] if len(linears) > 1 else ""
                found.append(Target(group + suffix, linear, source, slot, cols, name))
            if isinstance(found, str):
                keep(found)
                continue
            targets += found
        grouped = next((t for t in targets if t.grouped), None)
        problem = merge_kernel_problem(grouped.source.device, grouped.source.dtype) if grouped is not None else None
        if problem:
            log.warning("LoRA fp8 merge: the grouped merge kernel is not used (%s); merges are written linear by "
                        "linear", problem)
        return cls(targets, kept, problem)

    def report(self) -> dict:
        return {**super().report(), "quantisers": dict(collections.Counter(t.quantiser for t in self.targets)),
                "merge_kernel": "grouped" if self.merge_kernel_problem is None else self.merge_kernel_problem,
                "plans": len(self.plans), "replays": self.replays,
                "scratch_mib": round(self.arena.numel() / 2**20, 1) if self.arena is not None else 0}
