"""Black Forest Labs' original key layout of the FLUX transformer (`double_blocks.0.img_attn.qkv.weight`, ...), as
BFL's `flux1-kontext-dev.safetensors` and ComfyUI's files use it.

What: `strip_prefix` finds the key prefix a file uses (none, or ComfyUI's `model.diffusion_model.`); `architecture`
reads the model's dimensions from the tensor shapes alone and `check_architecture` compares them with the config the
transformer is built from, so a file of another model (FLUX.1 Fill or Depth, schnell, a differently sized model, an
SD checkpoint, a LoRA, a diffusers-layout file) is refused at start-up with what differs; `to_diffusers` maps the
keys to diffusers' names.
Why diffusers' converter: the mapping is diffusers' own `convert_flux_transformer_checkpoint_to_diffusers`, the one
`FluxTransformer2DModel.from_single_file` calls. It has FLUX's width (3,072, MLP 12,288) as a constant where it
splits each single block's fused `linear1` into q, k, v and the MLP input, so `to_diffusers` makes that one split
itself at the config's width and hands the converter a placeholder of the shape it expects. At FLUX's width the
split is the same; narrower models (the tiny test model) load through the same code.
Limits: FLUX.1-dev and FLUX.1-Kontext-dev have the same architecture and keys, so a FLUX.1-dev file loads as Kontext
(and edits badly): nothing in the file tells them apart. Every operation of the mapping acts along dim 0 (row
splits, concatenations, a swap of halves), which `fp8_storage` relies on to map per-row scales the same way.
"""
from __future__ import annotations

from pathlib import Path

import torch

from kontext_server.models import ModelLoadError

PREFIXES = ("model.diffusion_model.", "diffusion_model.")  # ComfyUI checkpoints; BFL's own files have none
# Keys every FLUX transformer in BFL's layout has (relative to the prefix).
REQUIRED = ("img_in.weight", "txt_in.weight", "time_in.in_layer.weight", "vector_in.in_layer.weight",
            "double_blocks.0.img_attn.qkv.weight", "single_blocks.0.linear1.weight", "final_layer.linear.weight")
# diffusers' converter splits single blocks' linear1 at this width (single_file_utils.py, diffusers 0.42.1).
DIFFUSERS_INNER_DIM, DIFFUSERS_MLP_DIM = 3072, 12288


def strip_prefix(names) -> str:
    """The prefix of the file's transformer keys ("" for BFL's own files)."""
    names = list(names)
    for prefix in PREFIXES:
        if any(n.startswith(prefix + "double_blocks.") for n in names):
            return prefix
    return ""


def not_bfl_reason(names) -> str | None:
    """None if the keys are BFL's FLUX transformer layout, else what the file looks like instead."""
    names = list(names)
    if all(any(n == p + r for n in names for p in ("", *PREFIXES)) for r in REQUIRED):
        return None
    if any(n.startswith("transformer_blocks.") and ".attn.to_q." in n for n in names):
        return ("its keys are in diffusers' layout (transformer_blocks.*), not BFL's: point --model at a diffusers "
                "directory instead of using --transformer")
    if any("lora" in n.lower() for n in names[:200]):
        return "it looks like a LoRA (its keys name lora weights), not a whole transformer"
    if any(n.startswith(("model.diffusion_model.input_blocks.", "input_blocks.")) for n in names):
        return "it looks like a Stable Diffusion UNet (input_blocks.*), not a FLUX transformer"
    missing = [r for r in REQUIRED if not any(n == p + r for n in names for p in ("", *PREFIXES))]
    sample = ", ".join(sorted(names)[:3]) or "no tensors"
    return f"it is not a FLUX transformer in BFL's layout: no {', '.join(missing[:3])} (its keys: {sample}, ...)"


def architecture(shapes: dict[str, tuple[int, ...]]) -> dict:
    """The config values the tensor shapes fix (keys without prefix), in FluxTransformer2DModel's names."""
    def blocks(kind: str) -> int:
        return len({int(k.split(".")[1]) for k in shapes if k.startswith(kind + ".")})

    hidden = shapes["img_in.weight"][0]
    head_dim = shapes.get("double_blocks.0.img_attn.norm.query_norm.scale", (None,))[0]
    return {
        "in_channels": shapes["img_in.weight"][1],
        "num_layers": blocks("double_blocks"),
        "num_single_layers": blocks("single_blocks"),
        "attention_head_dim": head_dim,
        "num_attention_heads": hidden // head_dim if head_dim else None,
        "joint_attention_dim": shapes["txt_in.weight"][1],
        "pooled_projection_dim": shapes["vector_in.in_layer.weight"][1],
        "guidance_embeds": "guidance_in.in_layer.weight" in shapes,
    }


def _hint(key: str, found, expected) -> str:
    if key == "in_channels" and found == 384:
        return " (FLUX.1 Fill's input)"
    if key == "in_channels" and found == 128:
        return " (FLUX.1 Depth / Canny's input)"
    if key == "guidance_embeds" and not found:
        return " (no guidance embedder: FLUX.1 schnell?)"
    return ""


def check_architecture(path: Path, shapes: dict[str, tuple[int, ...]], config: dict, config_name: str) -> None:
    """ModelLoadError naming the file and each dimension that differs from `config` (a FluxTransformer2DModel
    config; `config_name` says where it came from)."""
    arch = architecture(shapes)
    diffs = [f"{k} {arch[k]}{_hint(k, arch[k], config.get(k))} where {config_name} has {config.get(k)}"
             for k in arch if config.get(k) is not None and arch[k] != config.get(k)]
    if diffs:
        raise ModelLoadError(f"{path}: wrong architecture for this pipeline: the file has " + "; ".join(diffs)
                             + ". --transformer takes a FLUX.1-Kontext-dev transformer matching --model.")


def to_diffusers(checkpoint: dict[str, torch.Tensor], config: dict) -> dict[str, torch.Tensor]:
    """BFL keys (no prefix) -> diffusers' FluxTransformer2DModel keys, through diffusers' own converter.

    Consumes `checkpoint`: each entry is moved out as it is converted (so a fused q/k/v weight is freed once its
    three parts are made, not held to the end), and what is left in it afterwards are the keys the mapping does not
    know. The values may be on any device, or on "meta" (shapes only). A missing tensor raises KeyError."""
    from diffusers.loaders.single_file_utils import convert_flux_transformer_checkpoint_to_diffusers

    inner = config["num_attention_heads"] * config["attention_head_dim"]
    mlp = int(inner * config.get("mlp_ratio", 4.0))
    singles = {}
    for key in [k for k in checkpoint if k.startswith("single_blocks.") and ".linear1." in k]:
        t = checkpoint[key]
        singles[key] = torch.split(t, (inner, inner, inner, mlp), dim=0)  # views: no copy
        # the shape the converter splits at FLUX's width; never read (its pieces are replaced below)
        checkpoint[key] = torch.empty((3 * DIFFUSERS_INNER_DIM + DIFFUSERS_MLP_DIM, *t.shape[1:]), device="meta")
    out = convert_flux_transformer_checkpoint_to_diffusers(checkpoint)
    for key, (q, k, v, m) in singles.items():
        i, suffix = key.split(".")[1], key.rsplit(".", 1)[1]
        prefix = f"single_transformer_blocks.{i}."
        out[f"{prefix}attn.to_q.{suffix}"], out[f"{prefix}attn.to_k.{suffix}"] = q, k
        out[f"{prefix}attn.to_v.{suffix}"], out[f"{prefix}proj_mlp.{suffix}"] = v, m
    return out
