"""The fp8 merge's recorded writes (kontext_server/lora/fp8_merge.py, Fp8Merge's plans) on CPU, in Triton's
interpreter: the same adapters written again replay the recorded addmms and launches and give the same bytes, with
the gemm-first way's scratch rows in the merge's arena even when a write needs several runs of it; another scale
replays the same plan (gemm-first) or is a plan of its own (the tiled kernel); plans are bounded; an adapter
reloaded with new weights is recorded anew, and the plans of the old one go (with their hold on its tensors) at the
first write after it is collected; adapters that cannot be weakly referenced are never recorded. Gemm-first runs
both of its ways (the merged rows, or the update rows with W added by the kernel)."""
from __future__ import annotations

import gc
import weakref
from types import SimpleNamespace

import pytest
import torch

from kontext_server.lora import fp8_merge
from kontext_server.lora.fp8_merge import QUANTISERS, Fp8Merge, Target
from kontext_server.lora.store import DeviceAdapter, DeviceTarget
from optimizations.fp8.linear import Fp8Linear
from optimizations.kernels import fp8_weight_quant


def weight(shape, seed):
    g = torch.Generator().manual_seed(seed)
    return (torch.randn(*shape, generator=g) * 0.02).to(torch.bfloat16)


def targets():
    """A fused q/k/v-like linear (three parts; adapters reach q and v) and a split proj_out's two column halves, in
    the kernels' rounding (grouped)."""
    qkv_w, proj_w = weight((96, 512), 20), weight((64, 1024), 21)
    qkv = Fp8Linear(*QUANTISERS["torchao"](qkv_w), None, out_dtype=torch.bfloat16)
    halves = [Fp8Linear(*QUANTISERS["torchao"](proj_w[:, c].contiguous()), None, out_dtype=torch.bfloat16)
              for c in (slice(0, 384), slice(384, None))]
    qkv_slot = SimpleNamespace(name="qkv", parts=[("q", 0, 32), ("k", 32, 32), ("v", 64, 32)])
    proj_slot = SimpleNamespace(name="proj", parts=[("proj", 0, 64)])
    return [Target("qkv", qkv, qkv_w, qkv_slot, slice(None), "triton_torchao"),
            Target("proj.attn", halves[0], proj_w[:, :384], proj_slot, slice(0, 384), "triton_torchao"),
            Target("proj.mlp", halves[1], proj_w[:, 384:], proj_slot, slice(384, None), "triton_torchao")]


def adapter(seed: int, name: str = "a", cls=DeviceAdapter):
    g = torch.Generator().manual_seed(seed)

    def t(n, k, r):
        return DeviceTarget((torch.randn(r, k, generator=g) * 0.1).to(torch.bfloat16),
                            (torch.randn(n, r, generator=g) * 0.05).to(torch.bfloat16), 0.5)
    parts = {"q": t(32, 512, 8), "v": t(32, 512, 8), "proj": t(64, 1024, 4)}
    if cls is SimpleNamespace:
        return SimpleNamespace(name=name, rank=8, targets=parts)
    return DeviceAdapter(name, 8, parts, (seed,), 0.0)


def held(ts) -> list[torch.Tensor]:
    return [torch.cat([t.rows.view(torch.uint8).flatten(), t.linear.weight_scale.flatten().view(torch.uint8)])
            for t in ts]


@pytest.fixture(autouse=True, params=[False, True], ids=["addmm", "update-rows"])
def gemm_first(monkeypatch, request):
    """Gemm-first, both ways: W + s B A into the scratch rows, or s B A alone (update_rows) with W added by the
    kernel; the recorded writes replay either."""
    monkeypatch.setitem(fp8_merge.KERNEL, "gemm_first", True)
    monkeypatch.setitem(fp8_merge.KERNEL, "update_rows", request.param)


def launches_built(monkeypatch) -> list:
    """Counts the Launch objects built from here on (a replay builds none)."""
    built = []
    real = fp8_weight_quant.Launch.__init__
    monkeypatch.setattr(fp8_weight_quant.Launch, "__init__",
                        lambda self, *a, **k: (built.append(1), real(self, *a, **k))[1])
    return built


