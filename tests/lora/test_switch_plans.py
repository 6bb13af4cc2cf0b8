"""Recorded switches (switch_plans.py): the same adapters again replay the first switch's writes and leave every slot
bit for bit as a fresh write does, at the same or other scales; a plan goes when the store lets go of one of its
adapters (CPU, tiny; the CUDA-graph capture of a plan is a GPU test)."""
from __future__ import annotations

import gc

import pytest
import torch

from kontext_server.lora import switch_plans
from tests.lora.conftest import latents, make_service


def slot_memory(manager) -> list[torch.Tensor]:
    """Every buffer a switch writes: each slot's A and B, and its mirrors' appended rows (and their scales)."""
    out = []
    for slot in manager.slots.values():
        out += [slot.A.clone(), slot.B.clone()]
        for m in slot.mirrors:
            out.append(m.weight[m.out_features:].clone())
            scale = getattr(m, "weight_scale", None)
            if scale is not None:
                out.append(scale.clone())
    return out


def fresh(manager, adapters, scales) -> list[torch.Tensor]:
    """The slots after writing `adapters` afresh: nothing held, no plan."""
    manager._held.clear()
    manager.plans.plans.clear()
    manager._write(adapters, scales, list(manager.slots))
    return slot_memory(manager)


@pytest.fixture(scope="module")
def service(cache_dir, lora_dir):
    return make_service(cache_dir, lora_dir=lora_dir, lora_max_rank=8)


def test_switching_back_replays_the_recorded_writes_and_leaves_the_slots_as_a_fresh_write(service):
    manager = service.lora
    latents(service, [("style", 1.0)])  # loaded, and any mirror's fp8 rows made
    latents(service, [("light", 1.0)])
    style, light = (manager._load(n, frozenset())[0] for n in ("style", "light"))
    want_style, want_light = fresh(manager, [style], [0.7]), fresh(manager, [light], [-0.4])
    replays = manager.plans.replays
    for _ in range(2):  # light -> style -> light -> style: the first of each records, the rest replay
        assert manager._write([style], [0.7], list(manager.slots))
        assert all(torch.equal(a, b) for a, b in zip(slot_memory(manager), want_style, strict=True))
        assert manager._write([light], [-0.4], list(manager.slots))
        assert all(torch.equal(a, b) for a, b in zip(slot_memory(manager), want_light, strict=True))
    assert manager.plans.replays - replays >= 3
    assert not manager._write([light], [-0.4], list(manager.slots))  # held already: nothing written, nothing replayed
    report = service.health()["lora"]["switch_plans"]
    assert report["plans"] >= 2 and report["replays"] == manager.plans.replays and report["cuda_graphs"] is False


def test_the_same_adapters_at_other_scales_replay_the_plan_and_leave_the_slots_as_a_fresh_write_at_them(service):
    manager = service.lora
    style = manager._load("style", frozenset())[0]
    want = {scale: fresh(manager, [style], [scale]) for scale in (0.6, -1.0, 0.25)}  # ends holding 0.25, one plan
    recorded, replays = manager.plans.recorded, manager.plans.replays
    manager._write([style], [-1.0], list(manager.slots))  # the scales only: recorded once
    assert all(torch.equal(a, b) for a, b in zip(slot_memory(manager), want[-1.0], strict=True))
    for scale in (0.6, 0.25, -1.0):  # the same slots at other scales: replayed, whatever the scale
        assert manager._write([style], [scale], list(manager.slots))
        assert all(torch.equal(a, b) for a, b in zip(slot_memory(manager), want[scale], strict=True))
    assert (manager.plans.recorded - recorded, manager.plans.replays - replays) == (1, 3)
    assert len(manager.plans.plans) == 2  # the whole write and the scales-only write


def test_a_plan_goes_when_the_store_lets_go_of_its_adapter(cache_dir, lora_dir):
    svc = make_service(cache_dir, lora_dir=lora_dir, lora_max_rank=8, max_loras=1)
    manager = svc.lora
    latents(svc, [("style", 1.0)])
    latents(svc, [("light", 1.0)])  # evicts style (one adapter fits)
    gc.collect()
    latents(svc, [("shared", 1.0)])  # evicts light; the next switch drops the plans of collected adapters
    gc.collect()
    latents(svc, [("style", 1.0)])
    ids = {i for key in manager.plans.plans for i in key[0]}
    assert ids == {id(a) for a in svc.lora.store.loaded.values()}  # only the loaded adapter's plans are left
    assert svc.lora.store.evictions == 3


def test_the_plans_kept_are_bounded(service, monkeypatch):
    monkeypatch.setattr(switch_plans, "PLANS", 2)
    manager = service.lora
    style, light = (manager._load(n, frozenset())[0] for n in ("style", "light"))
    for adapters in ([style], [light], [style, light], [light, style]):
        manager._write(adapters, [0.5] * len(adapters), list(manager.slots))
    assert len(manager.plans.plans) == 2


def test_a_graph_capture_that_fails_leaves_the_switch_written_and_turns_the_graphs_off(service, caplog):
    manager = service.lora
    style, light = (manager._load(n, frozenset())[0] for n in ("style", "light"))
    want = fresh(manager, [light], [0.6])
    manager._write([style], [1.0], list(manager.slots))
    manager.plans.plans.clear()
    manager.plans.graphs = True  # on a CPU the capture itself fails
    try:
        with caplog.at_level("WARNING", logger="flux.lora"):
            assert manager._write([light], [0.6], list(manager.slots))
        assert manager.plans.graphs is False and "capturing a switch's writes failed" in caplog.text
        assert all(torch.equal(a, b) for a, b in zip(slot_memory(manager), want, strict=True))
        assert len(manager.plans.plans) == 1  # kept, to be replayed without a graph
    finally:
        manager.plans.graphs = False


def test_an_evicted_adapters_memory_is_freed_by_the_next_load_not_held_by_its_plan(cache_dir, lora_dir):
    import weakref

    svc = make_service(cache_dir, lora_dir=lora_dir, lora_max_rank=8, max_loras=1)
    manager = svc.lora
    latents(svc, [("style", 1.0)])
    assert len(manager.plans.plans) == 1
    style = manager.store.loaded["style"]
    tensors = [weakref.ref(t.a) for t in style.targets.values()]
    del style
    manager._load("light", frozenset())  # evicts style: its plan and tensors go now, before any write
    assert manager.plans.plans == {}
    assert all(ref() is None for ref in tensors)
