"""Low-precision GEMMs (`use_mxfp4`): the fastest low-precision matmul path this GPU has, via torchao.

- sm_89 / sm_90 (Ada, Hopper): float8 e4m3, row-wise dynamic scales for activations and weights
  (`Float8DynamicActivationFloat8WeightConfig(PerRow())`). Hopper has no FP4 tensor cores.
- sm_100+ (Blackwell): MXFP4 through `torchao.prototype.mx_formats`.
- anywhere else: unavailable, with the reason. torchmx is not used (DESIGN.md: pins old deps, emulates only).

The quantised transformer is a separate copy: the bf16 weights stay, so a request without the flag gets the
exact bf16 model. Lossy: fidelity against bf16 is reported by the benchmark and the GPU tests.
"""
from __future__ import annotations

import copy
import os
import types

import torch

from .base import DeviceInfo, Optimization


def quant_config(capability: tuple[int, int]):
    if capability >= (10, 0):
        from torchao.prototype.mx_formats import MXDynamicActivationMXWeightConfig

        return MXDynamicActivationMXWeightConfig(activation_dtype=torch.float4_e2m1fn_x2,
                                                 weight_dtype=torch.float4_e2m1fn_x2), "MXFP4 (torchao mx_formats)"
    from torchao.quantization import Float8DynamicActivationFloat8WeightConfig, PerRow

    # set_inductor_config=False: torchao's default switches coordinate-descent tuning on process-wide, which made
    # every later compile (bf16 included) several times slower and silently overrode the operator's inductor preset.
    return Float8DynamicActivationFloat8WeightConfig(granularity=PerRow(), set_inductor_config=False), \
        "float8 e4m3, row-wise dynamic activation + weight scales (torchao)"


# Linears that stay in bf16, by exact name (top level of FluxTransformer2DModel): the embedders and the final
# projection are tiny and precision-critical. Matched exactly: a substring test would also catch the 38 single
# blocks' own `proj_out` (15360 -> 3072, their largest GEMM), which a 2026-11-21 profile found left in bf16.
BF16_TOP_LEVEL = ("x_embedder", "context_embedder", "proj_out", "norm_out.linear")
# AdaLN modulation linears act on one conditioning vector per step (M = 1) and produce every block's scale, shift
# and gate, so an error there scales whole activations: kept in bf16 for precision. Measured cost (H200, edit-512
# profiles): 2.1 ms per step as bf16 GEMVs vs 1.8 ms as fp8 GEMMs including their activation quantisation.
MODULATION_SUFFIXES = (".norm1.linear", ".norm1_context.linear", ".norm.linear")


def skip_module(module: torch.nn.Module, fqn: str) -> bool:
    """True for the linears kept in bf16; every token-wise linear of the 57 blocks is quantised."""
    if not isinstance(module, torch.nn.Linear):
        return True
    if fqn in BF16_TOP_LEVEL or fqn.startswith("time_text_embed.") or fqn.endswith(MODULATION_SUFFIXES):
        return True
    # fp8 GEMMs need dimensions divisible by 16
    return module.in_features % 16 != 0 or module.out_features % 16 != 0


# A/B switch for the benchmark (FLUX_FP8_SPLIT_PROJ_OUT=0 turns it off).
SPLIT_SINGLE_PROJ_OUT = os.environ.get("FLUX_FP8_SPLIT_PROJ_OUT", "1") != "0"


class SplitProjOut(torch.nn.Module):
    """A single block's proj_out (Linear(dim + mlp_dim -> dim)) as two linears, one per half of its input:
    W @ [a; m] + b == W_a @ a + (W_m @ m + b). Each half then gets its own row-wise fp8 scale (finer, not coarser)."""

    def __init__(self, linear: torch.nn.Linear, split: int):
        super().__init__()
        w, b = linear.weight.detach(), linear.bias
        self.attn = torch.nn.Linear(split, linear.out_features, bias=False, device=w.device, dtype=w.dtype)
        self.mlp = torch.nn.Linear(linear.in_features - split, linear.out_features, bias=b is not None,
                                   device=w.device, dtype=w.dtype)
        with torch.no_grad():
            self.attn.weight.copy_(w[:, :split])
            self.mlp.weight.copy_(w[:, split:])
            if b is not None:
                self.mlp.bias.copy_(b)

    def forward(self, attn_output: torch.Tensor, mlp_output: torch.Tensor) -> torch.Tensor:
        return self.attn(attn_output) + self.mlp(mlp_output)


