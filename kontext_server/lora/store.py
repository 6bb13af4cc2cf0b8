"""Loaded adapters, on the device, in a least-recently-used store of `--max-loras` entries.

What: `get(name)` returns the adapter's matrices on the device in the model's dtype, reading and validating the file
(library.py) the first time, or again when the file changed (size or modification time); it says how long a load
took, which the response reports as `lora_load` (like a cold start: never part of `total`). The least recently used
adapters leave when the store is over its size, except those the current request holds (`pinned`).
Contract: worker thread only (the device's one owner).
"""
from __future__ import annotations

import collections
import time
from dataclasses import dataclass, field

import torch

from kontext_server.lora.library import Library


@dataclass
class DeviceTarget:
    a: torch.Tensor  # (rank, in), the model's dtype, on the device
    b: torch.Tensor  # (out, rank)
    scale: float  # alpha / rank
    # a's rows (a column block of them) quantised to fp8 e4m3 per row, by column range: made by the fp8 copy's
    # appended rows (slots.ScaledRows) the first time this adapter is written, so a switch only copies them
    fp8: dict = field(default_factory=dict)

    @property
    def nbytes(self) -> int:
        cached = sum(q.numel() * q.element_size() + s.numel() * s.element_size() for q, s in self.fp8.values())
        return self.a.numel() * self.a.element_size() + self.b.numel() * self.b.element_size() + cached


@dataclass
class DeviceAdapter:
    name: str
    rank: int
    targets: dict[str, DeviceTarget]
    stamp: tuple
    load_ms: float

    @property
    def nbytes(self) -> int:
        return sum(t.nbytes for t in self.targets.values())


class AdapterStore:
    def __init__(self, library: Library, capacity: int, device: str, dtype: torch.dtype):
        self.library, self.capacity, self.device, self.dtype = library, capacity, device, dtype
        self.loaded: collections.OrderedDict[str, DeviceAdapter] = collections.OrderedDict()
        self.loads = self.evictions = 0

    def _sync(self) -> None:
        if str(self.device).startswith("cuda"):
            torch.cuda.synchronize(self.device)

    def get(self, name: str, pinned: frozenset = frozenset()) -> tuple[DeviceAdapter, float | None]:
        """(the adapter, milliseconds its load took now, or None when it was loaded already). LoraError if the file
        is missing, bad, or does not fit the model."""
        current = self.loaded.get(name)
        if current is not None:
            try:
                fresh = self.library.stamp(name) == current.stamp
            except OSError:
                fresh = False  # removed since: read() says so below
            if fresh:
                self.loaded.move_to_end(name)
                return current, None
        t0 = time.perf_counter()
        adapter = self.library.read(name)
        targets = {m: DeviceTarget(t.a.to(self.device, self.dtype), t.b.to(self.device, self.dtype), t.scale)
                   for m, t in adapter.targets.items()}
        self._sync()
        ms = (time.perf_counter() - t0) * 1000
        self.loaded[name] = DeviceAdapter(name, adapter.rank, targets, adapter.stamp, ms)
        self.loaded.move_to_end(name)
        self.loads += 1
        self._evict(pinned | {name})
        return self.loaded[name], ms

    def _evict(self, pinned: frozenset) -> None:
        for name in list(self.loaded):
            if len(self.loaded) <= self.capacity:
                break
            if name not in pinned:
                del self.loaded[name]
                self.evictions += 1

    @property
    def nbytes(self) -> int:
        return sum(a.nbytes for a in self.loaded.values())
