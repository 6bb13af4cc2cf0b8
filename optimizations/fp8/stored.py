"""The fp8 copy takes the weights a transformer file stored in fp8 instead of quantising them a second time.

What: a transformer loaded from an fp8 e4m3 file (kontext_server/models/fp8_storage.py) holds its weights upcast,
W = bf16(fp8 * s), with one scale s per output row (a per-tensor scale is that scale on every row; an unscaled file
has s = 1). The fp8 copy quantises every token-wise linear row-wise (torchao, scale = row amax / 448); quantising W
again rounds the stored values onto another grid, a second loss. `reuse_stored_weights` runs right after torchao
has quantised the copy and, for each row-scaled fp8 linear whose weight the file stored in fp8, puts the stored
values and scales in place of torchao's: data = fp8(W / s), exact, because W / s differs from the stored value by
less than bf16's rounding, far below fp8's spacing. Each linear is checked (fp8(W / s) * s must give W back, bit
for bit); one that does not is left as torchao quantised it, and counted.
Names: the scales are kept under the linears' names as loaded. QKV fusion (prepared before the fp8 copy) joins
to_q / to_k / to_v into to_qkv (add_*_proj into to_added_qkv): their scales are joined the same way. The fp8 single
blocks' proj_out is split into two halves by input columns (fusions/split_proj_out.py): both keep its row scales.
Contract: returns the report line the low-precision detail carries: how many linears took the stored weights and
why any did not.
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import Mapping

import torch

from optimizations.fp8.linear import FP8_MAX, is_torchao_row_scaled_fp8

FUSED = {"to_qkv": ("to_q", "to_k", "to_v"), "to_added_qkv": ("add_q_proj", "add_k_proj", "add_v_proj")}
SPLIT_HALVES = ("attn", "mlp")  # SplitProjOut's two linears


@dataclass
class StoredFp8:
    """What the transformer's file stored in fp8 (the service fills it from the loaded model)."""
    row_scales: Mapping[str, torch.Tensor]  # linear name as loaded -> (out_features, 1) fp32: W = bf16(fp8 * s)
    source: str  # the file
    not_reusable: str | None = None  # why the stored values cannot be taken as they are (e.g. e5m2), or None


def scales_for(name: str, row_scales: Mapping[str, torch.Tensor]) -> torch.Tensor | None:
    """The stored row scales of the fp8 copy's linear `name`, through QKV fusion and the proj_out split."""
    if name in row_scales:
        return row_scales[name]
    parent, _, leaf = name.rpartition(".")
    if leaf in SPLIT_HALVES and parent.endswith("proj_out"):
        return row_scales.get(parent)
    if leaf in FUSED:
        parts = [f"{parent}.{p}" for p in FUSED[leaf]]
        if all(p in row_scales for p in parts):
            return torch.cat([row_scales[p] for p in parts])
    return None


def source_weight(name: str, copy: torch.nn.Module, bf16_weights: Mapping[str, torch.Tensor]) -> torch.Tensor | None:
    """The bf16 transformer's weight that the copy's linear `name` was quantised from (a proj_out half: its columns)."""
    if name in bf16_weights:
        return bf16_weights[name]
    parent, _, leaf = name.rpartition(".")
    if leaf in SPLIT_HALVES and parent in bf16_weights:
        split = copy.get_submodule(parent).attn.in_features
        w = bf16_weights[parent]
        return w[:, :split] if leaf == "attn" else w[:, split:]
    return None


def recover(weight: torch.Tensor, scale: torch.Tensor) -> torch.Tensor | None:
    """fp8(weight / scale) if it gives `weight` back exactly through the upcast (fp8 * scale, rounded once), else
    None."""
    if not bool(torch.isfinite(scale).all()) or not bool((scale > 0).all()):
        return None
    data = (weight.float() / scale).clamp(-FP8_MAX, FP8_MAX).to(torch.float8_e4m3fn)
    return data if torch.equal((data.float() * scale).to(weight.dtype), weight) else None


def reuse_stored_weights(copy: torch.nn.Module, bf16_weights: Mapping[str, torch.Tensor], stored: StoredFp8) -> str:
    """Put the stored fp8 values and scales into the torchao-quantised `copy` (see the module docstring).
    `bf16_weights`: the bf16 transformer's linear weights by name. Returns the report line."""
    reused, not_stored, no_source, differ = 0, 0, 0, 0
    for name, module in copy.named_modules():
        if not is_torchao_row_scaled_fp8(module):
            continue
        scale, weight = scales_for(name, stored.row_scales), source_weight(name, copy, bf16_weights)
        w = module.weight
        if scale is None:
            not_stored += 1
            continue
        if weight is None or tuple(weight.shape) != tuple(w.qdata.shape):
            no_source += 1
            continue
        scale = scale.to(weight.device)
        data = recover(weight, scale)
        if data is None:
            differ += 1
            continue
        with torch.no_grad():
            w.qdata.copy_(data)
            w.scale.copy_(scale.reshape(w.scale.shape))
        reused += 1
    total = reused + not_stored + no_source + differ
    line = (f"stored fp8 weights of {stored.source} reused for {reused} of {total} fp8 linears "
            "(no second quantisation)")
    if not_stored:
        line += f"; {not_stored} quantised from the upcast weights: not stored in fp8 by the file"
    if no_source:
        line += f"; {no_source} quantised as they were: no bf16 weight of that name to recover the stored values from"
    if differ:
        line += f"; {differ} quantised from the upcast weights: they no longer match the stored fp8 values"
    return line


def not_reused(stored: StoredFp8, why: str) -> str:
    return f"the fp8 weights of {stored.source} quantised again from the upcast weights: {why}"