def test_the_same_adapters_written_again_replay_the_recorded_write_and_hold_the_same_bytes(monkeypatch):
    ts = targets()
    merge, a = Fp8Merge(ts, {}), adapter(1)
    base = held(ts)
    assert merge.apply("a", [(a, 1.0)])
    merged = held(ts)
    assert merge.restore() and all(torch.equal(x, y) for x, y in zip(held(ts), base))
    assert merge.replays == 0 and len(merge.plans) == 2  # the merge's plan and the restore's
    built = launches_built(monkeypatch)
    assert merge.apply("a again", [(a, 1.0)])
    assert merge.replays == 1 and built == []
    assert all(torch.equal(x, y) for x, y in zip(held(ts), merged))
    assert merge.restore() and merge.replays == 2 and built == []
    assert all(torch.equal(x, y) for x, y in zip(held(ts), base))
    assert merge.report()["plans"] == 2 and merge.report()["replays"] == 2


def test_a_write_larger_than_the_scratch_arena_runs_it_several_times_and_replays_the_same(monkeypatch):
    """With an arena smaller than the merged rows, a write runs the kernel each time the arena fills and reuses it:
    the bytes are those of a merge with its scratch rows allocated (no arena), recorded and replayed alike."""
    reference_ts = targets()
    a = adapter(2)
    # the largest merged rows (proj.mlp's 64 x 640 bf16, 80 KiB) fit; all of them (192 KiB) do not
    monkeypatch.setattr(fp8_weight_quant, "SCRATCH_BYTES", 96 * 1024)
    fp8_merge.write_targets([(t, [(a, 1.0)]) for t in reference_ts])  # no arena: scratch allocated per segment
    runs = []
    real_run = fp8_weight_quant.Launch.run
    monkeypatch.setattr(fp8_weight_quant.Launch, "run", lambda self: (runs.append(1), real_run(self))[1])
    ts = targets()
    merge = Fp8Merge(ts, {})
    assert merge.apply("a", [(a, 1.0)])
    assert merge.arena is not None and merge.arena.numel() == 96 * 1024
    assert len(runs) > 1  # the arena filled and was reused within one write
    assert all(torch.equal(x, y) for x, y in zip(held(ts), held(reference_ts)))
    assert merge.restore() and merge.apply("b", [(a, 1.0)]) and merge.replays == 1
    assert all(torch.equal(x, y) for x, y in zip(held(ts), held(reference_ts)))


def test_rows_larger_than_the_arena_are_merged_all_the_same_but_not_recorded(monkeypatch):
    reference_ts, a = targets(), adapter(7)
    fp8_merge.write_targets([(t, [(a, 1.0)]) for t in reference_ts])
    monkeypatch.setattr(fp8_weight_quant, "SCRATCH_BYTES", 40 * 1024)  # proj.mlp's merged rows (80 KiB) do not fit
    ts = targets()
    merge = Fp8Merge(ts, {})
    assert merge.apply("a", [(a, 1.0)])
    assert all(torch.equal(x, y) for x, y in zip(held(ts), held(reference_ts)))
    assert len(merge.plans) == 0


def test_another_scale_replays_the_same_plan_at_that_scale_and_gives_a_fresh_merges_bytes():
    """The gemm-first way reads the request's scales when its addmms run: one plan per set of adapters, any scales
    (two adapters, so that each update's scale is the right adapter's)."""
    ts = targets()
    merge, a, b = Fp8Merge(ts, {}), adapter(3), adapter(8, "b")
    merge.apply("1.0", [(a, 1.0), (b, 0.4)])
    for scales in ((0.5, 0.4), (0.5, -1.2), (0.0, 0.9)):
        merge.apply(str(scales), [(a, scales[0]), (b, scales[1])])
        reference = targets()
        fp8_merge.write_targets([(t, [(a, scales[0]), (b, scales[1])]) for t in reference])
        assert all(torch.equal(x, y) for x, y in zip(held(ts), held(reference))), scales
    assert merge.replays == 3 and len(merge.plans) == 1


def test_with_the_tiled_kernel_another_scale_is_a_plan_of_its_own_and_the_plans_are_bounded(monkeypatch):
    """The tiled kernel's scales are in its launch tables: there each scale is recorded apart, up to PLANS."""
    monkeypatch.setitem(fp8_merge.KERNEL, "gemm_first", False)
    monkeypatch.setattr(Fp8Merge, "PLANS", 3)
    ts = targets()
    merge, a = Fp8Merge(ts, {}), adapter(3)
    merge.apply("1.0", [(a, 1.0)])
    at_one = held(ts)
    merge.apply("0.5", [(a, 0.5)])
    assert merge.replays == 0 and not all(torch.equal(x, y) for x, y in zip(held(ts), at_one))
    for scale in (0.25, 0.75, -0.5):
        merge.apply(str(scale), [(a, scale)])
    assert len(merge.plans) == 3 and merge.replays == 0
    merge.apply("-0.5 again", [(a, -0.5)])
    assert merge.replays == 1


