"""An LRU of recorded plans that hold adapters' tensors, each dropped once one of its adapters is collected.

Why: two writers replay what they recorded when the same adapters come back (fp8_merge.py's merge writes, and
switch_plans.py's slot writes). A plan holds views of the adapters' tensors, not the adapters, so it must go when
the store lets an adapter go: otherwise it would keep that adapter's device memory, and a new adapter could get the
collected one's id and replay the old plan.

Contract: a dict (key -> plan, least recently used first). `lookup` and `drop_collected` run on the worker's thread;
`keep` watches the plan's adapters with a finalizer, which only notes the id (it runs on whichever thread dropped the
last reference), and the next `lookup` or `drop_collected` drops every plan whose key names that id, before anything
is looked up. `adapter_ids(key)`: the ids of the adapters a key's plan holds. Adapters must be weakly referenceable
(the owners leave the others unrecorded).
"""
from __future__ import annotations

import collections
import weakref
from typing import Callable, Iterable


class AdapterPlans(collections.OrderedDict):
    def __init__(self, adapter_ids: Callable[[object], Iterable[int]]):
        super().__init__()
        self.adapter_ids = adapter_ids
        self.watched: set[int] = set()  # ids of the adapters whose collection drops their plans
        self.collected: collections.deque[int] = collections.deque()  # ids of those collected since the last drop

    def lookup(self, key):
        """The plan recorded under `key` (now the most recently used), or None; None `key`: none, after the drop."""
        self.drop_collected()  # before any lookup: a collected adapter's id may be a new adapter's now
        plan = self.get(key) if key is not None else None
        if plan is not None:
            self.move_to_end(key)
        return plan

    def keep(self, key, plan, adapters: Iterable, capacity: int) -> None:
        """Keep `plan` under `key`, watching `adapters` (the objects whose tensors it holds); beyond `capacity` the
        least recently used go."""
        self[key] = plan
        for a in adapters:
            if id(a) not in self.watched:
                self.watched.add(id(a))
                weakref.finalize(a, self.collected.append, id(a))
        while len(self) > capacity:
            self.popitem(last=False)

    def drop_collected(self) -> None:
        """Drop the plans of the adapters collected since the last call."""
        while self.collected:
            adapter_id = self.collected.popleft()
            self.watched.discard(adapter_id)
            for key in [k for k in self if adapter_id in self.adapter_ids(k)]:
                del self[key]
