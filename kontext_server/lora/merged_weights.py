"""Adapters merged into a transformer variant's weights: the accounts both merges keep (fp8_merge.py, exact_merge.py).

What: a set of targets (linears a merge may write, each with the slot whose modules' adapters it takes), each
remembering what its weights hold: None (the base weights), a key (those adapters at those scales) or DIRTY (a
write that failed half-way). `apply(key, adapters)` makes the variant hold the adapters: the targets they reach
merged, the others their base weights, writing only the targets that hold something else; `restore()` gives the
base weights back, bit for bit. Why: a request's adapters merged into the weights cost nothing per step, where a
branch beside each GEMM costs every step; a merge is paid once per change of adapters.
Contract: a subclass writes a list of (target, adapters) in `_write` (no adapters: the base weights); a target is
DIRTY from before its write is issued until it is done, so an error leaves it to be written again by the next
request. Limits: not thread-safe (requests run one at a time on the worker thread); one set of adapters at a time.
"""
from __future__ import annotations

import time

import torch

DIRTY = "dirty"


def exact_weights(wrapper) -> list[torch.Tensor] | None:
    """The exact tier's weights a slot's module computes with: one (out, in), or the two halves of a split proj_out
    (attention columns first)."""
    from kontext_server.lora.slots import LoraGeluOutput, LoraLinear, LoraProjOut
    from optimizations.fusions.split_proj_out import SplitProjOut

    if isinstance(wrapper, LoraGeluOutput):
        return [(wrapper.base.proj if wrapper.via_proj else wrapper.base).weight]
    if isinstance(wrapper, (LoraLinear, LoraProjOut)):
        base = wrapper.base
        if isinstance(base, SplitProjOut):
            return [base.attn.weight, base.mlp.weight]
        if isinstance(base, torch.nn.Linear):
            return [base.weight]
    return None


def part_updates(adapters, module: str) -> list:
    """The updates of `adapters` ([(DeviceAdapter, request scale)]) for one module: [(DeviceTarget, its scale: the
    request's times the adapter's own)], in the adapters' order."""
    return [(t, s * t.scale) for a, s in adapters if (t := a.targets.get(module)) is not None]


def reaches(slot, adapters) -> bool:
    """Whether any of `adapters` ([(DeviceAdapter, scale)]) has an update for a module of the slot."""
    return any(m in a.targets for a, _ in adapters for m, _, size in slot.parts if size)


class MergedWeights:
    """The targets of one variant (see the module docstring); `kept`: what keeps the branch, by reason (a count).
    `merged_slots`: the slots whose every module of the variant is a target (a merged request runs them with
    k = 0)."""

    def __init__(self, targets: list, kept: dict[str, int]):
        self.targets, self.kept = targets, kept
        self.merged_slots = {t.slot.name for t in targets}
        self.state: object = None  # None: the base weights; a key; DIRTY: a write failed half-way
        self.merges = self.restores = 0
        self.last_written = 0  # linears written by the last merge or restore
        self.last_issue_ms = 0.0  # the host's time to issue those writes (the GPU's may run on after it)

    def _write(self, jobs: list[tuple[object, list]]) -> None:
        raise NotImplementedError

    @torch.no_grad()
    def _hold(self, wanted: list[tuple[object, object, list]]) -> int:
        """Make each (target, key, adapters) hold its key, writing only those that do not; how many were written."""
        jobs = [(t, key, adapters) for t, key, adapters in wanted if t.holds != key]
        for t, _, _ in jobs:
            t.holds = DIRTY
        t0 = time.perf_counter()
        self._write([(t, adapters) for t, _, adapters in jobs])
        self.last_issue_ms = (time.perf_counter() - t0) * 1000
        for t, key, _ in jobs:
            t.holds = key
        return len(jobs)

    def apply(self, key, adapters: list) -> bool:
        """Hold `adapters` ([(DeviceAdapter, request scale)], named by `key`): the targets they reach merged, the
        others their base weights. Returns whether anything was written."""
        if key == self.state:
            return False
        self.state = DIRTY
        self.last_written = self._hold([(t, key, adapters) if reaches(t.slot, adapters) else (t, None, [])
                                        for t in self.targets])
        self.state = key
        self.merges += 1
        return True

    def restore(self) -> bool:
        """The base weights back, bit for bit; returns whether anything was written."""
        if self.state is None:
            return False
        self.state = DIRTY
        self.last_written = self._hold([(t, None, []) for t in self.targets])
        self.state = None
        self.restores += 1
        return True

    def report(self) -> dict:
        return {"modules": len(self.merged_slots), "linears": len(self.targets), "kept_on_branch": dict(self.kept),
                "holds": "base" if self.state is None else ("unknown" if self.state == DIRTY else "adapters"),
                "merges": self.merges, "restores": self.restores, "last_written": self.last_written,
                "last_issue_ms": round(self.last_issue_ms, 2)}
