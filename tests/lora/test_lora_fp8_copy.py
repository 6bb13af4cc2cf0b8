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
from kontext_server.request import InferenceRequest
from optimizations.fp8.linear import Fp8Linear, quantize_rows
from optimizations.fusions.split_proj_out import SplitProjOut, split_single_block_proj_out

DTYPE = torch.bfloat16


def _gelu_fp8(linear: torch.nn.Linear):
    from optimizations.fp8.gelu_quant import GeluFp8Linear

    q, s = quantize_rows(linear.weight.detach())
    return GeluFp8Linear(q, s, linear.bias, out_dtype=DTYPE)


def fp8_copy(exact: torch.nn.Module) -> torch.nn.Module:
    """The fp8 copy's module structure (optimizations/low_precision.py), on CPU."""
    q = copy.deepcopy(exact)
    split_single_block_proj_out(q)
    for block in q.transformer_blocks:
        attn = block.attn
        for name in ("to_q", "to_k", "to_v", "add_q_proj", "add_k_proj", "add_v_proj", "to_add_out"):
            setattr(attn, name, Fp8Linear.from_float(getattr(attn, name)))
        attn.to_out[0] = Fp8Linear.from_float(attn.to_out[0])
        for ff in (block.ff, block.ff_context):
            ff.net[0], ff.net[2] = Fp8Linear.from_float(ff.net[0].proj), _gelu_fp8(ff.net[2])
    for block in q.single_transformer_blocks:
        for name in ("to_q", "to_k", "to_v"):
            setattr(block.attn, name, Fp8Linear.from_float(getattr(block.attn, name)))
        block.proj_mlp, block.act_mlp = Fp8Linear.from_float(block.proj_mlp), torch.nn.Identity()
        assert isinstance(block.proj_out, SplitProjOut)
        split = block.proj_out
        split.attn, split.mlp = Fp8Linear.from_float(split.attn), _gelu_fp8(split.mlp)
    return q


def inputs(transformer, seed: int = 0) -> dict:
    cfg = transformer.config
    g = torch.Generator().manual_seed(seed)
    n_img, n_txt = 64, 8
    return dict(hidden_states=torch.randn(1, n_img, cfg.in_channels, generator=g).to(DTYPE),
                encoder_hidden_states=torch.randn(1, n_txt, cfg.joint_attention_dim, generator=g).to(DTYPE),
                pooled_projections=torch.randn(1, cfg.pooled_projection_dim, generator=g).to(DTYPE),
                timestep=torch.tensor([0.5]), guidance=torch.tensor([3.5]),
                img_ids=torch.stack(torch.meshgrid(torch.zeros(1), torch.arange(8.0), torch.arange(8.0),
                                                   indexing="ij"), -1).reshape(-1, 3),
                txt_ids=torch.zeros(n_txt, 3), return_dict=False)


def rel(a, b) -> float:
    a, b = a.float(), b.float()
    return float((a - b).norm() / b.norm())


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


def run(module, x):
    with torch.no_grad():
        return module(**x)[0]


def specs(loras):
    return InferenceRequest(prompt="x", loras=[{"name": n, "scale": s} for n, s in loras]).loras


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
