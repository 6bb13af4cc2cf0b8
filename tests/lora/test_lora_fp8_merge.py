"""The fp8 merge (FLUX_LORA_FP8_MERGE=1, kontext_server/lora/fp8_merge.py) on CPU: the exact tiny transformer and its
fp8 copy as the low-precision optimisation builds it (tests/lora/fp8_variants.py), slots installed on both.

Covers: which modules the merge takes (every fp8 linear an adapter reaches; the modulation table keeps its branch)
and by which quantiser; a merged request's output against bf16 with the same adapters, beside the fused branch's;
the copy restored bit for bit; exact requests untouched by it; no second merge for the same adapters; the graph key;
an fp8 weight that is not a quantisation of its exact weight keeps the branch; a merge that fails half-way undone;
torchao's own quantisation recognised."""
from __future__ import annotations

from types import SimpleNamespace

import pytest
import torch

from kontext_server.lora.fp8_merge import QUANTISERS, Fp8Merge, Target, _matches
from kontext_server.lora.merged_weights import DIRTY
from kontext_server.lora.store import DeviceTarget
from optimizations.fp8.linear import Fp8Linear
from tests.lora.fp8_variants import DTYPE, assert_same_adapters_write_once, build_merges, inputs, rel, run, specs

THREE = [("style", 1.0), ("light", 0.7), ("shared", -0.5)]


def build(cache_dir, lora_dir, spoil=None):
    """The two variants with slots and the fp8 merge on (the exact merge off); `spoil(fp8_copy)` runs before
    install."""
    return build_merges(cache_dir, lora_dir, "0", spoil)


@pytest.fixture(scope="module")
def merged(cache_dir, lora_dir):
    return build(cache_dir, lora_dir)


def fp8_bytes(model) -> dict[str, torch.Tensor]:
    """Every fp8 linear's weight bytes and scales as the GEMMs read them, by module name (a wrapper's `.base` left
    out of it)."""
    out = {}
    for name, m in model.named_modules():
        if isinstance(m, Fp8Linear):
            name = name.replace(".base", "")
            out[name + ".w"] = m.weight_t.t().view(torch.uint8).clone()
            out[name + ".s"] = m.weight_scale.clone()
    return out


def is_table(slot_name: str) -> bool:
    return ".norm" in slot_name or slot_name.startswith("norm_out")


def test_the_merge_takes_every_fp8_linear_an_adapter_reaches_and_leaves_the_bf16_modulation_linears_their_branch(
        merged):
    manager, _, _ = merged
    assert manager.path == "merged"
    report = manager.health()["branch"]["fp8_merge"]
    tables = [n for n in manager.slots if is_table(n)]
    blocks = [n for n in manager.slots if not is_table(n)]
    assert tables and blocks
    assert manager.merge.merged_slots == set(blocks)
    # the modulation linears stay bf16 in the copy (here plain Linears: no modulation table is prepared)
    assert report["kept_on_branch"] == {"kept in bf16 in the fp8 copy (Linear)": len(tables)}
    halves = sum(n.endswith(".proj_out") and n.startswith("single_") for n in blocks)  # one target per split half
    assert report["linears"] == len(blocks) + halves and report["quantisers"] == {"quantize_rows": report["linears"]}
    assert report["holds"] == "base"


def test_a_merged_fp8_request_is_as_close_to_bf16_with_the_adapters_as_the_fused_branch(merged):
    manager, models, _ = merged
    x = inputs(models["exact"], seed=1)
    loras = specs(THREE)
    with manager.applied([], "fp8"):
        base_err = rel(run(models["fp8"], x), run(models["exact"], x))
    with manager.applied(loras, "exact"):
        exact_with = run(models["exact"], x)
    try:
        manager.set_path("fused")
        with manager.applied(loras, "fp8"):
            fused = rel(run(models["fp8"], x), exact_with)
    finally:
        manager.set_path("merged")
    with manager.applied(loras, "fp8") as applied:
        assert manager.merge.report()["holds"] == "adapters" and applied.switch_ms is not None
        merged_err = rel(run(models["fp8"], x), exact_with)
    with manager.applied([], "exact"):
        moved = rel(exact_with, run(models["exact"], x))
    print(f"tiny, fp8 vs bf16 with three adapters: merged {merged_err:.4f}, fused branch {fused:.4f}; without "
          f"adapters {base_err:.4f}; the adapters move bf16 by {moved:.3f}")
    assert moved > 0.02  # the adapters move the output by much more than the errors compared here
    assert merged_err < 1.5 * fused + 0.005 and merged_err < 2 * base_err + 0.01


