"""Recorded slot writes: a switch to adapters the slots held before replays the writes recorded then.

Why: a switch writes a few small blocks into every slot (batched_writes.py), and on FLUX's hundreds of slots it is
bound by the host: first the Python that finds each block (LoraSlot.write and its mirrors' `put`), then the launches.
A plan keeps the first switch's recorded writes (the views, the scales), so the same switch again only issues them.
With `FLUX_LORA_SWITCH_GRAPHS=1` on a GPU, the writes are also captured into a CUDA graph after their first run, and
a replay is one launch instead of one per block (off by default: not yet measured on a GPU).

Contract: a plan is keyed by everything its writes depend on: the adapters (their objects, names and stamps), the
request's scales, and which slots are written with which of their parts (weights and scales, or the scales only). A
replay issues exactly the recorded ops, so the slots end bit for bit as a fresh write leaves them. A plan holds its
adapters' tensors: it is dropped once the store lets go of one of its adapters (adapter_plans.py; the manager's
next load or switch drops it), and the least recently used go beyond `PLANS`.
Limits: an adapter that cannot be weakly referenced is never recorded (written afresh each time).
"""
from __future__ import annotations

import logging

import torch

from kontext_server import settings
from kontext_server.lora.adapter_plans import AdapterPlans
from kontext_server.lora.batched_writes import SlotWrites

PLANS = 32
log = logging.getLogger("flux.lora")


class Plan:
    """One switch's recorded writes, and their CUDA graph once captured."""

    def __init__(self, writes: SlotWrites):
        self.writes, self.graph = writes, None

    def replay(self) -> None:
        if self.graph is not None:
            self.graph.replay()
        else:
            self.writes.run(keep=True)

    def capture(self, device) -> None:
        """The writes as a CUDA graph (they ran once already: nothing is initialised lazily inside the capture). The
        writes allocate nothing, so the graph's memory pool stays empty."""
        graph = torch.cuda.CUDAGraph()
        torch.cuda.synchronize(device)
        with torch.cuda.device(device), torch.cuda.graph(graph):
            self.writes.run(keep=True)
        self.graph = graph


class SwitchPlans:
    """The recorded switches of one LoraManager (its worker thread only)."""

    def __init__(self, device):
        self.device = device
        self.graphs = str(device).startswith("cuda") and not settings.LORA_SWITCH_GRAPHS.off()
        self.plans = AdapterPlans(lambda key: key[0])  # key -> Plan; key[0]: the adapters' ids
        self.recorded = self.replays = 0
        self.enabled = True  # False: every switch writes afresh (tools compare the two in one server)

    @staticmethod
    def key(adapters: list, held: tuple, changed: list[tuple[str, bool]]) -> tuple | None:
        """What a switch's writes depend on, or None where they cannot be recorded."""
        if any(not hasattr(type(a), "__weakref__") for a in adapters):
            return None
        return tuple(id(a) for a in adapters), held, tuple(changed)

    def replay(self, key: tuple | None) -> bool:
        """Issue the plan recorded under `key`; False where there is none (the caller writes afresh and `record`s)."""
        plan = self.plans.lookup(key if self.enabled else None)
        if plan is None:
            return False
        plan.replay()
        self.replays += 1
        return True

    def record(self, key: tuple | None, writes: SlotWrites, adapters: list) -> None:
        """Issue a fresh switch's writes and keep them under `key` (None: issue only)."""
        if key is None or not self.enabled:
            writes.run()
            return
        writes.run(keep=True)
        plan = Plan(writes)
        if self.graphs:
            try:
                plan.capture(self.device)
            except Exception as exc:  # noqa: BLE001 - the writes ran already: the switch stands without a graph
                log.warning("LoRA switch graphs off: capturing a switch's writes failed: %s: %s",
                            type(exc).__name__, exc)
                self.graphs = False
        self.plans.keep(key, plan, adapters, PLANS)
        self.recorded += 1

    def drop_collected(self) -> None:
        """Drop the plans of adapters collected since (the manager calls it after each load: an evicted adapter's
        memory is freed before the request's next load)."""
        self.plans.drop_collected()

    def report(self) -> dict:
        return {"plans": len(self.plans), "recorded": self.recorded, "replays": self.replays,
                "cuda_graphs": self.graphs, "enabled": self.enabled}
