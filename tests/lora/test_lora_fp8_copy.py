"""The slots on two transformer variants at once (CPU, tiny): the exact transformer and an fp8 copy built as the
low-precision optimisation builds it (its linears Fp8Linears on row-scaled e4m3 weights, the GELU fused into the next
linear's quantisation, the single blocks' proj_out split into quantised halves; the fp8 tier itself needs a GPU, so
here the weights are quantised with quantize_rows and the input rows by the linears). The manager installs one slot
per module on both; the exact tier's appended rows are the slots' A, the fp8 copy's are their e4m3 mirrors."""
from __future__ import annotations

import copy
from types import SimpleNamespace

import pytest
import torch

from kontext_server.lora.manager import LoraManager
from kontext_server.lora.slots import LinearRows, LoraGeluOutput, LoraLinear, LoraProjOut, ScaledRows
from tests.lora.fp8_variants import DTYPE, fp8_copy, inputs, rel, run, specs


@pytest.fixture(scope="module")
def variants(cache_dir, lora_dir):
    from kontext_server.models.tiny import load_tiny

    exact = load_tiny("cpu", cache_dir).transformer.to(DTYPE).eval()
    q = fp8_copy(exact)
    pristine = {"exact": copy.deepcopy(exact), "fp8": copy.deepcopy(q)}
    config = SimpleNamespace(lora_dir=lora_dir, lora_fuse=None, lora_max_rank=8, max_loras=8)
    with pytest.MonkeyPatch.context() as mp:
        mp.setenv("FLUX_LORA_FUSED_BRANCH", "1")  # the fused branch (the default) these tests are about
        manager = LoraManager.create(config, exact, "cpu")
        manager.install({"exact": exact, "fp8": q})
    return manager, {"exact": exact, "fp8": q}, pristine


def test_both_variants_take_the_rows_the_exact_ones_being_the_slots_A_and_the_fp8_ones_its_mirrors(variants):
    manager, models, _ = variants
    branch = manager.health()["branch"]["variants"]
    assert branch["exact"]["fused_modules"] == branch["fp8"]["fused_modules"] == len(manager.slots)
    assert branch["exact"]["unfused_modules"] == branch["fp8"]["unfused_modules"] == {}
    for name, slot in manager.slots.items():
        assert isinstance(slot.home, LinearRows), name
        kinds = {type(m) for m in slot.mirrors}
        block_linear = ".norm" not in name and not name.startswith("norm_out")  # the modulation linears stay bf16
        assert kinds == ({ScaledRows} if block_linear else {LinearRows}), name
    q = models["fp8"]
    assert isinstance(q.transformer_blocks[0].ff.net[2], LoraLinear) and q.transformer_blocks[0].ff.net[2].pre_gelu
    proj_out = q.single_transformer_blocks[0].proj_out
    assert isinstance(proj_out, LoraProjOut) and proj_out.appended_attn is not None
    assert not any(isinstance(m, LoraGeluOutput) for m in q.modules())


def test_without_adapters_both_variants_give_their_unwrapped_output_bit_for_bit(variants):
    manager, models, pristine = variants
    x = inputs(models["exact"])
    with manager.applied(specs([("style", 1.0), ("light", 0.5)])):
        run(models["fp8"], x)  # adapters in the slots, then gone
    with manager.applied([]):
        for tier in ("exact", "fp8"):
            assert torch.equal(run(models[tier], x), run(pristine[tier], x)), tier


def test_the_fp8_copys_fused_branch_stays_as_close_to_bf16_with_the_adapters_as_its_side_branch(variants):
    manager, models, _ = variants
    x = inputs(models["exact"], seed=1)
    loras = specs([("style", 1.0), ("light", 0.7), ("shared", -0.5)])
    with manager.applied([]):
        base_err = rel(run(models["fp8"], x), run(models["exact"], x))
    out = {}
    try:
        for path in ("fused", "unfused"):
            manager.set_path(path)
            with manager.applied(loras):
                out[path] = {tier: run(models[tier], x) for tier in ("exact", "fp8")}
    finally:
        manager.set_path("fused")
    with manager.applied([]):
        moved = rel(out["fused"]["exact"], run(models["exact"], x))
    assert moved > 0.02  # the adapters move the output by much more than the errors compared below
    torch.testing.assert_close(out["fused"]["exact"], out["unfused"]["exact"], rtol=2e-2, atol=2e-2)
    fused, side = rel(out["fused"]["fp8"], out["fused"]["exact"]), rel(out["unfused"]["fp8"], out["fused"]["exact"])
    print(f"tiny, fp8 vs bf16: without adapters {base_err:.4f}; with three, fused {fused:.4f}, side branch {side:.4f}; "
          f"the adapters move bf16 by {moved:.3f}")
    assert fused < 1.5 * side + 0.005 and fused < 2 * base_err + 0.01