def test_the_copy_holds_the_merged_weights_and_gets_its_own_back_bit_for_bit(merged):
    manager, models, pristine = merged
    x = inputs(models["exact"], seed=2)
    before = fp8_bytes(pristine["fp8"])
    with manager.applied(specs([("style", 1.0)]), "fp8"), torch.no_grad():
        during = fp8_bytes(models["fp8"])
        changed = [k for k in before if not torch.equal(before[k], during[k])]
        assert changed and all(k.endswith((".w", ".s")) for k in changed)
        style = manager.store.loaded["style"]
        for t in manager.merge.targets:  # what the GEMM reads is the quantisation of W + s B A, per part, in fp32
            w = t.source.float()
            for module, offset, size in t.slot.parts:
                if module in style.targets:
                    u = style.targets[module]
                    w[offset:offset + size] += u.scale * (u.b.float() @ u.a[:, t.cols].float())
            q, s = QUANTISERS[t.quantiser](w.to(t.source.dtype))
            assert torch.equal(t.rows.view(torch.uint8), q.view(torch.uint8)) and torch.equal(
                t.linear.weight_scale.reshape(-1), s.reshape(-1)), t.name
    with manager.applied([], "fp8") as applied:
        assert applied.switch_ms is not None  # the restore, reported like a switch
        after = fp8_bytes(models["fp8"])
        assert all(torch.equal(before[k], after[k]) for k in before)
        assert torch.equal(run(models["fp8"], x), run(pristine["fp8"], x))
    assert manager.merge.report()["holds"] == "base"


def test_a_merge_writes_only_the_linears_its_adapters_reach_and_a_restore_only_those(merged):
    manager, models, pristine = merged
    with manager.applied([], "fp8"):
        pass
    before = fp8_bytes(pristine["fp8"])
    shared = set(manager.library.index["shared"].targets)
    reached = [t for t in manager.merge.targets if any(m in shared for m, _, _ in t.slot.parts)]
    assert 0 < len(reached) < len(manager.merge.targets)
    with manager.applied(specs([("shared", 1.0)]), "fp8"), torch.no_grad():
        assert manager.merge.last_written == len(reached)
        after = fp8_bytes(models["fp8"])
        changed = {k.rsplit(".", 1)[0] for k in before if not torch.equal(before[k], after[k])}
        live = {n.replace(".base", ""): m for n, m in models["fp8"].named_modules() if isinstance(m, Fp8Linear)}
        assert changed and {id(live[n]) for n in changed} <= {id(t.linear) for t in reached}
    with manager.applied([], "fp8"):
        assert manager.merge.last_written == len(reached)


def test_exact_requests_run_their_branch_and_leave_the_merged_copy_as_it_is(merged):
    manager, models, _ = merged
    x = inputs(models["exact"], seed=3)
    loras = specs([("style", 0.8)])
    with manager.applied(loras, "fp8"):
        pass
    merges, restores = manager.merge.merges, manager.merge.restores
    with manager.applied(loras, "exact") as applied:
        assert applied.graph_key == (("lora", 1, "fused"),)
        assert all(s.k == 1 for s in manager.slots.values())
        with_merge_on = run(models["exact"], x)
    with manager.applied([], "exact"):
        pass
    assert (manager.merge.merges, manager.merge.restores) == (merges, restores)  # the exact tier never restores
    try:
        manager.set_path("fused")
        with manager.applied(loras, "exact"):
            assert torch.equal(run(models["exact"], x), with_merge_on)
    finally:
        manager.set_path("merged")


def test_a_merged_request_writes_no_merged_slot_and_a_later_exact_request_runs_its_own_adapters(merged):
    manager, models, _ = merged
    x = inputs(models["exact"], seed=5)
    light, style = specs([("light", 0.9)]), specs([("style", 1.0), ("shared", 0.6)])
    with manager.applied(light, "exact"):
        reference = run(models["exact"], x)
    blocks = [n for n in manager.slots if n in manager.merge.merged_slots]
    held = {n: (manager.slots[n].A.clone(), manager.slots[n].B.clone()) for n in blocks}
    with manager.applied(style, "fp8"):
        assert all(torch.equal(manager.slots[n].A, a) and torch.equal(manager.slots[n].B, b)
                   for n, (a, b) in held.items())  # the merge read the adapters from the store, not the slots
    with manager.applied(light, "exact"):
        assert torch.equal(run(models["exact"], x), reference)
    with manager.applied(style, "exact"):  # the slots the merge skipped are written now
        with_style = run(models["exact"], x)
    assert not torch.equal(with_style, reference)
    assert any(not torch.equal(manager.slots[n].A, held[n][0]) for n in blocks)


def test_the_same_adapters_again_merge_nothing_and_another_scale_merges_once(merged):
    assert_same_adapters_write_once(merged[0], "fp8")


