"""Low-precision GEMMs (`use_mxfp4`): the fastest low-precision matmul path this GPU has, via torchao.

- sm_89 / sm_90 (Ada, Hopper): float8 e4m3, row-wise dynamic scales for activations and weights
  (`Float8DynamicActivationFloat8WeightConfig(PerRow())`). Hopper has no FP4 tensor cores.
- sm_100+ (Blackwell): MXFP4 through `torchao.prototype.mx_formats`.
- anywhere else: unavailable, with the reason. torchmx is not used (docs/design.md: it pins old dependencies
  and only emulates MX formats).

Quantised: every token-wise linear of the 57 blocks (the single blocks' proj_out as two halves, see
split_proj_out.py; the linears after a GELU quantise their input in one fused pass, see fp8/gelu_quant.py;
torchao quantises, then every quantised linear becomes a plain module, see fp8/linear.py; the norms and the
attention output hand the linears fp8 rows quantised in the same pass, see fp8/norm_quant.py);
kept bf16: embedders, final projection, per-step modulation linears (see skip_module).
The quantised transformer is a separate copy: the bf16 weights stay, so a request without the flag gets the
exact bf16 model. Lossy: fidelity against bf16 is reported by the benchmark and the GPU tests.

Under a memory budget (kontext_server/service/memory_tiers.py) the exact weights may live in host memory: the copy
is then made there, each linear is quantised on the device (`Components.quantise_device`) and kept where the tier will
hold the copy (`Components.variant_homes`), so the device never holds more than the tier allows; the service puts
the rest of the copy where the tier says.

A transformer loaded from an fp8 e4m3 file (`--transformer`): right after torchao quantises, every linear the file
stored in fp8 takes the stored values and scales instead (fp8/stored.py), so the file's fp8 weights are not quantised
a second time; the detail says how many did, or why they were not (an e5m2 file, an MXFP4 GPU).
"""
from __future__ import annotations

import copy

import torch

from optimizations.fusions import gelu_epilogue, split_proj_out
from optimizations.base import Components, DeviceInfo, EXACT, Optimization, RunContext
from optimizations.fp8.gelu_quant import fuse_gelu_into_quantisation
from optimizations.fp8.linear import unwrap_torchao_linears
from optimizations.fp8.stored import not_reused, reuse_stored_weights
from optimizations.fp8.norm_quant import fuse_norm_quantisation
from optimizations.fusions.split_proj_out import split_single_block_proj_out
from optimizations.modulation_table import MODULATION_SUFFIXES


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
# profiles): 2.1 ms per step as bf16 GEMVs vs 1.8 ms as fp8 GEMMs including their activation quantisation. With the
# modulation table (modulation_table.py) they run once per request instead of once per step.


def skip_module(module: torch.nn.Module, fqn: str) -> bool:
    """True for the linears kept in bf16; every token-wise linear of the 57 blocks is quantised."""
    if not isinstance(module, torch.nn.Linear):
        return True
    if fqn in BF16_TOP_LEVEL or fqn.startswith("time_text_embed.") or fqn.endswith(MODULATION_SUFFIXES):
        return True
    # fp8 GEMMs need dimensions divisible by 16
    return module.in_features % 16 != 0 or module.out_features % 16 != 0


def quantise_one_by_one(q: torch.nn.Module, cfg, device: str, home: str) -> int:
    """Quantise `q`'s linears one at a time: each moved to `device`, quantised there and kept on `home`; the rest of
    `q` stays where it is. torchao's own `quantize_(..., device=)` would move every parent module after its children,
    so the whole copy would sit on the device at once. Returns how many were quantised."""
    from torchao.quantization import quantize_

    n = 0
    for fqn, m in list(q.named_modules()):
        if isinstance(m, torch.nn.Linear) and not skip_module(m, fqn):
            quantize_(m.to(device), cfg, filter_fn=lambda *_: True)  # in place: the weight becomes a Float8Tensor
            m.to(home)
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

    def prepare(self, components: Components) -> str:
        from torchao.quantization import quantize_

        from optimizations.compile import restore_compiled, strip_compiled

        cfg, desc = quant_config(components.device_info.capability)
        bf16 = components.variants[EXACT]
        stored = components.stored_fp8
        saved = strip_compiled(bf16)  # copy the weights, not bf16's compiled code
        try:
            q = copy.deepcopy(bf16)  # an installed first-block cache is copied as its own (see its __deepcopy__)
            # the weights the stored fp8 values are recovered from, by name (references: no copy)
            bf16_weights = ({n: m.weight for n, m in bf16.named_modules() if isinstance(m, torch.nn.Linear)}
                            if stored is not None else {})
        finally:
            restore_compiled(saved)
        gelu_epilogue.remove(q)  # the bf16 GELU epilogue, if on: this copy fuses its GELU into the fp8 quantisation
        split_proj_out.remove(q)  # the bf16 rewrite (weight views), if on: this copy splits proj_out itself, or not
        split_note = split_single_block_proj_out(q)  # before quantising: the two halves are quantised separately
        device = getattr(components, "quantise_device", None)
        if device is None:
            quantize_(q, cfg, filter_fn=lambda m, fqn: not skip_module(m, fqn))
        else:  # a memory budget: the exact weights live on the host
            quantise_one_by_one(q, cfg, device, getattr(components, "variant_homes", {}).get("fp8", device))
        stored_note = self._stored_note(q, bf16_weights, stored, components.device_info.capability)
        del bf16_weights
        gelu_note = fuse_gelu_into_quantisation(q)  # after quantising: it takes torchao's fp8 weights
        plain_note = unwrap_torchao_linears(q)  # every quantised linear the GELU fusion did not take
        norm_note = fuse_norm_quantisation(q)  # last: it takes Fp8Linears as the consumers of its fp8 rows
        components.add_variant("fp8", q)  # optimisations prepared before (compile, in the benchmark's order) adopt it
        self.description = desc
        return (f"{desc}; separate copy, bf16 kept for exact requests; {stored_note}{split_note}; {gelu_note}; "
                f"{plain_note}; {norm_note}")

    @staticmethod
    def _stored_note(q, bf16_weights, stored, capability) -> str:
        """Take the file's stored fp8 weights (after torchao quantised `q`); the detail's line about it, or ""."""
        if stored is None:
            return ""
        if capability >= (10, 0):
            return not_reused(stored, "this GPU's low-precision format is MXFP4, not row-scaled fp8 e4m3") + "; "
        if stored.not_reusable:
            return not_reused(stored, stored.not_reusable) + "; "
        return reuse_stored_weights(q, bf16_weights, stored) + "; "

    def configure(self, run: RunContext) -> None:
        run.precision = "fp8"  # the separate quantised copy; requests without the flag run the exact bf16 one
