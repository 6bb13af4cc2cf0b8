"""The fp8 copy takes the weights an fp8 file stored instead of quantising them again (optimizations/fp8/stored.py).

The low-precision optimisation needs a GPU (sm_89+); its steps up to and including torchao's quantisation are
reproduced here on the CPU: QKV fusion on the bf16 transformer, a deep copy, the single blocks' proj_out split, and
every linear it quantises given torchao's own row-wise Float8Tensor weight (what `quantize_` makes). The transformer
is loaded in bf16 from an fp8 file of the tiny model, as on the GPU.
"""
from __future__ import annotations

import copy

import pytest
import torch
from safetensors.torch import load_file, save_file

from kontext_server.models import single_file
from optimizations.fp8.stored import StoredFp8, reuse_stored_weights
from optimizations.fusions.split_proj_out import split_single_block_proj_out
from optimizations.low_precision import LowPrecision, skip_module
from optimizations.qkv_fusion import drop_unfused_projections
from tests.models.bfl_files import fp8_file


def fp8_copy(bf16: torch.nn.Module) -> torch.nn.Module:
    """LowPrecision.prepare up to torchao's quantize_, with torchao's row-wise Float8Tensor weights."""
    from torchao.quantization import Float8Tensor, PerRow

    q = copy.deepcopy(bf16)
    split_single_block_proj_out(q)
    for name, m in q.named_modules():
        if not skip_module(m, name):
            w = Float8Tensor.from_hp(m.weight.detach(), float8_dtype=torch.float8_e4m3fn, granularity=PerRow())
            m.weight = torch.nn.Parameter(w, requires_grad=False)
    return q


def load_bf16(path, tiny_dir):
    loaded = single_file.load_transformer(path, "cpu", torch.bfloat16, tiny_dir)
    t = loaded.module
    t.fuse_qkv_projections()  # the qkv_fusion optimisation, prepared before the fp8 copy
    drop_unfused_projections(t)
    weights = {n: m.weight for n, m in t.named_modules() if isinstance(m, torch.nn.Linear)}
    return t, weights, StoredFp8(row_scales=loaded.fp8.row_scales, source=path.name)


def expected_stored(stored: dict, inner: int) -> dict[str, tuple[torch.Tensor, torch.Tensor]]:
    """What each fp8 linear of the copy must hold: the file's fp8 values and row scales, by the copy's names."""
    def rows(key, sl=slice(None), cols=slice(None)):
        data, scale = stored[key]
        n = data.shape[0]
        col = torch.ones(n, 1) if scale is None else (scale.reshape(-1, 1) if scale.numel() > 1
                                                      else scale.reshape(1, 1).expand(n, 1))
        return data[sl, cols], col[sl].float()

    out = {}
    for i in range(1):
        d, b = f"double_blocks.{i}.", f"transformer_blocks.{i}."
        out |= {b + "attn.to_qkv": rows(d + "img_attn.qkv.weight"),
                b + "attn.to_added_qkv": rows(d + "txt_attn.qkv.weight"),
                b + "attn.to_out.0": rows(d + "img_attn.proj.weight"),
                b + "attn.to_add_out": rows(d + "txt_attn.proj.weight"),
                b + "ff.net.0.proj": rows(d + "img_mlp.0.weight"), b + "ff.net.2": rows(d + "img_mlp.2.weight"),
                b + "ff_context.net.0.proj": rows(d + "txt_mlp.0.weight"),
                b + "ff_context.net.2": rows(d + "txt_mlp.2.weight")}
    for i in range(2):
        s, b = f"single_blocks.{i}.", f"single_transformer_blocks.{i}."
        out |= {b + "attn.to_qkv": rows(s + "linear1.weight", slice(0, 3 * inner)),
                b + "proj_mlp": rows(s + "linear1.weight", slice(3 * inner, None)),
                b + "proj_out.attn": rows(s + "linear2.weight", cols=slice(0, inner)),
                b + "proj_out.mlp": rows(s + "linear2.weight", cols=slice(inner, None))}
    return out


def fp8_linears(q):
    return {n: m.weight for n, m in q.named_modules() if hasattr(getattr(m, "weight", None), "qdata")}


@pytest.mark.parametrize("scaling", ["row", "tensor", "none"])
def test_the_fp8_copy_holds_exactly_the_files_fp8_values_and_scales(tiny_dir, tiny_bfl, tmp_path, scaling):
    path = tmp_path / f"fp8-{scaling}.safetensors"
    stored = fp8_file(tiny_bfl, path, scaling)
    bf16, weights, stored_fp8 = load_bf16(path, tiny_dir)
    q = fp8_copy(bf16)
    linears = fp8_linears(q)
    expected = expected_stored(stored, inner=bf16.inner_dim)
    assert sorted(linears) == sorted(expected)
    # torchao's own quantisation of the upcast weights is a second rounding: values or scales differ from the file
    assert any(not torch.equal(w.qdata.view(torch.uint8), expected[n][0].view(torch.uint8))
               or not torch.equal(w.scale, expected[n][1]) for n, w in linears.items())

    note = reuse_stored_weights(q, weights, stored_fp8)

    assert note == (f"stored fp8 weights of {path.name} reused for {len(expected)} of {len(expected)} fp8 linears "
                    "(no second quantisation)")
    for name, w in linears.items():
        data, scale = expected[name]
        assert torch.equal(w.qdata.view(torch.uint8), data.contiguous().view(torch.uint8)), name
        assert torch.equal(w.scale, scale), name


def test_linears_the_file_did_not_store_in_fp8_or_that_changed_are_quantised_and_counted(tiny_dir, tiny_bfl,
                                                                                         tmp_path):
    path = tmp_path / "fp8-partly.safetensors"
    fp8_file(tiny_bfl, path, "row")
    sd = load_file(str(path))
    sd["double_blocks.0.img_mlp.2.weight"] = tiny_bfl["double_blocks.0.img_mlp.2.weight"].to(torch.bfloat16)
    del sd["double_blocks.0.img_mlp.2.weight_scale"]
    save_file(sd, str(path))
    bf16, weights, stored_fp8 = load_bf16(path, tiny_dir)
    with torch.no_grad():  # changed after loading: the stored values are no longer what the model computes with
        bf16.single_transformer_blocks[0].proj_mlp.weight[0, 0] += 0.5
    q = fp8_copy(bf16)
    note = reuse_stored_weights(q, weights, stored_fp8)
    n = len(fp8_linears(q))
    assert note == (f"stored fp8 weights of {path.name} reused for {n - 2} of {n} fp8 linears (no second "
                    "quantisation); 1 quantised from the upcast weights: not stored in fp8 by the file; 1 quantised "
                    "from the upcast weights: they no longer match the stored fp8 values")


def test_the_low_precision_detail_says_why_stored_weights_are_not_reused():
    e5m2 = StoredFp8(row_scales={}, source="f.safetensors", not_reusable="stored as float8 e5m2; the fp8 GEMMs "
                                                                         "take e4m3")
    assert LowPrecision._stored_note(None, {}, e5m2, (9, 0)) == (
        "the fp8 weights of f.safetensors quantised again from the upcast weights: stored as float8 e5m2; the fp8 "
        "GEMMs take e4m3; ")
    e4m3 = StoredFp8(row_scales={}, source="f.safetensors")
    assert "this GPU's low-precision format is MXFP4" in LowPrecision._stored_note(None, {}, e4m3, (10, 0))
    assert LowPrecision._stored_note(None, {}, None, (9, 0)) == ""
