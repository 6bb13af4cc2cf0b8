"""Adapters for the tests, made with PEFT on the tiny transformer and saved as files a LoRA directory holds.

- `style`: rank 4, lora_alpha 8 (scale 2, from the saved PEFT config), on the attention projections (fused into
  to_qkv / to_added_qkv by the server), the attention outputs, the feed-forwards and the single blocks' proj_mlp and
  proj_out (split into halves by the server's fp8 copy and compiled bf16 path).
- `light`: rank 8, no metadata (alpha = rank, scale 1), on the AdaLN modulation linears (norm1.linear,
  norm1_context.linear, the single blocks' norm.linear, norm_out.linear: the modulation table's) and the outputs.
- `shared` and `shared_kohya`: one adapter in diffusers' layout and in kohya's (sd-scripts' BFL module names, alpha as
  a tensor), with to_q / to_k / to_v sharing one lora_A, as kohya's fused qkv module stores it.
- bad files: `corrupt` (random bytes), `truncated` (half a good file), `not_a_lora` (a safetensors file of other
  weights), `other_model` (a LoRA whose matrices do not fit this model), `big` (rank 16, over the tests' rank 8).
- `later_*`: copied into a directory after the server started: `later_style` (style's targets: slots exist),
  `later_embedder` (x_embedder: no slot), `later_corrupt`.
"""
from __future__ import annotations

from pathlib import Path

import torch
from safetensors.torch import save_file

DOUBLE_ATTN = ["attn.to_q", "attn.to_k", "attn.to_v", "attn.add_q_proj", "attn.add_k_proj", "attn.add_v_proj",
               "attn.to_out.0", "attn.to_add_out", "ff.net.0.proj", "ff.net.2", "ff_context.net.0.proj",
               "ff_context.net.2"]
SINGLE = ["attn.to_q", "attn.to_k", "attn.to_v", "proj_mlp", "proj_out"]
MODULATION = ["norm1.linear", "norm1_context.linear"]

# diffusers module (double block 0 / single block i) -> kohya (sd-scripts) key, for the modules the tiny model's
# kohya file holds. kohya stores BFL's fused modules: img_attn_qkv is to_q, to_k and to_v with one lora_down and their
# lora_ups stacked. (The single blocks' linear1, [to_q; to_k; to_v; proj_mlp], is left out: diffusers' conversion
# hard-codes the full model's widths for it.)
KOHYA_DOUBLE = {"attn.to_out.0": "img_attn_proj", "ff.net.0.proj": "img_mlp_0", "ff.net.2": "img_mlp_2",
                "norm1.linear": "img_mod_lin", "attn.to_add_out": "txt_attn_proj", "ff_context.net.0.proj": "txt_mlp_0",
                "ff_context.net.2": "txt_mlp_2", "norm1_context.linear": "txt_mod_lin"}
KOHYA_DOUBLE_QKV = {"img_attn_qkv": ("attn.to_q", "attn.to_k", "attn.to_v"),
                    "txt_attn_qkv": ("attn.add_q_proj", "attn.add_k_proj", "attn.add_v_proj")}
KOHYA_SINGLE = {"proj_out": "linear2", "norm.linear": "modulation_lin"}


def _modules(transformer, double: list[str], single: list[str], top: list[str] = ()) -> list[str]:
    names = [f"transformer_blocks.{i}.{m}" for i in range(len(transformer.transformer_blocks)) for m in double]
    names += [f"single_transformer_blocks.{i}.{m}" for i in range(len(transformer.single_transformer_blocks))
              for m in single]
    return names + list(top)


def _peft_adapter(transformer, name: str, rank: int, alpha: int, targets: list[str], seed: int,
                  share_qkv_a: bool = False) -> tuple[dict, dict]:
    """(state dict in diffusers' names, the PEFT LoraConfig as a dict) of a new random adapter."""
    from peft import LoraConfig
    from peft.utils import get_peft_model_state_dict

    torch.manual_seed(seed)
    config = LoraConfig(r=rank, lora_alpha=alpha, target_modules=targets, init_lora_weights=False)
    transformer.add_adapter(config, adapter_name=name)
    sd = {k: v.detach().clone() for k, v in get_peft_model_state_dict(transformer, adapter_name=name).items()}
    transformer.delete_adapters(name)
    sd = {k: v * 0.5 for k, v in sd.items()}  # visible but moderate on the tiny model's random weights
    if share_qkv_a:
        for k in list(sd):
            for first, others in (("to_q", ("to_k", "to_v")), ("add_q_proj", ("add_k_proj", "add_v_proj"))):
                if f".{first}.lora_A" in k:
                    for o in others:
                        sd[k.replace(first, o)] = sd[k].clone()
    meta = {"r": rank, "lora_alpha": alpha, "target_modules": sorted(targets)}
    return sd, meta


def save_diffusers(path: Path, sd: dict, meta: dict | None) -> None:
    from diffusers import FluxKontextPipeline

    FluxKontextPipeline.save_lora_weights(path.parent, transformer_lora_layers=sd, weight_name=path.name,
                                          transformer_lora_adapter_metadata=meta)


