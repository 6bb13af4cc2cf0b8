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
# AdaLN modulation linears act on one conditioning vector per step (M = 1): weight-bandwidth-bound GEMVs, where the
# fp8 GEMM with its 128-row tiles and a separate activation quantisation measured slower than bf16 (H200, edit-512:
# 3.1 vs 2.2 ms per step over 3.2 B parameters); they also set every block's scale, shift and gate.
MODULATION_SUFFIXES = (".norm1.linear", ".norm1_context.linear", ".norm.linear")


def skip_module(module: torch.nn.Module, fqn: str) -> bool:
    """True for the linears kept in bf16; every token-wise linear of the 57 blocks is quantised."""
    if not isinstance(module, torch.nn.Linear):
        return True
    if fqn in BF16_TOP_LEVEL or fqn.startswith("time_text_embed.") or fqn.endswith(MODULATION_SUFFIXES):
        return True
    # fp8 GEMMs need dimensions divisible by 16
    return module.in_features % 16 != 0 or module.out_features % 16 != 0


# A/B switch for the benchmark (FLUX_FP8_SPLIT_PROJ_OUT=0 turns it off); on by default, see SplitProjOut.
SPLIT_SINGLE_PROJ_OUT = os.environ.get("FLUX_FP8_SPLIT_PROJ_OUT", "1") != "0"


class SplitProjOut(torch.nn.Module):
    """A single block's proj_out (Linear(dim + mlp_dim -> dim)) as two linears over the two halves of its input.

    The block feeds proj_out `cat([attention_output, gelu(mlp)])`. Quantised whole, that input needs a row-wise amax
    over the 15,360-wide concatenation: inductor emits a reduction that re-reads both halves and recomputes the GELU,
    then a second kernel that quantises (5.6 ms per step at edit-512 on an H200, more than the fp8 GEMM saves).
    Split, each half gets its own row scale (finer, not coarser), the GELU half's quantisation fuses with the GELU
    as it does in the double blocks' feed-forward, and the concatenation is never needed. Same maths:
    W @ [a; m] + b == W_a @ a + (W_m @ m + b).
    """

    def __init__(self, linear: torch.nn.Linear, split: int):
        super().__init__()
        w, b = linear.weight.detach(), linear.bias
        self.split = split
        self.attn = torch.nn.Linear(split, linear.out_features, bias=False, device=w.device, dtype=w.dtype)
        self.mlp = torch.nn.Linear(linear.in_features - split, linear.out_features, bias=b is not None,
                                   device=w.device, dtype=w.dtype)
        with torch.no_grad():
            self.attn.weight.copy_(w[:, :split])
            self.mlp.weight.copy_(w[:, split:])
            if b is not None:
                self.mlp.bias.copy_(b)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.attn(x[..., : self.split]) + self.mlp(x[..., self.split:])


def split_single_block_proj_out(transformer: torch.nn.Module) -> int:
    """Replace every single block's proj_out with a SplitProjOut (in the copy that is about to be quantised)."""
    n = 0
    for block in getattr(transformer, "single_transformer_blocks", []):
        if isinstance(block.proj_out, torch.nn.Linear):
            block.proj_out = SplitProjOut(block.proj_out, block.proj_out.out_features)  # attention output is `dim`
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
                + (f"; {split} single-block proj_out split in two (attention | MLP halves)" if split else ""))