def test_a_merged_request_runs_the_base_code_and_graphs_where_no_slot_keeps_a_branch(merged, cache_dir, lora_dir,
                                                                                   tmp_path):
    manager, _, _ = merged
    with manager.applied(specs([("style", 1.0)]), "fp8") as applied:  # the bf16 modulation linears keep a branch
        assert applied.graph_key == (("lora", 1, "merged"),)
        assert {n for n, s in manager.slots.items() if s.k} == {n for n in manager.slots if is_table(n)}
    assert all(s.k == 0 for s in manager.slots.values())
    only_style = tmp_path / "loras"
    only_style.mkdir()
    (only_style / "style.safetensors").write_bytes((lora_dir / "style.safetensors").read_bytes())
    manager, _, _ = build(cache_dir, only_style)  # no adapter reaches a modulation linear: every slot merges
    assert manager.merge.merged_slots == set(manager.slots)
    with manager.applied(specs([("style", 1.0)]), "fp8") as applied:
        assert applied.graph_key == () and all(s.k == 0 for s in manager.slots.values())


def test_an_fp8_weight_that_is_not_a_quantisation_of_its_exact_weight_keeps_the_branch(cache_dir, lora_dir):
    def spoil(q):
        w = q.transformer_blocks[0].attn.to_out[0].weight_t
        w.t()[0, 0] = (w.t()[0, 0].float() * 0.5).to(w.dtype)  # one value off: a stored fp8 weight looks so

    manager, _, _ = build(cache_dir, lora_dir, spoil)
    report = manager.merge.report()
    assert report["kept_on_branch"]["its fp8 weight is not a known quantisation of the exact weight (e.g. stored "
                                    "fp8)"] == 1
    assert "transformer_blocks.0.attn.to_out.0" not in manager.merge.merged_slots
    with manager.applied(specs([("style", 1.0)]), "fp8") as applied:
        assert manager.slots["transformer_blocks.0.attn.to_out.0"].k == 1 and applied.graph_key != ()


def test_a_merge_that_fails_half_way_is_undone_by_the_next_fp8_request(cache_dir, lora_dir, monkeypatch):
    manager, models, pristine = build(cache_dir, lora_dir)
    x = inputs(models["exact"], seed=4)
    calls = {"n": 0}
    original = Target.write

    def failing(self, adapters):
        calls["n"] += 1
        if calls["n"] == 5:
            raise RuntimeError("out of memory (simulated)")
        return original(self, adapters)

    monkeypatch.setattr(Target, "write", failing)
    with pytest.raises(RuntimeError, match="simulated"):
        with manager.applied(specs([("style", 1.0)]), "fp8"):
            pass
    assert manager.merge.state == DIRTY and all(s.k == 0 for s in manager.slots.values())
    monkeypatch.setattr(Target, "write", original)
    with manager.applied([], "fp8"):
        assert torch.equal(run(models["fp8"], x), run(pristine["fp8"], x))
    assert manager.merge.state is None


def test_a_weight_quantised_by_torchao_is_recognised_by_torchaos_own_function():
    from torchao.quantization import PerRow
    from torchao.quantization.quantize_.workflows.float8.float8_tensor import Float8Tensor

    w = (torch.randn(96, 64, generator=torch.Generator().manual_seed(0)) * 0.05).to(DTYPE)
    t = Float8Tensor.from_hp(w, float8_dtype=torch.float8_e4m3fn, granularity=PerRow())
    linear = Fp8Linear(t.qdata, t.scale, None, out_dtype=DTYPE)
    assert _matches(linear, w, QUANTISERS["torchao"])
    ours = QUANTISERS["quantize_rows"](w)
    if not torch.equal(ours[1].reshape(-1), t.scale.reshape(-1).float()):  # the scale in bf16 against fp32
        assert not _matches(linear, w, QUANTISERS["quantize_rows"])
    slot = SimpleNamespace(name="m", parts=[("m", 0, 96)])
    merge = Fp8Merge([Target("m", linear, w, slot, slice(None), "torchao")], {})
    before = linear.weight_t.t().view(torch.uint8).clone()
    g = torch.Generator().manual_seed(1)
    adapter = SimpleNamespace(rank=16, targets={"m": DeviceTarget((torch.randn(16, 64, generator=g) * 0.05).to(DTYPE),
                                                         (torch.randn(96, 16, generator=g) * 0.05).to(DTYPE), 1.0)})
    assert merge.apply("x", [(adapter, 1.0)]) and not torch.equal(linear.weight_t.t().view(torch.uint8), before)
    assert merge.restore() and torch.equal(linear.weight_t.t().view(torch.uint8), before)
