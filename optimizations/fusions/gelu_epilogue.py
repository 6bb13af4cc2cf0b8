"""cuBLASLt's GELU-bias epilogue for the exact (bf16) transformer's FF / MLP input linears. On with `compile`;
`FLUX_BF16_GELU_EPILOGUE=0` turns it off (the A/B switch).

Measured on the H100 (BENCHMARKS.md, 2026-11-23 late; benchmarks/2026-11-23-h100-late/): 8-18% less time per linear
than inductor's GEMM + GELU kernel at FLUX's four token counts, with a smaller error against fp32 (1.7e-3 vs 2.6e-3);
in the stage table the exact tier's step went 67.3 -> 66.5 ms at edit-512 and 132.2 -> 130.4 ms at t2i-1024, the
three runs' ranges not overlapping.

Each of the 57 blocks computes gelu_tanh(x @ W^T + b) into a 12,288-wide activation: the double blocks' two
feed-forward inputs (`ff.net[0]`, `ff_context.net[0]`, diffusers' GELU module) and the single blocks' `proj_mlp` +
`act_mlp`. Compiled, inductor runs the linear as a cuBLAS GEMM (an extern call it cannot fuse into) and the GELU as
a separate kernel that reads and writes the whole activation again: ~63 MB each way per linear at edit-512, ~3.6 ms
of memory traffic per step over 76 linears against an exact-tier step of 67.6 ms (1.38x the floor; the target is
1.15x). `torch._addmm_activation(b, x, W^T, use_gelu=True)` asks cuBLASLt for one GEMM whose epilogue adds the
bias and applies the tanh GELU to the fp32 accumulator before the single rounding to bf16 (PyTorch's CUDA path
applies the tanh GELU after the GEMM where Lt's epilogue is unavailable, so the maths is the same either way).
Inductor keeps the op as an extern call (`make_fallback`), so the compiled blocks call it as they call the GEMM now.

Numerics: one rounding instead of two (the linear's output is no longer rounded to bf16 before the GELU): float
reordering, like the other lossless stages, and reported as fidelity against stage 0 by the benchmark.
`bench/bench_gelu_epilogue.py` measures the two against each other at FLUX's shapes; this module is the switch
the stage table uses for the same A/B on whole steps.

Only the bf16 transformer: the fp8 copy fuses its GELU into the fp8 quantisation instead (fp8/gelu_quant.py), so
`remove` takes the rewrite out of a copy before it is quantised. The modules stay diffusers' (no new classes, the
same state dict): each rewritten module gets an instance `forward`, which a deep copy rebinds to the copy's module.
On CPU (tests) the forwards compute exactly what diffusers' do.
"""
from __future__ import annotations

import torch
import torch.nn.functional as F

from optimizations.base import bind_forward
from kontext_server import settings
from optimizations.compiling.cache import switched_off

ENV = settings.BF16_GELU_EPILOGUE


def enabled() -> bool:
    return not switched_off(ENV)


def gelu_linear(x: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor | None) -> torch.Tensor:
    """gelu_tanh(x @ weight^T + bias): on CUDA one cuBLASLt GEMM with a GELU-bias epilogue; elsewhere (or without a
    bias, which the Lt epilogue needs) the linear then the GELU, as diffusers computes it."""
    if x.is_cuda and bias is not None:
        out = torch._addmm_activation(bias, x.reshape(-1, x.shape[-1]), weight.t(), use_gelu=True)
        return out.view(*x.shape[:-1], weight.shape[0])
    return F.gelu(F.linear(x, weight, bias), approximate="tanh")


def _ff_input_forward(self, hidden_states: torch.Tensor) -> torch.Tensor:
    """diffusers' GELU module (proj, then the GELU) as one call."""
    return gelu_linear(hidden_states, self.proj.weight, self.proj.bias)


def _linear_with_gelu_forward(self, x: torch.Tensor) -> torch.Tensor:
    """A single block's proj_mlp with its act_mlp moved in."""
    return gelu_linear(x, self.weight, self.bias)


def _identity_forward(self, x: torch.Tensor) -> torch.Tensor:
    """A single block's act_mlp once proj_mlp applies it."""
    return x


def _is_tanh_gelu_module(m) -> bool:
    return getattr(m, "approximate", None) == "tanh" and isinstance(getattr(m, "proj", None), torch.nn.Linear)


def install(transformer: torch.nn.Module) -> str:
    """Rewrite the FF / MLP input linears of `transformer`; returns what was done, for the optimisation's report."""
    n = 0
    for block in getattr(transformer, "transformer_blocks", []):
        for ff in (block.ff, block.ff_context):
            act = ff.net[0]
            if _is_tanh_gelu_module(act) and "forward" not in act.__dict__:
                bind_forward(act, _ff_input_forward)
                n += 1
    for block in getattr(transformer, "single_transformer_blocks", []):
        act, proj = block.act_mlp, block.proj_mlp
        if isinstance(act, torch.nn.GELU) and act.approximate == "tanh" and type(proj) is torch.nn.Linear \
                and "forward" not in act.__dict__:
            bind_forward(proj, _linear_with_gelu_forward)
            bind_forward(act, _identity_forward)
            n += 1
    return f"GELU in the GEMM epilogue (cuBLASLt) for {n} FF / MLP input linears (off with {ENV.name}=0)"


_OURS = (_ff_input_forward, _linear_with_gelu_forward, _identity_forward)


def remove(transformer: torch.nn.Module) -> int:
    """Give every rewritten module its class's forward back; returns how many were changed."""
    n = 0
    for m in transformer.modules():
        fwd = m.__dict__.get("forward")
        if getattr(fwd, "__func__", None) in _OURS:
            del m.forward
            n += 1
    return n
