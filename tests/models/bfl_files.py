"""Test helpers: single-file transformers in Black Forest Labs' layout, made from a diffusers transformer.

`to_bfl` is the inverse of diffusers' `convert_flux_transformer_checkpoint_to_diffusers` key mapping, written here
independently of the product (kontext_server/models/bfl_layout.py runs diffusers' converter forwards), so a test
that round-trips through both checks the product's mapping against a second reading of it. `fp8_file` stores the
block linears in fp8 e4m3 the three ways files do: one scale per row, one per tensor (ComfyUI's "scaled fp8": a
`model.diffusion_model.` prefix, `scale_weight` / `scale_input` keys, a `scaled_fp8` marker), or no scale (a plain
cast).
"""
from __future__ import annotations

import torch
from safetensors.torch import save_file

FP8_MAX = 448.0

TOP = {"time_text_embed.timestep_embedder.linear_1": "time_in.in_layer",
       "time_text_embed.timestep_embedder.linear_2": "time_in.out_layer",
       "time_text_embed.text_embedder.linear_1": "vector_in.in_layer",
       "time_text_embed.text_embedder.linear_2": "vector_in.out_layer",
       "time_text_embed.guidance_embedder.linear_1": "guidance_in.in_layer",
       "time_text_embed.guidance_embedder.linear_2": "guidance_in.out_layer",
       "context_embedder": "txt_in", "x_embedder": "img_in", "proj_out": "final_layer.linear"}
DOUBLE = {"norm1.linear": "img_mod.lin", "norm1_context.linear": "txt_mod.lin",
          "attn.norm_q.weight": "img_attn.norm.query_norm.scale", "attn.norm_k.weight": "img_attn.norm.key_norm.scale",
          "attn.norm_added_q.weight": "txt_attn.norm.query_norm.scale",
          "attn.norm_added_k.weight": "txt_attn.norm.key_norm.scale",
          "ff.net.0.proj": "img_mlp.0", "ff.net.2": "img_mlp.2", "ff_context.net.0.proj": "txt_mlp.0",
          "ff_context.net.2": "txt_mlp.2", "attn.to_out.0": "img_attn.proj", "attn.to_add_out": "txt_attn.proj"}
SINGLE = {"norm.linear": "modulation.lin", "attn.norm_q.weight": "norm.query_norm.scale",
          "attn.norm_k.weight": "norm.key_norm.scale", "proj_out": "linear2"}


def to_bfl(state: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """A FluxTransformer2DModel state dict in BFL's original layout. Every key must be consumed."""
    sd = dict(state)
    out = {}

    def move(src: str, dst: str) -> None:
        for suffix in ("weight", "bias"):
            if f"{src}.{suffix}" in sd:
                out[f"{dst}.{suffix}"] = sd.pop(f"{src}.{suffix}")

    def fuse(srcs: list[str], dst: str) -> None:
        for suffix in ("weight", "bias"):
            out[f"{dst}.{suffix}"] = torch.cat([sd.pop(f"{s}.{suffix}") for s in srcs])

    for src, dst in TOP.items():
        move(src, dst)
    shift_scale = {}
    for suffix in ("weight", "bias"):  # diffusers keeps (scale, shift), BFL (shift, scale)
        scale, shift = sd.pop(f"norm_out.linear.{suffix}").chunk(2, dim=0)
        shift_scale[suffix] = torch.cat([shift, scale])
        out[f"final_layer.adaLN_modulation.1.{suffix}"] = shift_scale[suffix]
    doubles = sorted({int(k.split(".")[1]) for k in sd if k.startswith("transformer_blocks.")})
    for i in doubles:
        a, b = f"transformer_blocks.{i}.", f"double_blocks.{i}."
        fuse([a + "attn.to_q", a + "attn.to_k", a + "attn.to_v"], b + "img_attn.qkv")
        fuse([a + "attn.add_q_proj", a + "attn.add_k_proj", a + "attn.add_v_proj"], b + "txt_attn.qkv")
        for src, dst in DOUBLE.items():
            if src.endswith(".weight"):
                out[b + dst] = sd.pop(a + src)
            else:
                move(a + src, b + dst)
    singles = sorted({int(k.split(".")[1]) for k in sd if k.startswith("single_transformer_blocks.")})
    for i in singles:
        a, b = f"single_transformer_blocks.{i}.", f"single_blocks.{i}."
        fuse([a + "attn.to_q", a + "attn.to_k", a + "attn.to_v", a + "proj_mlp"], b + "linear1")
        for src, dst in SINGLE.items():
            if src.endswith(".weight"):
                out[b + dst] = sd.pop(a + src)
            else:
                move(a + src, b + dst)
    assert not sd, f"keys the inverse mapping does not know: {sorted(sd)}"
    return {k: v.contiguous() for k, v in out.items()}


def is_block_linear_weight(key: str, t: torch.Tensor) -> bool:
    return key.startswith(("double_blocks.", "single_blocks.")) and key.endswith(".weight") and t.dim() == 2


def quantize(t: torch.Tensor, scaling: str) -> tuple[torch.Tensor, torch.Tensor | None]:
    """(fp8 e4m3 data, scale): "row" one scale per output row (amax / 448), "tensor" one for all, "none" a cast."""
    t = t.float()
    if scaling == "none":
        return t.clamp(-FP8_MAX, FP8_MAX).to(torch.float8_e4m3fn), None
    amax = t.abs().amax(dim=1, keepdim=True) if scaling == "row" else t.abs().amax()
    scale = amax.clamp(min=1e-12) / FP8_MAX
    return (t / scale).clamp(-FP8_MAX, FP8_MAX).to(torch.float8_e4m3fn), scale


def fp8_file(bfl: dict[str, torch.Tensor], path, scaling: str) -> dict[str, tuple[torch.Tensor, torch.Tensor | None]]:
    """Write `bfl` with its block linears in fp8 (`scaling`: row / tensor / none); returns key -> (data, scale)."""
    out, stored = {}, {}
    comfy = scaling == "tensor"  # ComfyUI's scaled-fp8 layout
    prefix = "model.diffusion_model." if comfy else ""
    for key, t in bfl.items():
        if not is_block_linear_weight(key, t):
            out[prefix + key] = t.to(torch.bfloat16)
            continue
        data, scale = quantize(t, scaling)
        stored[key] = (data, scale)
        out[prefix + key] = data
        module = key[: -len(".weight")]
        if scaling == "row":
            out[module + ".weight_scale"] = scale.reshape(-1)
        elif comfy:
            out[prefix + module + ".scale_weight"] = scale.reshape(())
            out[prefix + module + ".scale_input"] = torch.ones(())
    if comfy:
        out[prefix + "scaled_fp8"] = torch.empty(0, dtype=torch.float8_e4m3fn)
    save_file(out, str(path))
    return stored
