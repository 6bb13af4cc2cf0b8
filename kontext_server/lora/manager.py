"""LoRA adapters for a service: the library, the store, the slots, and what one request does with them.

Start-up (`LoraManager.create`, before any optimisation is prepared): note every linear of the loaded transformer
(the names adapters target), read the directory once (each adapter's rank and targets, or why it cannot run), fix the
slots' rank, fuse `--lora-fuse` into the weights. After the optimisations are prepared (`install`): one slot per
module any adapter targets, its wrapper on every transformer variant; then `--lora-preload`.

Per request (`applied`, worker thread): validate the request's adapters and load what is missing before anything in
the model is touched; copy them into the slots (only the scaled up-projections when the same adapters run again at
other scales); set the active count k and the branch (fused or unfused, slots.py), which are also the request's
`graph_key`; reset the modulation table when the active set changed; and, on the way out, whatever happened, set k
back to 0, so the next request without adapters runs the base model's code.

The branch: `FLUX_LORA_FUSED_BRANCH` (on unless "0") decides at start-up whether the wrapped modules get the slots'
rows appended under their weights (the fused branch, slots.py); `path` is the branch requests run, "fused" where the
rows exist, and `set_path("unfused")` makes later requests run the side branch instead (tools/bench_lora.py times both
in one server; each is compiled and captured once per adapter count).

The merges: with path "merged", a request's adapters are merged into its tier's weights instead: the fp8 copy's
(fp8_merge.py; on unless `FLUX_LORA_FP8_MERGE=0`) or the exact tier's own (exact_merge.py; `FLUX_LORA_EXACT_MERGE`,
where the device has room for a copy of the base weights). The slots a merge covers run with k = 0, the base code,
and are not written (each slot remembers what it holds, so a later request that runs their branch writes them
then); the next request of that tier without the adapters restores the weights first. A tier without a merge, and
the modules a merge does not cover, run the branch ("fused" where the rows exist). `applied(specs, precision)` takes
the request's tier for that.
"""
from __future__ import annotations

import contextlib
import logging
import time
from dataclasses import dataclass, field

import torch

from kontext_server import settings
from kontext_server.lora.batched_writes import SlotWrites
from kontext_server.lora.exact_merge import ExactMerge
from kontext_server.lora.fp8_merge import Fp8Merge
from kontext_server.lora.library import AdapterFused, Library, LoraError, NeedsRestart
from kontext_server.lora.slots import SLOTS, LoraSlot, Placement, is_fused, place, shape_of, wrap
from kontext_server.lora.store import AdapterStore
from kontext_server.lora.switch_plans import SwitchPlans
from optimizations.compiling.cache import switched_off

log = logging.getLogger("flux.lora")


def set_plain(module: torch.nn.Module, **values) -> None:
    """Set attributes the module already holds as plain values (not parameters, buffers or submodules), without
    nn.Module.__setattr__, which checks each value against the module's parameters, buffers and submodules first. A
    request sets a few on every slot before and after it runs (hundreds of slots on FLUX), on the switch's host path.
    Dynamo guards on the values, however they were set. A name the module does not hold plainly is refused."""
    d = module.__dict__
    for name, value in values.items():
        if name not in d:
            raise AttributeError(f"{type(module).__name__} has no plain attribute {name!r}")
        d[name] = value


@dataclass
class Applied:
    """What a request ran: its adapters (name, scale, rank), load and switch milliseconds, its graph key."""
    loras: list[dict] = field(default_factory=list)
    load_ms: float | None = None
    switch_ms: float | None = None
    graph_key: tuple = ()


class LoraConfigError(ValueError):
    """A LoRA start-up setting that cannot be met (--lora-dir, --lora-fuse, --lora-preload): the start stops."""


def parse_fuse(spec: str | None) -> tuple[str, float] | None:
    if not spec:
        return None
    name, _, scale = spec.partition(":")
    try:
        return name.strip(), float(scale) if scale else 1.0
    except ValueError:
        raise LoraConfigError(f"--lora-fuse {spec!r}: expected NAME or NAME:SCALE") from None


def model_linears(transformer: torch.nn.Module) -> dict[str, tuple[int, int]]:
    return {name: (m.in_features, m.out_features) for name, m in transformer.named_modules()
            if isinstance(m, torch.nn.Linear)}