def to_kohya(sd: dict, rank: int, alpha: float) -> dict:
    """diffusers' names -> kohya's: lora_unet_<BFL module>.lora_down / lora_up / alpha. Written for the modules in
    KOHYA_*; anything else in `sd` is an error (a test adapter the mapping does not cover)."""
    out, used = {}, set()

    def put(kohya: str, down: torch.Tensor, up: torch.Tensor) -> None:
        out[f"lora_unet_{kohya}.lora_down.weight"] = down.contiguous()
        out[f"lora_unet_{kohya}.lora_up.weight"] = up.contiguous()
        out[f"lora_unet_{kohya}.alpha"] = torch.tensor(float(alpha))

    blocks = {int(k.split(".")[1]) for k in sd if k.startswith("transformer_blocks.")}
    singles = {int(k.split(".")[1]) for k in sd if k.startswith("single_transformer_blocks.")}
    for i in blocks:
        pre = f"transformer_blocks.{i}."
        for module, kohya in KOHYA_DOUBLE.items():
            if pre + module + ".lora_A.weight" in sd:
                put(f"double_blocks_{i}_{kohya}", sd[pre + module + ".lora_A.weight"],
                    sd[pre + module + ".lora_B.weight"])
                used |= {pre + module + ".lora_A.weight", pre + module + ".lora_B.weight"}
        for kohya, parts in KOHYA_DOUBLE_QKV.items():
            keys = [pre + p for p in parts]
            if keys[0] + ".lora_A.weight" in sd:
                down = sd[keys[0] + ".lora_A.weight"]
                for k in keys:
                    assert torch.equal(sd[k + ".lora_A.weight"], down), "kohya's qkv has one lora_down"
                put(f"double_blocks_{i}_{kohya}", down, torch.cat([sd[k + ".lora_B.weight"] for k in keys]))
                used |= {k + s for k in keys for s in (".lora_A.weight", ".lora_B.weight")}
    for i in singles:
        pre = f"single_transformer_blocks.{i}."
        for module, kohya in KOHYA_SINGLE.items():
            if pre + module + ".lora_A.weight" in sd:
                put(f"single_blocks_{i}_{kohya}", sd[pre + module + ".lora_A.weight"],
                    sd[pre + module + ".lora_B.weight"])
                used |= {pre + module + ".lora_A.weight", pre + module + ".lora_B.weight"}
    assert used == set(sd), f"no kohya name for {sorted(set(sd) - used)[:3]}"
    return out


def make_library(cache_dir: Path, out: Path) -> Path:
    from kontext_server.models.tiny import load_tiny

    transformer = load_tiny("cpu", cache_dir).transformer
    style, style_meta = _peft_adapter(transformer, "style", 4, 8, _modules(transformer, DOUBLE_ATTN, SINGLE), 1)
    save_diffusers(out / "style.safetensors", style, style_meta)
    light, _ = _peft_adapter(transformer, "light", 8, 8, _modules(
        transformer, MODULATION + ["attn.to_out.0", "attn.to_add_out"], ["norm.linear", "proj_out"],
        ["norm_out.linear"]), 2)
    save_diffusers(out / "light.safetensors", light, None)  # no metadata, no alphas: scale 1
    shared_targets = _modules(transformer, list(KOHYA_DOUBLE) + [p for ps in KOHYA_DOUBLE_QKV.values() for p in ps],
                              list(KOHYA_SINGLE))
    shared, shared_meta = _peft_adapter(transformer, "shared", 4, 2, shared_targets, 3, share_qkv_a=True)
    save_diffusers(out / "shared.safetensors", shared, shared_meta)
    save_file(to_kohya(shared, 4, 2), str(out / "shared_kohya.safetensors"))
    big, big_meta = _peft_adapter(transformer, "big", 16, 16, _modules(transformer, ["attn.to_out.0"], []), 4)
    save_diffusers(out / "big.safetensors", big, big_meta)
    # bad files
    good = (out / "style.safetensors").read_bytes()
    (out / "corrupt.safetensors").write_bytes(bytes(range(256)) * 8)
    (out / "truncated.safetensors").write_bytes(good[: len(good) // 2])
    save_file({"some_layer.weight": torch.randn(4, 4)}, str(out / "not_a_lora.safetensors"))
    other = {"transformer.transformer_blocks.0.attn.to_out.0.lora_A.weight": torch.randn(4, 3072),
             "transformer.transformer_blocks.0.attn.to_out.0.lora_B.weight": torch.randn(3072, 4)}
    save_file(other, str(out / "other_model.safetensors"))
    # files a test adds after start-up
    (out / "later_style.safetensors").write_bytes(good)
    emb, emb_meta = _peft_adapter(transformer, "emb", 4, 4, ["x_embedder"], 5)
    save_diffusers(out / "later_embedder.safetensors", emb, emb_meta)
    (out / "later_corrupt.safetensors").write_bytes(good[: len(good) // 3])
    return out
