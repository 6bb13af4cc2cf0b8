"""A switch's slot writes: recorded over every slot, the zeros and copies issued as two foreach ops, with the values
the same writes give one op at a time; a failure while they are recorded leaves every slot as it was (CPU, tiny)."""
from __future__ import annotations

import collections

import pytest
import torch
from torch.utils._python_dispatch import TorchDispatchMode

from kontext_server.lora import batched_writes
from kontext_server.lora.batched_writes import SlotWrites
from tests.lora.conftest import latents, make_service


class _Ops(TorchDispatchMode):
    """Counts the aten ops called under it, by name."""

    def __init__(self):
        super().__init__()
        self.count = collections.Counter()

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        self.count[func.__name__.split(".")[0]] += 1
        return func(*args, **(kwargs or {}))


def issue_writes(foreach: bool, monkeypatch, device: str = "cpu") -> list[torch.Tensor]:
    """Zeros, copies and scaled copies into bf16 views of two buffers, issued one way; the buffers after (and the
    scaled source)."""
    monkeypatch.setattr(batched_writes, "FOREACH", foreach)
    g = torch.Generator().manual_seed(0)
    a, b, src_a, src_b = (torch.randn(*shape, generator=g).bfloat16().to(device)
                          for shape in ((24, 16), (16, 24), (8, 16), (16, 8)))
    w = SlotWrites()
    w.zero(b[:, 0:12])
    w.copy(a[0:8], src_a)
    w.scaled_copy(b[:, 0:8], src_b, 0, 0.5)  # adapter 0's scale x 0.5
    w.scaled_copy(b[:, 16:24], src_b, 1, -1.5)
    assert len(w) == 4
    w.run((0.74, 1.0))
    assert len(w) == 0  # forgotten once issued
    return [a, b, src_b]


def check_batched_against_one_by_one(monkeypatch, device: str = "cpu") -> None:
    a, b, src_b = issue_writes(True, monkeypatch, device)
    a1, b1, _ = issue_writes(False, monkeypatch, device)
    assert torch.equal(a, a1) and torch.equal(b, b1)
    assert torch.equal(b[:, 0:8], torch.mul(src_b, 0.37))  # a scaled copy is torch.mul(b, s), rounded once
    assert not b[:, 8:12].any()  # zeroed, not overwritten


def test_batched_writes_give_the_values_of_the_same_writes_issued_one_by_one(monkeypatch):
    check_batched_against_one_by_one(monkeypatch)


def test_a_copy_of_the_wrong_shape_is_refused_when_recorded():
    with pytest.raises(ValueError, match="a copy of"):
        SlotWrites().copy(torch.zeros(4, 4), torch.zeros(4, 3))


@pytest.fixture(scope="module")
def service(cache_dir, lora_dir):
    return make_service(cache_dir, lora_dir=lora_dir, lora_max_rank=8)


def test_a_switch_issues_every_slots_zeros_and_copies_as_two_foreach_ops(service):
    manager = service.lora
    latents(service, [("style", 1.0)])  # loaded, and the fp8 rows of any mirror made
    style, light = (manager._load(n, frozenset())[0] for n in ("style", "light"))
    assert len(manager.slots) > 3
    with _Ops() as ops:
        assert manager._write([light], [0.5], list(manager.slots))
    writes = {k: v for k, v in ops.count.items() if k in ("copy_", "zero_", "mul", "mul_", "_foreach_copy_",
                                                            "_foreach_zero_", "_foreach_mul_")}
    scaled = sum(len(s.parts) for s in manager.slots.values())  # at most: one per part the adapter targets
    assert writes.pop("_foreach_zero_") == 1 and writes.pop("_foreach_copy_") == 1
    assert set(writes) == {"mul"} and 0 < writes["mul"] <= scaled
    manager._write([style], [1.0], list(manager.slots))  # back, for the tests after


def test_a_switch_that_fails_while_its_writes_are_recorded_leaves_every_slot_as_it_was(service, monkeypatch):
    manager = service.lora
    base = latents(service).latents
    with_style = latents(service, [("style", 1.0)]).latents
    before = {n: (s.A.clone(), s.B.clone()) for n, s in manager.slots.items()}
    names = list(manager.slots)
    failing = manager.slots[names[len(names) // 2]]

    def fail(*args, **kwargs):
        raise RuntimeError("a write that fails")

    monkeypatch.setattr(failing, "write", fail)
    manager.plans.plans.clear()  # written afresh, not replayed from an earlier test's switch to `light`
    with pytest.raises(RuntimeError, match="a write that fails"):
        latents(service, [("light", 1.0)])
    assert all(torch.equal(s.A, before[n][0]) and torch.equal(s.B, before[n][1]) for n, s in manager.slots.items())
    monkeypatch.undo()
    assert torch.equal(latents(service).latents, base)
    assert torch.equal(latents(service, [("style", 1.0)]).latents, with_style)
