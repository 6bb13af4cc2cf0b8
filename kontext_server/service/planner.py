"""Planning: what a request gets from each optimisation, decided before it is queued.

What: `plan()` turns a request's flags into one `Decision` per registry entry (requested / applied / why), from the
registry, what the server prepared, and the combination rules the optimisations declare (`Optimization.conflicts`).
Why before the queue: a `strict` request that cannot get what it asked for is a 422 at once, not a worker failure.
Contract: a pure function of its arguments. It reads no service state, so it is safe on the event loop while the
worker runs; the one piece of run-time state it needs (is this shape compiled yet?) comes in as `unwarmed_shape`.
Under a memory budget, `offloaded` names the transformer variants streamed in from the host (memory_tiers.py): an
optimisation that declares an `offload_conflict` is not applied to a request that runs one of them, with its reason.
"""
from __future__ import annotations

from typing import Callable, Mapping

from kontext_server.service.memory_tiers import variant_component
from optimizations.base import Decision, DeviceInfo, Optimization
from optimizations.registry import STACK_ORDER


class StrictError(ValueError):
    """`strict: true` and a requested optimisation would not run. Maps to 422."""

    def __init__(self, problems: list[tuple[str, str]]):
        self.problems = problems  # (request field, reason)
        super().__init__("; ".join(f"{f}: {r}" for f, r in problems))


def plan(flags: Mapping[str, bool | None], registry: Mapping[str, Optimization], prepared: Mapping[str, str],
         device: DeviceInfo, *, strict: bool = False,
         unwarmed_shape: Callable[[Mapping[str, Decision]], str | None] | None = None,
         offloaded: Mapping[str, str] | None = None,
         precision_of: Callable[[Mapping[str, Decision]], str] | None = None) -> dict[str, Decision]:
    """One Decision per optimisation, in STACK_ORDER.

    flags: optimisation name -> True / False / None (None: the server default: prepared lossless ones on, lossy ones
    off). prepared: name -> the detail its prepare() returned. unwarmed_shape: given the plan so far, None when the
    request's shape is compiled already, else its description; passed only under `--new-shapes eager`, where an
    optimisation that compiles per shape is then not applied. offloaded: component -> how a memory budget offloads it
    (memory_tiers.MemoryTier.offloaded); precision_of: the transformer variant a plan runs (Runner.precision).
    """
    decisions: dict[str, Decision] = {}
    problems: list[tuple[str, str]] = []
    for name in STACK_ORDER:
        opt, flag = registry[name], flags.get(name)
        is_prepared = name in prepared
        want = (is_prepared and not opt.lossy) if flag is None else flag
        suffix = " (server default)" if flag is None and want else ""
        if not is_prepared:
            why = opt.available(device) or "not prepared at start-up (see --optimizations)"
            decisions[name] = Decision(want, False, why)
        elif not opt.toggle:
            note = ""
            if flag is False:
                note = "; requested off, but it is load-time and stays on once prepared"
                problems.append((opt.flag, "load-time optimisation cannot be turned off per request"))
            decisions[name] = Decision(want, True, prepared[name] + note + suffix)
        else:
            decisions[name] = Decision(want, want, (prepared[name] + suffix) if want else "not requested")
    _resolve_conflicts(decisions, registry)
    if offloaded and precision_of is not None:
        _leave_out_of_offloaded(decisions, registry, offloaded, precision_of(decisions))
    if unwarmed_shape is not None:
        for name in STACK_ORDER:
            if registry[name].compiles_per_shape and decisions[name].applied:
                shape = unwarmed_shape(decisions)
                if shape is not None:
                    decisions[name] = Decision(decisions[name].requested, False,
                                               f"{shape} was not warmed up: runs uncompiled (--new-shapes eager)")
    for name, d in decisions.items():
        if d.requested and not d.applied and flags.get(name) is True:
            problems.append((registry[name].flag, d.detail))
    if strict and problems:
        raise StrictError(problems)
    return decisions


def _resolve_conflicts(decisions: dict[str, Decision], registry: Mapping[str, Optimization]) -> None:
    """Apply each applied optimisation's declared conflicts, in stack order: the loser is not applied, with why."""
    for name in STACK_ORDER:
        for c in registry[name].conflicts():
            if decisions[name].applied and decisions[c.other].applied:
                d = decisions[c.drop]
                decisions[c.drop] = Decision(d.requested, False, c.reason)


def _leave_out_of_offloaded(decisions: dict[str, Decision], registry: Mapping[str, Optimization],
                            offloaded: Mapping[str, str], precision: str) -> None:
    """The request's transformer variant is streamed in from the host: what cannot run on it is not applied."""
    component = variant_component(precision)
    if component not in offloaded:
        return
    for name in STACK_ORDER:
        why = registry[name].offload_conflict
        if why and decisions[name].applied:
            decisions[name] = Decision(decisions[name].requested, False,
                                       f"{why} (the {component} is offloaded under --memory-budget)")