def _single_block_forward_without_concat(self, hidden_states, encoder_hidden_states, temb, image_rotary_emb=None,
                                         joint_attention_kwargs=None):
    """FluxSingleTransformerBlock.forward (diffusers 0.42.1) with `proj_out(cat([attn, mlp]))` replaced by the two
    halves of a SplitProjOut. Why: quantising the 15,360-wide concatenation needs a row-wise amax over both halves;
    inductor emitted it as a reduction that recomputes the GELU plus a separate cast kernel (5.6 ms per step at
    edit-512 on an H200). Without the concatenation the MLP half's quantisation fuses with its GELU, as it does in
    the double blocks' feed-forward. (Splitting proj_out alone, keeping the concatenation, measured slower:
    inductor materialised the concatenation and sliced it.)"""
    text_seq_len = encoder_hidden_states.shape[1]
    hidden_states = torch.cat([encoder_hidden_states, hidden_states], dim=1)
    residual = hidden_states
    norm_hidden_states, gate = self.norm(hidden_states, emb=temb)
    mlp_hidden_states = self.act_mlp(self.proj_mlp(norm_hidden_states))
    attn_output = self.attn(hidden_states=norm_hidden_states, image_rotary_emb=image_rotary_emb,
                            **(joint_attention_kwargs or {}))
    hidden_states = residual + gate.unsqueeze(1) * self.proj_out(attn_output, mlp_hidden_states)
    if hidden_states.dtype == torch.float16:
        hidden_states = hidden_states.clip(-65504, 65504)
    return hidden_states[:, :text_seq_len], hidden_states[:, text_seq_len:]


def split_single_block_proj_out(transformer: torch.nn.Module) -> int:
    """In the copy about to be quantised: every single block's proj_out becomes a SplitProjOut and the block's
    forward skips the concatenation. Returns how many blocks were changed."""
    n = 0
    for block in getattr(transformer, "single_transformer_blocks", []):
        if isinstance(block.proj_out, torch.nn.Linear):
            block.proj_out = SplitProjOut(block.proj_out, block.proj_out.out_features)  # attention output is `dim`
            block.forward = types.MethodType(_single_block_forward_without_concat, block)
            n += 1
    return n


class LowPrecision(Optimization):
    name, flag, load_time, lossy = "low_precision", "use_mxfp4", True, True

    def available(self, device: DeviceInfo) -> str | None:
        if not device.is_cuda:
            return "low-precision GEMMs need a CUDA GPU (fp8 needs sm_89+, MXFP4 sm_100+)"
        if device.capability < (8, 9):
            return f"{device.name} (sm_{device.capability[0]}{device.capability[1]}) has no fp8 or fp4 tensor cores"
        return None

    def prepare(self, service) -> str:
        from torchao.quantization import quantize_

        from .compile import restore_compiled, strip_compiled

        cfg, desc = quant_config(service.device_info.capability)
        bf16 = service.transformer_variants["bf16"]
        saved = strip_compiled(bf16)  # copy the weights, not bf16's compiled code
        try:
            q = copy.deepcopy(bf16)  # an installed first-block cache is copied as its own (see its __deepcopy__)
        finally:
            restore_compiled(saved)
        split = split_single_block_proj_out(q) if SPLIT_SINGLE_PROJ_OUT else 0
        quantize_(q, cfg, filter_fn=lambda m, fqn: not skip_module(m, fqn))
        if "compile" in service.prepared:  # prepared after compile (the benchmark's stage order): compile it too
            service.registry["compile"].compile_transformer(q)
        service.transformer_variants["fp8"] = q
        self.description = desc
        return (f"{desc}; separate copy, bf16 kept for exact requests"
                + (f"; {split} single blocks without the proj_out concatenation" if split else ""))