def test_an_adapter_reloaded_with_new_weights_is_recorded_anew_and_the_old_ones_plans_go_with_it():
    ts = targets()
    merge = Fp8Merge(ts, {})
    old = adapter(4, "style")
    tensor = weakref.ref(old.targets["q"].a)
    merge.apply("style", [(old, 1.0)])
    merge.restore()
    assert len(merge.plans) == 2
    del old  # as a store drops an adapter it evicts, or reloads because its file changed
    gc.collect()
    new = adapter(5, "style")  # the same name, other weights
    merge.apply("style", [(new, 1.0)])
    assert merge.replays == 0
    assert len(merge.plans) == 2  # the restore's and the new adapter's: the old one's went at this write
    assert tensor() is None  # no plan kept the dropped adapter's weights alive
    reference = targets()
    fp8_merge.write_targets([(t, [(new, 1.0)]) for t in reference])
    assert all(torch.equal(x, y) for x, y in zip(held(ts), held(reference)))


def test_adapters_that_cannot_be_weakly_referenced_are_written_each_time_without_a_plan(monkeypatch):
    ts = targets()
    merge, a = Fp8Merge(ts, {}), adapter(6, cls=SimpleNamespace)
    merge.apply("a", [(a, 1.0)])
    merged = held(ts)
    merge.restore()
    built = launches_built(monkeypatch)
    merge.apply("a again", [(a, 1.0)])
    assert built and merge.replays == 0 and all(torch.equal(x, y) for x, y in zip(held(ts), merged))
    assert len(merge.plans) == 1  # the restore's only


@pytest.mark.parametrize("forced", [None, "gemm", "64x128x4"])
def test_by_default_every_write_is_gemm_first_with_update_rows_and_a_tools_forced_way_wins(monkeypatch, forced):
    """The measured switch: update_rows the fastest at rank 32 and at 128 (fp8_merge.DEFAULT_WAY)."""
    monkeypatch.setattr(fp8_merge, "KERNEL", fp8_merge.kernel_from_spec(forced) if forced else
                        {"gemm_first": None, "config": None, "update_rows": False})
    way = fp8_merge.merge_way()
    assert way == (fp8_merge.kernel_from_spec(forced) if forced else
                   {"gemm_first": True, "config": None, "update_rows": True})


def test_by_default_switches_of_any_rank_are_scale_free_plans_in_the_scratch_arena(monkeypatch):
    """The default way reads the request's scales when it runs: a rank-8 and a rank-64 switch are each one plan that
    leaves the scale out of its key, and both take the scratch arena; a replay at another scale writes what a fresh
    merge at that scale writes."""
    monkeypatch.setitem(fp8_merge.KERNEL, "gemm_first", None)
    ts = targets()
    merge, small = Fp8Merge(ts, {}), adapter(3)
    merge.apply("small", [(small, 0.5)])
    (key,) = merge.plans
    assert key.scale_free and merge.arena is not None
    g = torch.Generator().manual_seed(9)

    def part(n, k):
        return DeviceTarget((torch.randn(64, k, generator=g) * 0.1).to(torch.bfloat16),
                            (torch.randn(n, 64, generator=g) * 0.05).to(torch.bfloat16), 0.5)
    large = DeviceAdapter("large", 64, {"q": part(32, 512), "v": part(32, 512), "proj": part(64, 1024)}, (9,), 0.0)
    merge.apply("large", [(large, 0.5)])
    assert [k.scale_free for k in merge.plans] == [True, True]
    merge.apply("small", [(small, -0.25)])
    assert merge.replays == 1
    reference = targets()
    fp8_merge.write_targets([(t, [(small, -0.25)]) for t in reference])
    assert all(torch.equal(x, y) for x, y in zip(held(ts), held(reference)))
    merge.apply("large", [(large, 0.5)])
    reference = targets()
    fp8_merge.write_targets([(t, [(large, 0.5)]) for t in reference])
    assert all(torch.equal(x, y) for x, y in zip(held(ts), held(reference)))
