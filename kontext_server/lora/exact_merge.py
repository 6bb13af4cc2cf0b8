"""The exact tier with the request's adapters merged into its own bf16 weights, restored bit for bit from a copy.

What: at install, every block linear of the exact tier that a slot covers gets a copy of its weight (the base
values). An exact-tier request with adapters writes W = W0 + sum s B A into the live weight (cuBLAS's addmm from the
copy, rounded once to bf16 where there is one adapter; several are stacked into one GEMM with s B in bf16, as the
slots hold them), and the slots it covers run with k = 0: the base model's code, compiled graphs and all, on merged
weights. A later exact request without adapters, or with others, writes the copy back (or merges from it). Why:
the branch beside each GEMM costs every step of every request (BENCHMARKS.md: the fused branch's overhead on the
exact tier); a merge costs a pass over the covered weights once per change of adapters. The fp8 merge quantises
from the same copies (fp8_merge.py's `pristine`), so the two tiers never read each other's merged weights.

Contract: a restore is a copy, so a request without adapters is bit-identical to a server without adapters; the
accounts (what each linear holds, which a change writes) are merged_weights.py's. A weight that any other variant
also uses (its storage reachable from another variant's parameters or buffers) keeps the branch: writing it would
change that variant too. The merged weight differs from the branch's arithmetic by rounding (one bf16 rounding of
W + s B A against the branch's bf16 update added to the output); tools/bench_lora.py reports both against the
same reference.
Limits: the copies cost the covered weights' size again in device memory (about 17 GB for FLUX's block linears in
bf16). `FLUX_LORA_EXACT_MERGE`: "auto" (the default) makes them only on a CUDA device with that much free and
EXACT_MERGE_HEADROOM besides, for the activations; "1" always; "0" never. Without the copies the exact tier runs
the branch.
"""
from __future__ import annotations

from dataclasses import dataclass

import torch

from kontext_server.lora.merged_weights import MergedWeights, exact_weights, part_updates

GIB = 2**30
EXACT_MERGE_HEADROOM = 12 * GIB  # free device memory left after the copies, for a request's activations


@dataclass
class ExactTarget:
    """One exact-tier weight to merge into: the live weight (a view the GEMM reads), its base values, the slot whose
    modules' adapters it takes (`slot.parts`: each module's rows) and which of their input columns it sees."""
    name: str
    weight: torch.Tensor  # (out, in_cols), the live weight
    pristine: torch.Tensor  # (out, in_cols), its base values
    slot: object  # LoraSlot
    cols: slice
    holds: object = None

    @torch.no_grad()
    def write(self, adapters) -> None:
        """W0 + sum s B A per part over the adapters that reach it, or W0 where none does."""
        from optimizations.kernels.fp8_weight_quant import add_low_rank

        for module, offset, size in self.slot.parts:
            if not size:
                continue
            rows, base = self.weight[offset:offset + size], self.pristine[offset:offset + size]
            ups = [(t.a[:, self.cols], t.b, s) for t, s in part_updates(adapters, module)]
            if ups:
                add_low_rank(base, ups, out=rows)
            else:
                rows.copy_(base)


def _storages(variants) -> set[int]:
    """The storages of the variants' parameters and buffers, the LoRA slots' left out (every variant's wrappers hold
    the same slots, whose A may be rows appended under an exact weight: not the weight's own rows)."""
    from kontext_server.lora.slots import LoraSlot

    out, todo = set(), list(variants)
    while todo:
        m = todo.pop()
        if isinstance(m, LoraSlot):  # and what it holds (the exact tier's appended rows, its `home`)
            continue
        out |= {t.untyped_storage().data_ptr() for t in (*m.parameters(recurse=False), *m.buffers(recurse=False))}
        todo += list(m.children())
    return out


def decide(mode: str, nbytes: int, device) -> str | None:
    """None if the copies (nbytes) may be made under `mode` ("auto" | "1" | "0"), else why not."""
    if mode == "0":
        return "off (FLUX_LORA_EXACT_MERGE=0)"
    if mode == "1":
        return None
    device = torch.device(device)
    if device.type != "cuda":
        return "auto: only on a CUDA device (FLUX_LORA_EXACT_MERGE=1 to force it)"
    free, _ = torch.cuda.mem_get_info(device)
    if free < nbytes + EXACT_MERGE_HEADROOM:
        return (f"auto: the copies need {nbytes / GIB:.1f} GiB and {EXACT_MERGE_HEADROOM / GIB:.0f} GiB must stay "
                f"free; {free / GIB:.1f} GiB is free (FLUX_LORA_EXACT_MERGE=1 to force it)")
    return None


class ExactMerge(MergedWeights):
    """The exact tier's targets (see the module docstring); `nbytes`: the copies' size."""

    def __init__(self, targets: list[ExactTarget], kept: dict[str, int]):
        super().__init__(targets, kept)
        self._pristine = {id(t.weight): t.pristine for t in targets}
        self.nbytes = sum(t.pristine.numel() * t.pristine.element_size() for t in targets)

    def _write(self, jobs: list[tuple[ExactTarget, list]]) -> None:
        for t, adapters in jobs:
            t.write(adapters)

    def pristine(self, weight: torch.Tensor) -> torch.Tensor:
        """The base values of a live weight this merge writes (fp8_merge's source), or the weight itself."""
        return self._pristine.get(id(weight), weight)

    @classmethod
    @torch.no_grad()
    def build(cls, exact_wrappers: dict, slots: dict, others: list[torch.nn.Module], mode: str,
              device) -> tuple["ExactMerge | None", str | None]:
        """(the merge, None), or (None, why not). `exact_wrappers`: slot name -> the exact variant's wrapper (None:
        the modulation table); `others`: the other variants, whose weights must not be written."""
        shared = _storages(others)
        found, kept = [], {}

        def keep(reason: str) -> None:
            kept[reason] = kept.get(reason, 0) + 1

        for group, slot in slots.items():
            wrapper = exact_wrappers.get(group)
            weights = exact_weights(wrapper) if wrapper is not None else None
            if weights is None:
                keep("the modulation table" if wrapper is None
                     else f"no plain weight ({type(getattr(wrapper, 'base', wrapper)).__name__})")
                continue
            if any(w.untyped_storage().data_ptr() in shared for w in weights):
                keep("its weight is shared with another variant")
                continue
            offset = 0
            for i, w in enumerate(weights):
                cols = slice(offset, offset + w.shape[1]) if len(weights) > 1 else slice(None)
                offset += w.shape[1]
                found.append((group + ((".attn", ".mlp")[i] if len(weights) > 1 else ""), w, slot, cols))
        nbytes = sum(w.numel() * w.element_size() for _, w, _, _ in found)
        why = decide(mode, nbytes, device) if found else "no exact linear to merge into"
        if why:
            return None, why
        try:
            targets = [ExactTarget(name, w, w.detach().clone(), slot, cols) for name, w, slot, cols in found]
        except torch.OutOfMemoryError:
            return None, f"out of memory for the copies ({nbytes / GIB:.1f} GiB)"
        return cls(targets, kept), None

    def report(self) -> dict:
        return {**super().report(), "copies_gib": round(self.nbytes / GIB, 2)}
