"""kontext_server/service/planner.py: planning is a pure function of the registry, what was prepared and the flags;
combination rules come from the optimisations' declared conflicts, not from the service."""
from __future__ import annotations

import threading

import pytest

from kontext_server.service.planner import StrictError, plan
from optimizations.base import Conflict, DeviceInfo, Optimization
from optimizations.registry import STACK_ORDER, build_registry

CPU = DeviceInfo("cpu", "cpu", None)
H100 = DeviceInfo("cuda", "NVIDIA H100 80GB HBM3", (9, 0))
ALL_PREPARED = {name: f"{name} prepared" for name in STACK_ORDER}


def flags(**on) -> dict:
    return {name: on.get(name) for name in STACK_ORDER}


def test_defaults_apply_prepared_lossless_entries_and_leave_lossy_ones_off():
    reg = build_registry()
    decisions = plan(flags(), reg, ALL_PREPARED, H100)
    for name in STACK_ORDER:
        assert decisions[name].applied == (not reg[name].lossy), name
        assert decisions[name].requested == decisions[name].applied
    assert "(server default)" in decisions["compile"].detail


def test_a_declared_conflict_drops_the_declared_loser_and_says_why():
    full = build_registry(compile_scope="full")
    decisions = plan(flags(first_block_cache=True), full, ALL_PREPARED, H100)
    assert decisions["compile"].applied and not decisions["first_block_cache"].applied
    assert decisions["first_block_cache"].detail == full["compile"].conflicts()[0].reason
    assert "full-graph" in decisions["first_block_cache"].detail
    assert decisions["cuda_graphs"].applied  # the cache did not run, so nothing else changes


def test_the_first_block_cache_and_cuda_graphs_run_together_in_the_fast_tier():
    reg = build_registry()
    fast = dict(first_block_cache=True, low_precision=True, dpm_solver=True, cuda_graphs=True)
    decisions = plan(flags(**fast), reg, ALL_PREPARED, H100, strict=True)
    assert all(decisions[name].applied for name in fast)
    assert not any(c.other == "cuda_graphs" for c in reg["first_block_cache"].conflicts())


def test_a_new_optimisation_declares_its_own_conflicts_without_touching_the_planner():
    class Exclusive(Optimization):
        name, flag = "dpm_solver", "use_dpm_solver"

        def conflicts(self):
            return [Conflict("qkv_fusion", drop="dpm_solver", reason="test: not with fused projections")]

    reg = dict(build_registry(), dpm_solver=Exclusive())
    decisions = plan(flags(dpm_solver=True), reg, ALL_PREPARED, H100)
    assert not decisions["dpm_solver"].applied and decisions["dpm_solver"].detail == "test: not with fused projections"
    with pytest.raises(StrictError) as exc:
        plan(flags(dpm_solver=True), reg, ALL_PREPARED, H100, strict=True)
    assert exc.value.problems == [("use_dpm_solver", "test: not with fused projections")]


def test_an_unwarmed_shape_runs_without_the_entries_that_compile_per_shape():
    reg = build_registry()
    seen = []

    def unwarmed(decisions):
        seen.append(decisions["low_precision"].applied)  # the plan so far: the shape depends on the precision
        return "512x512 edit (fp8)"

    decisions = plan(flags(low_precision=True), reg, ALL_PREPARED, H100, unwarmed_shape=unwarmed)
    assert not decisions["compile"].applied and "512x512 edit (fp8) was not warmed up" in decisions["compile"].detail
    assert decisions["cuda_graphs"].applied  # captured per shape, but not compiled: not this policy's business
    assert seen == [True]
    with pytest.raises(StrictError):
        plan(flags(compile=True), reg, ALL_PREPARED, H100, strict=True, unwarmed_shape=unwarmed)


def test_planning_reads_nothing_but_its_arguments():
    reg = build_registry()
    prepared = dict(ALL_PREPARED)
    before = {n: vars(o).copy() for n, o in reg.items()}
    first = plan(flags(first_block_cache=True, low_precision=True), reg, prepared, H100)
    assert plan(flags(first_block_cache=True, low_precision=True), reg, prepared, H100) == first
    assert prepared == ALL_PREPARED and {n: vars(o) for n, o in reg.items()} == before


def test_planning_on_another_thread_while_warm_keys_change_never_fails(tiny_service):
    """The route plans on the event loop while the worker records warmed shapes: the runner replaces its set."""
    from kontext_server.request import InferenceRequest

    runner = tiny_service.runner
    stop = threading.Event()
    errors = []

    def worker():
        i = 0
        while not stop.is_set():
            runner.warm_keys = runner.warm_keys | {(("exact", 256 + i, 256, False, 1), ("compile",), False)}
            i += 1

    t = threading.Thread(target=worker)
    t.start()
    try:
        for _ in range(200):
            try:
                runner.shape_is_compiled(("exact", 256, 256, False, 1))
                tiny_service.plan(InferenceRequest(prompt="x", width=256, height=256))
            except Exception as exc:  # noqa: BLE001
                errors.append(exc)
    finally:
        stop.set()
        t.join()
        runner.warm_keys = frozenset()
    assert errors == []