class LoraManager:
    def __init__(self, library: Library, rank: int, capacity: int, device: str, dtype: torch.dtype,
                 fused: tuple[str, float] | None = None):
        self.library, self.rank, self.device, self.dtype = library, rank, device, dtype
        self.store = AdapterStore(library, capacity, device, dtype)
        self.fused = fused
        # The modules some adapter (not the fused one) targets: they get slots at install.
        self.targets = sorted({t for e in library.index.values() if e.error is None and not self._is_fused(e.name)
                               and e.rank <= rank for t in e.targets})
        self.slots: dict[str, LoraSlot] = {}  # group name -> slot
        self.placements: dict[str, Placement] = {}  # model module -> its placement (the exact variant's)
        self.tables: list = []  # the modulation tables of the variants (optimizations.modulation_table.TableState)
        self.table_hooks: list = []  # (ModulationLinear, slot) pairs
        self.installed = False
        self.fuse = not switched_off(settings.LORA_FUSED_BRANCH)  # append rows under the weights at install
        self.path = "fused" if self.fuse else "unfused"
        self.merge: Fp8Merge | None = None  # the fp8 copy's merge (unless FLUX_LORA_FP8_MERGE=0), built at install
        self.exact_merge: ExactMerge | None = None  # the exact tier's (FLUX_LORA_EXACT_MERGE), built at install
        self.exact_merge_off: str | None = "not installed"  # why there is none
        self.wrappers: dict[str, dict] = {}  # precision -> slot name -> that variant's wrapper (None: the table)
        # per variant: how many wrapped modules run the fused branch, and why the others do not
        self.branches: dict[str, dict] = {}
        # slot name -> ((name, file stamp) per slot index, scales) it holds; None or absent: unknown
        self._held: dict[str, tuple | None] = {}
        self._active: tuple = ()  # what the tables were last filled with
        self.switches = 0
        self.plans = SwitchPlans(device)  # recorded switches, replayed when the same adapters come back
        self.last_switch_ms: float | None = None

    # ---- start-up ----------------------------------------------------------------------------------------------------
    @classmethod
    def create(cls, config, transformer: torch.nn.Module, device: str) -> "LoraManager":
        """Scan --lora-dir against the transformer as loaded, and fuse --lora-fuse into it (before any optimisation)."""
        library = Library(config.lora_dir, model_linears(transformer))
        if not config.lora_dir.is_dir():
            raise LoraConfigError(f"--lora-dir {config.lora_dir}: not a directory")
        fused = parse_fuse(config.lora_fuse)
        library.scan()
        valid = [e for e in library.index.values() if e.error is None and (fused is None or e.name != fused[0])]
        rank = config.lora_max_rank or max((e.rank for e in valid), default=0)
        library.max_rank = rank if config.lora_max_rank else None
        dtype = next(transformer.parameters()).dtype
        manager = cls(library, rank, config.max_loras, device, dtype, fused)
        if fused is not None:
            manager._fuse(transformer, *fused)
        library.max_rank = rank  # from now on a larger adapter (a file added later) cannot fit the slots
        return manager

    def _is_fused(self, name: str) -> bool:
        return self.fused is not None and name == self.fused[0]

    @torch.no_grad()
    def _fuse(self, transformer: torch.nn.Module, name: str, scale: float) -> None:
        if name not in self.library.index:
            raise LoraConfigError(f"--lora-fuse {name!r}: no such adapter in {self.library.directory}")
        try:
            adapter = self.library.read(name, check_rank=False)
        except LoraError as exc:
            raise LoraConfigError(f"--lora-fuse: {exc}") from None
        for module, t in adapter.targets.items():
            linear = transformer.get_submodule(module)
            w = linear.weight
            update = (t.b.to(w.device) @ t.a.to(w.device)) * (scale * t.scale)
            w.copy_((w.float() + update).to(w.dtype))
        log.info("LoRA %s fused into the weights at scale %s (%d modules)", name, scale, len(adapter.targets))

    def saved_regions_blocked(self) -> str | None:
        """Why compiled blocks cannot be saved whole while slots exist (optimizations/compiling/aot_regions.py)."""
        if not self.targets:
            return None
        return ("LoRA slots: a saved region checks its guards once per block and input signature, so it would go on "
                "running the code traced for one active adapter count; dynamo compiles the blocks in place and "
                "guards on the count")

    def install(self, variants: dict) -> None:
        """One slot per targeted module, its wrapper on every variant (after all optimisations are prepared)."""
        from optimizations.modulation_table import ModulationLinear, table_state

        for module in self.targets:
            for precision, variant in variants.items():
                try:
                    p = place(variant, module)
                    shape = shape_of(variant, p)
                except LookupError as exc:
                    raise RuntimeError(f"LoRA slots, {precision} transformer: {exc}") from None
                slot = self.slots.get(p.group)
                if slot is None:
                    in_split = shape[1] if p.kind == "proj_out" else None
                    parts = [("", 0, 0)] * p.parts
                    slot = self.slots[p.group] = LoraSlot(p.group, parts, shape[0], shape[1], self.rank, in_split,
                                                          self.dtype, self.device)
                if (slot.in_features, slot.out_features, len(slot.parts)) != (*shape, p.parts):
                    raise RuntimeError(f"LoRA slots: {p.group} differs between the transformer variants")
                out = shape[1] // p.parts
                slot.parts[p.part] = (module, p.part * out, out)
                wrapper = wrap(variant, p, slot, fuse=self.fuse)
                self._count_branch(precision, p.group, wrapper)
                self.wrappers.setdefault(precision, {})[p.group] = wrapper
                if p.kind == "table":
                    self.table_hooks.append((variant.get_submodule(p.path), slot))
                self.placements.setdefault(module, p)
        for variant in variants.values():
            state = table_state(variant)
            if state is not None and all(state is not s for s in self.tables):
                self.tables.append(state)
        for m, _ in self.table_hooks:
            assert isinstance(m, ModulationLinear)
        if "exact" in self.wrappers:
            self.exact_merge, self.exact_merge_off = ExactMerge.build(
                self.wrappers["exact"], self.slots, [v for p, v in variants.items() if p != "exact"],
                settings.LORA_EXACT_MERGE.get(), self.device)
            log.info("LoRA exact merge: %s", self.exact_merge.report() if self.exact_merge else self.exact_merge_off)
        if not settings.LORA_FP8_MERGE.off() and "fp8" in self.wrappers and "exact" in self.wrappers:
            self.merge = Fp8Merge.build(self.wrappers["exact"], self.wrappers["fp8"], self.slots,
                                        self.exact_merge.pristine if self.exact_merge else None)
            log.info("LoRA fp8 merge: %s", self.merge.report())
        if self.merge is not None or self.exact_merge is not None:
            self.path = "merged"
        self.installed = True

    def _count_branch(self, precision: str, group: str, wrapper) -> None:
        seen = self.branches.setdefault(precision, {"fused": 0, "unfused": {}, "_groups": set()})
        if group in seen["_groups"]:  # a fused q/k/v slot is reached from each of its parts
            return
        seen["_groups"].add(group)
        if wrapper is not None and is_fused(wrapper):
            seen["fused"] += 1
        else:
            reason = "the modulation table" if wrapper is None else (wrapper.unfused_reason or "?")
            seen["unfused"][reason] = seen["unfused"].get(reason, 0) + 1

    def set_path(self, path: str) -> None:
        """The branch the next requests run: "fused" (where the modules have appended rows), "unfused" (the side
        branch everywhere) or "merged" (requests of a tier with a merge merge, the rest as "fused" where it can).
        Worker thread, between requests."""
        if path not in ("fused", "unfused", "merged"):
            raise ValueError(f"LoRA path must be 'fused', 'unfused' or 'merged', not {path!r}")
        if path == "fused" and not self.fuse:
            raise ValueError("the fused LoRA branch is off (FLUX_LORA_FUSED_BRANCH=0): no rows were appended")
        if path == "merged" and self.merge is None and self.exact_merge is None:
            raise ValueError("no merge is on (FLUX_LORA_FP8_MERGE=0 or no fp8 tier; the exact merge: "
                             f"{self.exact_merge_off})")
        self.path = path

    def merge_for(self, precision: str):
        """The merge of a tier ("exact" or "fp8"), or None where it has none."""
        return {"fp8": self.merge, "exact": self.exact_merge}.get(precision)

    @property
    def branch(self) -> str:
        """The branch of the modules that run one: "fused" or "unfused"."""
        return "unfused" if self.path == "unfused" or not self.fuse else "fused"

    def preload(self, names: list[str]) -> None:
        for name in names:
            try:
                self._load(name, frozenset(names))
            except LoraError as exc:
                raise LoraConfigError(f"--lora-preload: {exc}") from None

    # ---- per request -------------------------------------------------------------------------------------------------
    def check(self, specs) -> None:
        """Before the request is queued (event loop): names known, files not found bad at start-up, not the fused one.
        Raises the first adapter's LoraError with `index` set (its position in `loras`)."""
        for i, spec in enumerate(specs):
            try:
                if self._is_fused(spec.name):
                    raise AdapterFused(spec.name, "it is fused into the weights at start-up (--lora-fuse): every "
                                                  "request runs it already")
                self.library.lookup(spec.name)
            except LoraError as exc:
                exc.index = i
                raise

    def _load(self, name: str, pinned: frozenset):
        adapter, ms = self.store.get(name, pinned)
        self.plans.drop_collected()  # an adapter the store let go of: its plans' hold on its memory goes now
        missing = [m for m in adapter.targets if m not in self.placements]
        if missing:
            raise NeedsRestart(name, f"it targets {len(missing)} module(s) no adapter had when the server started "
                                     f"(e.g. {missing[0]}): a restart makes slots for them")
        return adapter, ms

    @contextlib.contextmanager
    def applied(self, specs, precision: str = "exact"):
        """Run the request's adapters for the duration of the context (see the module docstring). `precision`: the
        transformer variant the request runs ("exact" or "fp8")."""
        merge = self.merge_for(precision)
        merging = merge is not None and self.path == "merged"
        if not specs:
            self._activate_tables(())
            yield Applied(switch_ms=self._restore(merge) if merge is not None else None)
            return
        if len(specs) > SLOTS:
            raise ValueError(f"at most {SLOTS} adapters per request")
        self.check(specs)
        if not self.installed:  # no slot at all: every adapter known at start-up was bad or fused
            err = NeedsRestart(specs[0].name, "the server started without any usable adapter, so it has no slots: "
                                              "a restart makes them")
            err.index = 0
            raise err
        pinned = frozenset(s.name for s in specs)
        adapters, load_ms = [], None
        for i, spec in enumerate(specs):
            try:
                adapter, ms = self._load(spec.name, pinned)
            except LoraError as exc:
                exc.index = i
                raise
            adapters.append(adapter)
            if ms is not None:
                load_ms = (load_ms or 0.0) + ms
        # Only now is the model touched.
        k = len(specs)
        try:
            t0 = time.perf_counter()
            scales = [s.scale for s in specs]
            active = tuple((a.name, a.stamp, s) for a, s in zip(adapters, scales))
            if merging:  # the merged modules take the adapters from the store: only the others' slots are written
                switched = self._write(adapters, scales, [n for n in self.slots if n not in merge.merged_slots])
                switched = merge.apply(active, list(zip(adapters, scales))) or switched
            else:
                switched = self._write(adapters, scales, list(self.slots))
                if merge is not None:
                    switched = merge.restore() or switched
            fused = self.branch == "fused"
            for name, slot in self.slots.items():
                set_plain(slot, k=0 if merging and name in merge.merged_slots else k, fused=fused)
            self._activate_tables(active)
            if switched:
                if str(self.device).startswith("cuda"):
                    torch.cuda.synchronize(self.device)
                self.last_switch_ms = (time.perf_counter() - t0) * 1000
            report = [{"name": a.name, "scale": s.scale, "rank": a.rank} for a, s in zip(adapters, specs)]
            yield Applied(report, load_ms, self.last_switch_ms if switched else None,
                          self._graph_key(k, merging, precision))
        finally:
            for slot in self.slots.values():
                set_plain(slot, k=0)
            for m, _ in self.table_hooks:
                set_plain(m, table_branch=None)

    def _restore(self, merge) -> float | None:
        """A tier's base weights back before its request without adapters; the milliseconds, or None if they were
        there."""
        t0 = time.perf_counter()
        if not merge.restore():
            return None
        if str(self.device).startswith("cuda"):
            torch.cuda.synchronize(self.device)
        self.last_switch_ms = (time.perf_counter() - t0) * 1000
        return self.last_switch_ms

    def _graph_key(self, k: int, merging: bool, precision: str) -> tuple:
        """What the request's compiled code and captured graphs depend on: the active count and branch. A merged
        request whose slots with k > 0 are all the modulation table's (filled on the host, before the compiled
        blocks) runs the base code on the merged weights: the base graphs."""
        if merging:
            wrappers = self.wrappers.get(precision, {})
            return (("lora", k, "merged"),) if any(s.k and wrappers.get(n) is not None
                                                   for n, s in self.slots.items()) else ()
        return (("lora", k, self.branch),)

    def _write(self, adapters, scales, names: list[str]) -> bool:
        """Put the adapters in the named slots (those that do not hold them at these scales); returns whether
        anything was written. The same switch as one before, at any scales, replays its recorded writes
        (switch_plans.py)."""
        held = (tuple((a.name, a.stamp) for a in adapters), tuple(scales))
        changed = []  # (slot name, whether its weights change or only its scales)
        for name in names:
            before = self._held.get(name)
            if before != held:
                changed.append((name, before is None or before[0] != held[0]))
        if not changed:
            return False
        for name, _ in changed:
            self._held[name] = None  # unknown until the writes are issued (an error half-way leaves it so)
        key = self.plans.key(adapters, held[0], changed)
        if not self.plans.replay(key, held[1]):
            writes = SlotWrites()
            for name, weights in changed:
                for i, (adapter, scale) in enumerate(zip(adapters, scales)):
                    self.slots[name].write(i, adapter.targets, scale, weights=weights, writes=writes)
            self.plans.record(key, writes, adapters, held[1])  # every slot's writes at once: a switch is host-bound
        for name, _ in changed:
            self._held[name] = held
        self.switches += 1
        return True

    def _activate_tables(self, active: tuple) -> None:
        """The modulation table's rows hold the modulation of the adapters they were filled with: refill on change."""
        for m, slot in self.table_hooks:
            set_plain(m, table_branch=slot.table_delta if active else None)
        if active != self._active:
            for state in self.tables:
                state.reset()
            self._active = active

    # ---- /health -----------------------------------------------------------------------------------------------------
    def library_report(self) -> dict[str, dict]:
        """/health's `lora.library`: each adapter start-up found, with its rank and target count, or why it cannot
        run, or `fused` (library.selectable() reads it, here and on a Ray Serve ingress from a replica's report)."""
        def entry(e) -> dict:
            if e.error is not None:
                return {"error": e.error.reason}
            out = {"rank": e.rank, "targets": len(e.targets)}
            if self._is_fused(e.name):
                out["fused"] = True
            elif e.rank > self.rank:
                out["error"] = f"rank {e.rank} is larger than the slots' rank {self.rank} (--lora-max-rank)"
            return out

        return {name: entry(e) for name, e in sorted(self.library.index.items())}

    def health(self) -> dict:
        slot_bytes = sum(s.nbytes for s in self.slots.values())
        info = {
            "directory": str(self.library.directory),
            "library": self.library_report(),
            "loaded": {name: {"rank": a.rank, "load_ms": round(a.load_ms, 1), "mib": round(a.nbytes / 2**20, 2)}
                       for name, a in self.store.loaded.items()},
            "max_loras": self.store.capacity,
            "slots": {"adapters_per_request": SLOTS, "rank": self.rank, "modules": len(self.slots),
                      "targets": len(self.targets), "mib": round(slot_bytes / 2**20, 2)},
            "branch": {"path": self.path, "variants": {
                precision: {"fused_modules": b["fused"], "unfused_modules": dict(b["unfused"])}
                for precision, b in self.branches.items()},
                "fp8_merge": self.merge.report() if self.merge is not None else None,
                "exact_merge": self.exact_merge.report() if self.exact_merge is not None
                else {"off": self.exact_merge_off}},
            "loaded_mib": round(self.store.nbytes / 2**20, 2),
            "loads": self.store.loads, "evictions": self.store.evictions, "switches": self.switches,
            "switch_plans": self.plans.report(),
            "compile": "blocks compiled by dynamo in place (one graph per active adapter count and branch)"
            if self.targets else "no slots",
        }
        if self.fused is not None:
            info["fused"] = {"name": self.fused[0], "scale": self.fused[1]}
        return info

