"""The memory-tier planner (kontext_server/service/memory_tiers.py): what each budget keeps on the GPU, for the full
model's sizes, and how a request on an offloaded transformer is planned."""
from __future__ import annotations

import dataclasses

import pytest

from kontext_server.service import memory_tiers as mt
from kontext_server.service.memory_tiers import ComponentSizes, TransformerSizes

GB = 2**30
# The full FLUX.1-Kontext-dev's sizes, as memory_sizes.measure gives them on a meta-device build of the real configs
# (test_the_sizes_measured_on_the_full_configs_are_these checks it): bf16 weights, the fp8 copy estimated, the
# working memory of a 1024x1024 edit.
FULL = ComponentSizes(
    transformer=TransformerSizes(total=23802816640, outside_blocks=128249984, largest_block=679662592,
                                 modulation=6494896128),
    transformer_fp8=TransformerSizes(total=15204042880, outside_blocks=128249984, largest_block=453391360,
                                     modulation=6494896128),
    text_encoder_2=9524621312, text_encoder_2_largest_leaf=263192576, text_encoder=246121576, vae=167639366,
    step_working=1283457024, text_working=41943040, vae_decode_per_pixel=1536, design_pixels=1024 * 1024,
    design="a 1024x1024 edit (8,704 tokens)")


def tier(spec: str, sizes: ComponentSizes = FULL, fp8: bool = True, modulation_table: bool = True) -> mt.MemoryTier:
    return mt.plan_tier(mt.parse_budget(spec).bytes, sizes, fp8=fp8, modulation_table=modulation_table, spec=spec)


def where(t: mt.MemoryTier) -> dict[str, str]:
    return {name: ("resident, modulation on host" if p.modulation_on_host else p.where)
            for name, p in t.placements.items()}


def test_a_budget_that_holds_everything_keeps_everything_resident():
    t = tier("80GB")
    assert set(where(t).values()) == {"resident"} and t.offloaded() == {} and t.vae_tile is None
    assert t.peak_estimate <= t.budget


def test_a_24gb_budget_keeps_the_fp8_transformer_resident_and_streams_t5_and_the_exact_copy():
    t = tier("24GB")
    assert where(t) == {"vae": "resident", "text_encoder": "resident", "transformer_fp8": "resident",
                        "text_encoder_2": "offloaded", "transformer": "offloaded"}
    assert "block level" in t.placements["transformer"].how and "CUDA streams" in t.placements["transformer"].how
    assert "leaf level" in t.placements["text_encoder_2"].how
    assert "the same image" in t.placements["transformer"].why  # offloaded rather than refused, and why
    assert t.vae_tile is None and t.resident_bytes < t.budget


def test_a_16gb_budget_keeps_only_the_fp8_transformer_resident_with_its_modulation_weights_on_the_host():
    t = tier("16GB")
    assert where(t)["transformer_fp8"] == "resident, modulation on host"
    assert [n for n, p in t.placements.items() if p.resident] == ["vae", "text_encoder", "transformer_fp8"]
    fp8 = FULL.transformer_fp8
    assert t.placements["transformer_fp8"].device_bytes == fp8.total - fp8.modulation
    assert "once per request" in t.placements["transformer_fp8"].how


def test_without_the_modulation_table_the_16gb_budget_streams_the_fp8_transformer():
    t = tier("16GB", modulation_table=False)  # the modulation weights are read every step: they cannot stay behind
    assert where(t)["transformer_fp8"] == "offloaded"


def test_a_budget_below_the_fp8_transformer_streams_it_block_by_block():
    t = tier("8GB")
    assert where(t)["transformer_fp8"] == "offloaded"
    assert t.placements["transformer_fp8"].device_bytes == FULL.transformer_fp8.streamed
    assert t.peak_estimate <= t.budget


def test_a_budget_too_small_for_even_the_streamed_model_is_refused_with_the_minimum_it_needs():
    with pytest.raises(mt.BudgetTooSmall) as exc:
        tier("2GB")
    message = str(exc.value)
    assert message.startswith("--memory-budget (FLUX_MEMORY_BUDGET) 2GB") and "needs" in message
    assert "streamed block by block" in message and "1024x1024 edit" in message


def test_without_an_fp8_copy_the_exact_transformer_is_the_main_one():
    t = tier("32GB", fp8=False)  # a CPU, or a GPU without fp8 tensor cores
    assert "transformer_fp8" not in t.placements
    assert where(t) == {"vae": "resident", "text_encoder": "resident", "transformer": "resident",
                        "text_encoder_2": "offloaded"}
    assert where(tier("16GB", fp8=False))["transformer"] == "offloaded"


def test_t5_is_made_resident_only_where_the_whole_vae_decode_still_fits_beside_it():
    t5 = FULL.text_encoder_2
    used = FULL.vae + FULL.text_encoder + FULL.transformer_fp8.total
    # room for T5 and the step's working memory, but not for T5 and the whole decode: T5 is streamed
    budget = int((used + t5 + FULL.vae_decode() - 1) / (1 - mt.MARGIN_FRACTION))
    t = mt.plan_tier(budget, FULL, fp8=True, modulation_table=True)
    assert FULL.vae_decode() > FULL.step_working and where(t)["text_encoder_2"] == "offloaded"
    assert t.vae_tile is None


