"""The fp8 copy's module structure on CPU (as optimizations/low_precision.py builds it on a GPU, with the weights
quantised by quantize_rows), tiny-transformer inputs, and the helpers the fp8-copy LoRA tests share."""
from __future__ import annotations

import copy
from types import SimpleNamespace

import pytest
import torch

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


def run(module, x):
    with torch.no_grad():
        return module(**x)[0]


def specs(loras):
    return InferenceRequest(prompt="x", loras=[{"name": n, "scale": s} for n, s in loras]).loras


def build_merges(cache_dir, lora_dir, exact_merge: str = "0", spoil=None):
    """The exact tiny transformer and its fp8 copy with slots installed (the fused branch, the fp8 merge on, the exact
    merge as asked: FLUX_LORA_EXACT_MERGE); `spoil(fp8_copy)` runs before install. Returns (manager, the variants,
    untouched copies of both)."""
    from kontext_server.lora.manager import LoraManager
    from kontext_server.models.tiny import load_tiny

    exact = load_tiny("cpu", cache_dir).transformer.to(DTYPE).eval()
    q = fp8_copy(exact)
    if spoil is not None:
        spoil(q)
    pristine = {"exact": copy.deepcopy(exact), "fp8": copy.deepcopy(q)}
    config = SimpleNamespace(lora_dir=lora_dir, lora_fuse=None, lora_max_rank=8, max_loras=8)
    with pytest.MonkeyPatch.context() as mp:
        mp.setenv("FLUX_LORA_FUSED_BRANCH", "1")
        mp.setenv("FLUX_LORA_FP8_MERGE", "1")
        mp.setenv("FLUX_LORA_EXACT_MERGE", exact_merge)
        manager = LoraManager.create(config, exact, "cpu")
        manager.install({"exact": exact, "fp8": q})
    return manager, {"exact": exact, "fp8": q}, pristine


def assert_same_adapters_write_once(manager, tier: str) -> None:
    """The tier's merge writes nothing for the adapters it holds, and once for another scale."""
    merge = manager.merge_for(tier)
    one = specs([("style", 1.0)])
    with manager.applied(one, tier):
        pass
    n = merge.merges
    with manager.applied(one, tier) as applied:
        assert applied.switch_ms is None
    assert merge.merges == n
    with manager.applied(specs([("style", 0.5)]), tier) as applied:
        assert applied.switch_ms is not None
    assert merge.merges == n + 1
