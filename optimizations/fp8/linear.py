"""The fp8 copy's linears as plain modules: fp8 weight and scales as ordinary tensors, torch._scaled_mm.

torchao quantises a linear by turning its weight into a Float8Tensor, a tensor subclass whose F.linear override
quantises the activation and calls torch._scaled_mm. Compiled, the GPU code is good, but each call of a compiled
block unwraps every subclass weight on the host (AOTAutograd's subclass runtime wrappers): on an H100 the fp8
transformer's host time per call (~58 ms at edit-512, the step time without CUDA graphs) exceeded its GPU time
(43.5 ms), while the bf16 transformer's did not (BENCHMARKS.md). After torchao has quantised the weights, each
quantised linear becomes an Fp8Linear holding torchao's fp8 data and row scales as plain buffers and computing the
same thing in plain torch ops: row amax, scale = amax / 448, cast, `_scaled_mm` with both row scales. Inductor fuses
the activation quantisation into the producing kernel as it did with torchao's ops.

`FLUX_FP8_PLAIN_LINEARS=0` keeps torchao's modules (A/B runs).
"""
from __future__ import annotations

from typing import NamedTuple

import torch

from kontext_server import settings
from optimizations.compiling.cache import switched_off

FP8_MAX = 448.0  # float8 e4m3fn


class Fp8Rows(NamedTuple):
    """An activation already quantised row-wise by the kernel that produced it (fp8/norm_quant.py): an Fp8Linear
    takes it as its input and skips its own quantisation."""
    data: torch.Tensor  # (..., in_features) float8 e4m3
    scale: torch.Tensor  # (..., 1) float32: data * scale is the activation


def quantize_rows(x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """Row-wise dynamic fp8: (fp8 rows, fp32 scales of shape (rows, 1)), scale = row amax / 448."""
    scale = x.abs().amax(-1, keepdim=True).float().clamp(min=1e-12) / FP8_MAX
    return (x.float() * (1.0 / scale)).clamp(-FP8_MAX, FP8_MAX).to(torch.float8_e4m3fn), scale


class Fp8Linear(torch.nn.Module):
    """x @ W.T + b with W in fp8 e4m3 with one scale per output row and x quantised per row at run time."""

    def __init__(self, weight_fp8: torch.Tensor, weight_scale: torch.Tensor, bias: torch.Tensor | None,
                 use_fast_accum: bool = True, out_dtype: torch.dtype | None = None):
        super().__init__()
        self.out_features, self.in_features = weight_fp8.shape
        # (N, K) row-major fp8 viewed as the (K, N) column-major operand _scaled_mm wants; (N, 1) scales as (1, N)
        self.register_buffer("weight_t", weight_fp8.t(), persistent=False)
        self.register_buffer("weight_scale", weight_scale.reshape(1, -1).float(), persistent=False)
        self.bias = bias
        self.use_fast_accum = use_fast_accum
        # The model's dtype, for inputs that arrive quantised (Fp8Rows); a tensor input's own dtype is used otherwise.
        self.out_dtype = out_dtype or (bias.dtype if bias is not None else torch.bfloat16)

    @classmethod
    def from_torchao(cls, linear: torch.nn.Linear) -> "Fp8Linear":
        w = linear.weight
        return cls(w.qdata, w.scale, linear.bias, bool(getattr(w.mm_config, "use_fast_accum", True)), w.dtype)

    @classmethod
    def from_float(cls, linear: torch.nn.Linear) -> "Fp8Linear":
        """Quantise a bf16/fp32 linear's weight row-wise (tests; the service takes torchao's quantised weights)."""
        q, s = quantize_rows(linear.weight.detach())
        return cls(q, s, linear.bias, out_dtype=linear.weight.dtype)

    def quantize_input(self, x2d: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        return quantize_rows(x2d)

    def input_rows(self, x: torch.Tensor | Fp8Rows) -> tuple[torch.Tensor, torch.Tensor, torch.Size, torch.dtype]:
        """The GEMM's fp8 input rows (M, in_features), their scales (M, 1), the leading shape of the output and its
        dtype: fp8 rows as their producer quantised them, or the tensor quantised here (quantize_input). Shared
        with the LoRA slots' fused branch (kontext_server/lora/slots.py), which runs one GEMM on the same rows."""
        if isinstance(x, Fp8Rows):  # quantised by its producer
            q, s = x.data.reshape(-1, self.in_features), x.scale.reshape(-1, 1)
            return q, s, x.data.shape[:-1], self.out_dtype
        q, s = self.quantize_input(x.reshape(-1, x.shape[-1]))
        return q, s, x.shape[:-1], x.dtype

    def forward(self, x: torch.Tensor | Fp8Rows) -> torch.Tensor:
        q, s, lead, dtype = self.input_rows(x)
        out = torch._scaled_mm(q, self.weight_t, scale_a=s, scale_b=self.weight_scale, bias=self.bias,
                               out_dtype=dtype, use_fast_accum=self.use_fast_accum)
        return out.reshape(*lead, self.out_features)

    def extra_repr(self) -> str:
        return f"in_features={self.in_features}, out_features={self.out_features}, fp8 e4m3 row-scaled"


def is_torchao_row_scaled_fp8(linear) -> bool:
    w = getattr(linear, "weight", None)
    scale = getattr(w, "scale", None)
    return (isinstance(linear, torch.nn.Linear) and getattr(w, "qdata", None) is not None
            and w.qdata.dtype == torch.float8_e4m3fn and scale is not None
            and tuple(scale.shape) == (linear.out_features, 1))


def unwrap_torchao_linears(module: torch.nn.Module) -> str:
    """Replace every torchao row-scaled fp8 linear in `module` by an Fp8Linear; returns the report line.
    `FLUX_FP8_PLAIN_LINEARS=0` keeps torchao's modules (A/B runs)."""
    if switched_off(settings.FP8_PLAIN_LINEARS):
        return "torchao's tensor-subclass linears kept (FLUX_FP8_PLAIN_LINEARS=0)"
    targets = [name for name, m in module.named_modules() if is_torchao_row_scaled_fp8(m)]
    for name in targets:
        parent, _, child = name.rpartition(".")
        owner = module.get_submodule(parent) if parent else module
        setattr(owner, child, Fp8Linear.from_torchao(getattr(owner, child)))
    return f"{len(targets)} fp8 linears as plain modules (no tensor subclass at run time)"
