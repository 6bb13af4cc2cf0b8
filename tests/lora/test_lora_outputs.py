"""What adapters do to a generation (CPU, tiny): scale 0 is the base image, scales and combinations differ, the result
is diffusers' own LoRA result, the kohya layout runs what the diffusers layout runs, and no adapter leaks into the
next request."""
from __future__ import annotations

import pytest
import torch

from tests.lora.conftest import latents, make_service


def same(a, b) -> bool:
    return torch.equal(a.latents, b.latents)


def test_scale_zero_gives_the_base_image(lora_service, base_service):
    base = latents(base_service)
    zero = latents(lora_service, [("style", 0.0)])
    assert zero.loras == [{"name": "style", "scale": 0.0, "rank": 4}]
    torch.testing.assert_close(zero.latents, base.latents, rtol=0, atol=0)


def test_two_scales_give_different_images(lora_service, base_service):
    base = latents(base_service)
    half, full = latents(lora_service, [("style", 0.5)]), latents(lora_service, [("style", 1.0)])
    assert not same(half, full) and not same(half, base) and not same(full, base)


def test_two_adapters_together_differ_from_each_alone(lora_service):
    both = latents(lora_service, [("style", 1.0), ("light", 1.0)])
    assert not same(both, latents(lora_service, [("style", 1.0)]))
    assert not same(both, latents(lora_service, [("light", 1.0)]))
    assert both.loras == [{"name": "style", "scale": 1.0, "rank": 4}, {"name": "light", "scale": 1.0, "rank": 8}]


@pytest.fixture(scope="module")
def diffusers_reference(cache_dir, lora_dir):
    """An unoptimised service whose pipeline carries diffusers' own LoRA layers (PEFT), loaded with
    `load_lora_weights`: no fused QKV, no modulation table, no slots."""
    svc = make_service(cache_dir, optimizations="none")
    for name in ("style", "light"):
        svc.pipe.load_lora_weights(str(lora_dir / f"{name}.safetensors"), adapter_name=name)
    return svc


@pytest.mark.parametrize("loras", [[("style", 1.0)], [("light", 0.7)], [("style", -0.8), ("light", 1.5)]],
                         ids=["style", "light-on-the-modulation-linears", "both"])
def test_an_adapter_request_matches_diffusers_own_lora_loading(lora_service, diffusers_reference, base_service,
                                                                 loras):
    diffusers_reference.pipe.set_adapters([n for n, _ in loras], [s for _, s in loras])
    expected = latents(diffusers_reference)
    got = latents(lora_service, loras)
    assert got.optimizations["qkv_fusion"].applied and got.optimizations["modulation_table"].applied
    # the adapters change the image by far more than the tolerance (so the comparison means something)
    assert (expected.latents - latents(base_service).latents).abs().max() > 0.02
    torch.testing.assert_close(got.latents, expected.latents, rtol=1e-4, atol=1e-4)


def test_the_kohya_layout_runs_what_the_diffusers_layout_runs(lora_service):
    kohya = latents(lora_service, [("shared_kohya", 1.0)])
    diffusers_layout = latents(lora_service, [("shared", 1.0)])
    assert not same(kohya, latents(lora_service))
    # kohya's alpha is folded into the weights by diffusers' conversion: the same update, rounded differently
    torch.testing.assert_close(kohya.latents, diffusers_layout.latents, rtol=1e-5, atol=1e-5)


def test_a_base_request_after_adapter_requests_is_bit_identical_to_a_fresh_servers(lora_service, base_service):
    latents(lora_service, [("style", 1.0), ("light", -1.0), ("shared", 2.0)])
    latents(lora_service, [("light", 1.0)])
    after = latents(lora_service)
    assert after.loras == [] and "lora_switch" not in after.timings_ms
    torch.testing.assert_close(after.latents, latents(base_service).latents, rtol=0, atol=0)


def test_the_same_adapters_give_the_same_image_whatever_ran_before(lora_service):
    first = latents(lora_service, [("style", 1.0), ("light", 0.5)])
    latents(lora_service, [("shared", 1.0), ("style", -2.0), ("light", 3.0)])
    latents(lora_service, [("light", 0.5)])
    again = latents(lora_service, [("style", 1.0), ("light", 0.5)])
    torch.testing.assert_close(again.latents, first.latents, rtol=0, atol=0)


def test_the_modulation_table_changes_with_an_adapter_on_the_modulation_linears_and_resets_when_it_goes(
        lora_service):
    state = lora_service.registry["modulation_table"].state
    latents(lora_service)
    base_rows = state.table[:state.used].clone()
    base_epoch = state.epoch
    latents(lora_service, [("light", 1.0)])  # light targets norm1.linear, norm.linear, norm_out.linear, ...
    assert state.epoch > base_epoch  # the table was reset for the new adapter set
    light_rows = state.table[:state.used].clone()
    assert light_rows.shape == base_rows.shape and not torch.equal(light_rows, base_rows)
    epoch = state.epoch
    latents(lora_service)
    assert state.epoch > epoch  # and reset again when the adapter went
    torch.testing.assert_close(state.table[:state.used], base_rows, rtol=0, atol=0)


def test_an_adapter_without_modulation_targets_leaves_the_table_rows_as_the_base_ones(lora_service):
    state = lora_service.registry["modulation_table"].state
    latents(lora_service, [("light", 1.0)])
    latents(lora_service)  # a reset, then the base request's rows
    base_rows = state.table[:state.used].clone()
    latents(lora_service, [("style", 1.0)])  # a reset, then rows of an adapter that targets no modulation linear
    torch.testing.assert_close(state.table[:state.used], base_rows, rtol=0, atol=0)


@pytest.fixture
def unfused_afterwards(lora_service):
    yield lora_service
    lora_service.lora.set_path("fused")


@pytest.mark.parametrize("loras", [[("style", 1.0)], [("style", -0.8), ("light", 1.5), ("shared", 0.6)]],
                         ids=["one", "three"])
def test_the_fused_branch_gives_the_side_branchs_image(unfused_afterwards, loras):
    svc = unfused_afterwards
    assert svc.lora.path == "fused"
    fused = latents(svc, loras)
    svc.lora.set_path("unfused")
    side = latents(svc, loras)
    torch.testing.assert_close(fused.latents, side.latents, rtol=1e-5, atol=1e-5)


def test_every_fused_module_holds_its_adapter_rows_in_its_own_weights_storage(lora_service):
    from kontext_server.lora.slots import LinearRows, LoraLinear, LoraProjOut

    exact = lora_service.transformer_variants["exact"]
    wrappers = [m for m in exact.modules() if isinstance(m, (LoraLinear, LoraProjOut))]
    assert wrappers and all(w.appended is not None for w in wrappers)
    for w in wrappers:
        rows = w.appended
        assert isinstance(rows, LinearRows) and w.slot.home is rows  # the exact tier's rows are the slot's A
        storage = rows.weight.untyped_storage().data_ptr()
        assert w.base.weight.untyped_storage().data_ptr() == storage == w.slot.A.untyped_storage().data_ptr()
    branch = lora_service.health()["lora"]["branch"]
    assert branch["path"] == "fused"
    exact_branch = branch["variants"]["exact"]
    assert exact_branch["fused_modules"] == len(wrappers)
    assert set(exact_branch["unfused_modules"]) == {"the modulation table"}
