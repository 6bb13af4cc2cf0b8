"""The tensor writes of an adapter switch, gathered over every slot and issued together.

Why: a switch writes a few small blocks per targeted module (zero a slot's B columns, copy A's rows and their mirrors,
copy and scale B's), hundreds over FLUX's blocks, and it is bound by the host: one Python op per write costs a call
and a dispatch each. torch's foreach ops take each kind of write as one list in one call.

Contract: `zero`, `copy` and `scaled_copy` only record (the views must stay valid until `run`); `run(scales)` issues
every zero, then every copy, then every scaled copy, in that order, on the current stream. A scaled copy names the
request's adapter it belongs to and its own factor, and takes that adapter's scale when issued, so recorded writes
can be issued again at other scales (switch_plans.py). Writes of one kind must not overlap each other (a slot's blocks
never do); a zeroed block may be overwritten by the others. The zeros and copies go as two foreach ops; each scaled
copy stays one torch.mul(src, s, out=dst): torch's foreach multiply by a list of Python scalars does not compute as
torch.mul does on every backend (on the CPU, in bf16, its values differ), and B must hold exactly the scaled
up-projection. `FOREACH = False` issues the zeros and copies one op each instead (tools compare the two in one run).
"""
from __future__ import annotations

import torch

FOREACH = True


class SlotWrites:
    """Writes recorded by LoraSlot.write (and its mirrors' `put`) for one switch; `run` issues them."""

    def __init__(self):
        self.zeros: list[torch.Tensor] = []
        self.dst: list[torch.Tensor] = []
        self.src: list[torch.Tensor] = []
        self.scaled: list[tuple[torch.Tensor, torch.Tensor, int, float]] = []

    def __len__(self) -> int:
        return len(self.zeros) + len(self.dst) + len(self.scaled)

    def zero(self, t: torch.Tensor) -> None:
        self.zeros.append(t)

    def copy(self, dst: torch.Tensor, src: torch.Tensor) -> None:
        _same_shape(dst, src)
        self.dst.append(dst)
        self.src.append(src)

    def scaled_copy(self, dst: torch.Tensor, src: torch.Tensor, adapter: int, factor: float) -> None:
        """dst = src * (scales[adapter] * factor), with the scales `run` is given."""
        _same_shape(dst, src)
        self.scaled.append((dst, src, adapter, float(factor)))

    @torch.no_grad()
    def run(self, scales=(), keep: bool = False) -> None:
        """Issue everything recorded, the scaled copies at `scales` (indexed by each copy's adapter), then forget it
        (`keep`: hold it, to be issued again, at any scales: switch_plans.py)."""
        if FOREACH:
            if self.zeros:
                torch._foreach_zero_(self.zeros)
            if self.dst:
                torch._foreach_copy_(self.dst, self.src)
        else:
            for t in self.zeros:
                t.zero_()
            for d, s in zip(self.dst, self.src):
                d.copy_(s)
        for d, s, adapter, factor in self.scaled:
            torch.mul(s, scales[adapter] * factor, out=d)
        if not keep:
            self.__init__()


def _same_shape(dst: torch.Tensor, src: torch.Tensor) -> None:
    """Refused when recorded, not when issued (when other slots' writes would already be gone with it)."""
    if dst.shape != src.shape:
        raise ValueError(f"a copy of {tuple(src.shape)} into {tuple(dst.shape)}")
