"""Recorded slot writes: a switch to adapters the slots held before replays the writes recorded then, at any scales.

Why: a switch writes a few small blocks into every slot (batched_writes.py), and on FLUX's hundreds of slots it is
bound by the host: first the Python that finds each block (LoraSlot.write and its mirrors' `put`), then the launches.
A plan keeps the first switch's recorded writes (the views, and for each scaled copy its adapter and factor), so the
same switch again, at the same or other scales, only issues them. With `FLUX_LORA_SWITCH_GRAPHS=1` on a GPU, the
writes at a set of scales are also captured into a CUDA graph after their first run there (the scales are baked into
a graph: up to `GRAPHS` sets a plan), and a replay at those scales is one launch instead of one per block.

Contract: a plan is keyed by everything its writes depend on but the scales: the adapters (their objects, names and
stamps), and which slots are written with which of their parts (weights and scales, or the scales only). A replay
issues exactly the recorded ops at the request's scales, so the slots end bit for bit as a fresh write at those scales
leaves them. A plan holds its adapters' tensors: it is dropped once the store lets go of one of its adapters
(adapter_plans.py; the manager's next load or switch drops it), and the least recently used go beyond `PLANS`.
Limits: an adapter that cannot be weakly referenced is never recorded (written afresh each time).
"""
from __future__ import annotations

import logging
from collections import OrderedDict

import torch

from kontext_server import settings
from kontext_server.lora.adapter_plans import AdapterPlans
from kontext_server.lora.batched_writes import SlotWrites

PLANS = 32
GRAPHS = 4  # captured scale sets per plan
log = logging.getLogger("flux.lora")


class Plan:
    """One switch's recorded writes, and their CUDA graphs once captured (scales -> graph, least recent first)."""

    def __init__(self, writes: SlotWrites):
        self.writes, self.graphs = writes, OrderedDict()

    def replay(self, scales: tuple) -> bool:
        """Issue the writes at `scales`; whether that was a captured graph."""
        graph = self.graphs.get(scales)
        if graph is None:
            self.writes.run(scales, keep=True)
            return False
        self.graphs.move_to_end(scales)
        graph.replay()
        return True

    def capture(self, scales: tuple, device) -> None:
        """The writes at `scales` as a CUDA graph (they ran once already: nothing is initialised lazily inside the
        capture). The writes allocate nothing, so the graph's memory pool stays empty."""
        graph = torch.cuda.CUDAGraph()
        torch.cuda.synchronize(device)
        with torch.cuda.device(device), torch.cuda.graph(graph):
            self.writes.run(scales, keep=True)
        self.graphs[scales] = graph
        while len(self.graphs) > GRAPHS:
            self.graphs.popitem(last=False)


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
        """What a switch's writes depend on (`held`: the adapters' names and stamps, not the scales), or None where
        they cannot be recorded."""
        if any(not hasattr(type(a), "__weakref__") for a in adapters):
            return None
        return tuple(id(a) for a in adapters), held, tuple(changed)

    def replay(self, key: tuple | None, scales: tuple) -> bool:
        """Issue the plan recorded under `key` at `scales`; False where there is none (the caller writes afresh and
        `record`s)."""
        plan = self.plans.lookup(key if self.enabled else None)
        if plan is None:
            return False
        if not plan.replay(scales) and self.graphs:
            self._capture(plan, scales)
        self.replays += 1
        return True

    def record(self, key: tuple | None, writes: SlotWrites, adapters: list, scales: tuple) -> None:
        """Issue a fresh switch's writes at `scales` and keep them under `key` (None: issue only)."""
        if key is None or not self.enabled:
            writes.run(scales)
            return
        writes.run(scales, keep=True)
        plan = Plan(writes)
        if self.graphs:
            self._capture(plan, scales)
        self.plans.keep(key, plan, adapters, PLANS)
        self.recorded += 1

    def _capture(self, plan: Plan, scales: tuple) -> None:
        try:
            plan.capture(scales, self.device)
        except Exception as exc:  # noqa: BLE001 - the writes ran already: the switch stands without a graph
            log.warning("LoRA switch graphs off: capturing a switch's writes failed: %s: %s", type(exc).__name__, exc)
            self.graphs = False

    def drop_collected(self) -> None:
        """Drop the plans of adapters collected since (the manager calls it after each load: an evicted adapter's
        memory is freed before the request's next load)."""
        self.plans.drop_collected()

    def report(self) -> dict:
        return {"plans": len(self.plans), "recorded": self.recorded, "replays": self.replays,
                "cuda_graphs": self.graphs, "enabled": self.enabled}