def test_the_vae_is_tiled_only_when_its_whole_decode_does_not_fit():
    big = dataclasses.replace(FULL, design_pixels=2048 * 2048, design="a 2048x2048 text-to-image")
    small_budget = int((FULL.vae + FULL.text_encoder + FULL.transformer_fp8.total - FULL.transformer_fp8.modulation
                        + FULL.step_working + 1) / (1 - mt.MARGIN_FRACTION))
    t = mt.plan_tier(small_budget, big, fp8=True, modulation_table=True)
    assert t.vae_tile in mt.VAE_TILES and "tiles of" in t.vae_why and "decode whole" in t.vae_why
    assert tier("80GB", big).vae_tile is None


def test_offloaded_components_and_how_are_what_the_optimisations_are_told():
    t = tier("24GB")
    assert set(t.offloaded()) == {"text_encoder_2", "transformer"}
    d = t.as_dict()
    assert d["budget"] == "24GB" and d["budget_gib"] == 24.0 and d["placements"]["transformer_fp8"]["where"] == \
        "resident"
    assert "why" in d["placements"]["text_encoder_2"] and d["vae"]["tiled"] is False
    assert "text_encoder_2 offloaded" in d["summary"]


def test_on_a_device_without_streams_the_placements_say_so():
    t = mt.plan_tier(16 * GB, FULL, fp8=False, modulation_table=True, streams=False)
    assert "no streams" in t.placements["transformer"].how


@pytest.mark.parametrize("spec, expected", [("24GB", 24 * GB), ("16gib", 16 * GB), ("12000MB", 12000 * 2**20),
                                            ("1.5 GB", int(1.5 * GB)), ("512KiB", 512 * 1024)])
def test_budget_sizes_are_read_with_their_unit(spec, expected):
    assert mt.parse_budget(spec).bytes == expected


def test_auto_and_unset_budgets():
    assert mt.parse_budget("auto").auto and mt.parse_budget("AUTO").bytes is None
    assert mt.parse_budget(None) is None and mt.parse_budget("") is None


@pytest.mark.parametrize("spec", ["lots", "24", "24 parsecs", "0GB", "-3GB"])
def test_a_budget_that_is_not_a_size_is_refused_naming_the_setting(spec):
    with pytest.raises(ValueError, match=r"--memory-budget \(FLUX_MEMORY_BUDGET\)"):
        mt.parse_budget(spec)


def test_the_sizes_measured_on_the_full_configs_are_these():
    from kontext_server.service import memory_sizes

    assert memory_sizes.measure(memory_sizes.meta_pipeline(), fp8=True) == FULL


def test_the_design_request_is_the_largest_warmup_shape():
    from kontext_server.service import memory_sizes

    assert memory_sizes.design_request([]) == (1024, 1024, 1)
    # by tokens: a 768x768 edit (2 x 2,304) is longer than a 1024x1024 text-to-image (4,096)
    assert memory_sizes.design_request([(1024, 1024, False), (768, 768, True), (512, 512, 2)]) == (768, 768, 1)
    assert memory_sizes.design_request([(1024, 1024), (1024, 1024, 2)]) == (1024, 1024, 2)


# ---- planning a request on an offloaded transformer ---------------------------------------------------------------
def _plan(flags: dict, offloaded: dict | None, strict: bool = False):
    from kontext_server.service.planner import plan
    from kontext_server.service.runner import Runner
    from optimizations.base import DeviceInfo
    from optimizations.registry import build_registry

    registry = build_registry()
    prepared = {n: "prepared" for n in ("qkv_fusion", "modulation_table", "first_block_cache", "low_precision",
                                        "dpm_solver", "cuda_graphs")}
    gpu = DeviceInfo("cuda", "NVIDIA H100 80GB HBM3", (9, 0))
    return plan(flags, registry, prepared, gpu, strict=strict, offloaded=offloaded,
                precision_of=lambda d: Runner.precision(d, registry))


def test_a_request_on_an_offloaded_transformer_runs_without_cuda_graphs_and_says_why():
    offloaded = tier("24GB").offloaded()  # the exact transformer is streamed, the fp8 one resident
    exact = _plan({}, offloaded)
    assert not exact["cuda_graphs"].applied and "fixed weight addresses" in exact["cuda_graphs"].detail
    assert "offloaded under --memory-budget" in exact["cuda_graphs"].detail
    fast = _plan({"low_precision": True, "dpm_solver": True}, offloaded)
    assert fast["cuda_graphs"].applied and fast["low_precision"].applied  # the resident fp8 one keeps its graphs
    cached = _plan({"first_block_cache": True}, offloaded)
    assert not cached["first_block_cache"].applied and "forward" in cached["first_block_cache"].detail


def test_a_strict_request_for_what_cannot_run_offloaded_is_refused():
    from kontext_server.service.planner import StrictError

    with pytest.raises(StrictError, match="use_cuda_graphs"):
        _plan({"cuda_graphs": True}, tier("24GB").offloaded(), strict=True)


def test_without_a_budget_the_plan_is_what_it_was():
    assert _plan({}, None) == _plan({}, {}) and _plan({}, None)["cuda_graphs"].applied
