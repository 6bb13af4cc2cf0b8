"""The fp8 copy's GELU -> linear pairs with GELU, row amax and fp8 cast in one pass (a Triton kernel).

In every block the widest activation, 12,288 features per token, is a GELU output that feeds a linear: the double
blocks' feed-forward output (`ff.net.2`, `ff_context.net.2`) and the single blocks' MLP half of `proj_out`. torchao
quantises that linear's input row-wise (amax over the row, then cast), and inductor emitted the GELU + amax + cast as
a looped reduction that reads the row twice: ~100 us for a 2560 x 12288 activation on an H200, about 3x its memory
traffic (BENCHMARKS.md, profile). Here one program per row loads the pre-GELU row once, keeps it in registers,
applies the tanh GELU, takes the amax and writes the fp8 row and its scale; the linear is then an Fp8Linear
(fp8/linear.py: torch._scaled_mm on torchao's quantised weight, as torchao itself calls it).

Layout: the row is held as at most three unpadded pieces of a power-of-two width (fp8_norm_quant.row_chunks:
12,288 = 3 x 4,096, on 8 warps), not as one block padded to the next power of two (16,384 lanes, a quarter of them
masked off). bench/bench_row_quant.py times both (the padded one lives in bench/row_quant_padded.py): the chunked
layout was faster on the H100, with identical output (benchmarks/2026-11-23-h100-power).

Numerics: the GELU stays in fp32 up to the cast (torchao's path rounds it to bf16 first); scales are amax / 448 per
row, as torchao's. The amax is a maximum, exact in any order, so both layouts give the same bits. Lossy like the
rest of the fp8 tier; the GPU tests compare it with torchao's own linear.

Applied by the low-precision optimisation to its quantised copy only, on CUDA with Triton, where the weight is a
torchao row-scaled float8 tensor and the GELU is the tanh approximation (FLUX's); anything else stays torchao's path.
"""
from __future__ import annotations

import functools

import torch
import torch.nn.functional as F

from kontext_server import settings
from optimizations.compiling.cache import switched_off
from optimizations.fp8.linear import Fp8Linear, is_torchao_row_scaled_fp8, quantize_rows
from optimizations.fp8.norm_quant import _kernels, chunk_warps, row_chunks


def gelu_quant_reference(x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """What the kernel computes, in plain torch: tanh-GELU in fp32, then the row-wise quantisation of Fp8Linear."""
    return quantize_rows(F.gelu(x.float(), approximate="tanh"))


def _gelu_quant_chunks_kernel():
    """The Triton kernel in use (kernels/fp8_row_quant.gelu_quant_chunks_kernel, beside the norm kernel whose chunk
    helpers it shares): one program per row, the row as row_chunks(K) unpadded pieces in registers."""
    return _kernels().gelu_quant_chunks_kernel


def launch_gelu_quant_chunks(kernel, x: torch.Tensor, q: torch.Tensor, s: torch.Tensor,
                             num_warps: int | None = None) -> None:
    """Run `kernel` (the chunked kernel, or torch.library's wrap_triton of it) on the rows of x (M, K), last dimension
    contiguous: fp8 rows into q (M, K) and scales into s (M, 1). num_warps: chunk_warps's choice unless given (the
    benchmark tool tries others)."""
    m, k = x.shape
    chunk, nchunk = row_chunks(k)
    kernel[(m,)](x, q, s, k, x.stride(0), q.stride(0), CHUNK=chunk, NCHUNK=nchunk, EVEN=k % chunk == 0,
                 num_warps=num_warps or chunk_warps(chunk))


@functools.cache
def _op():
    """Register the chunked Triton kernel as a torch op (traceable by torch.compile); None where Triton is
    missing."""
    try:
        from torch.library import triton_op, wrap_triton
        kernel = _gelu_quant_chunks_kernel()  # imports Triton
    except ImportError:
        return None

    @triton_op("flux_kontext::gelu_quant_fp8_rows", mutates_args={})
    def gelu_quant_fp8_rows(x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        m, k = x.shape
        q = torch.empty((m, k), dtype=torch.float8_e4m3fn, device=x.device)
        s = torch.empty((m, 1), dtype=torch.float32, device=x.device)
        launch_gelu_quant_chunks(wrap_triton(kernel), x, q, s)
        return q, s

    return gelu_quant_fp8_rows


class GeluFp8Linear(Fp8Linear):
    """GELU(x) @ W.T + b for a row-scaled fp8 weight, with the GELU fused into the input quantisation (the Triton
    kernel). Takes the pre-GELU activation."""

    def __init__(self, *args, **kwargs):
        super().__init__(*args, **kwargs)
        if _op() is None:  # registers the op; quantize_input calls it through torch.ops, which torch.compile traces
            raise RuntimeError("GeluFp8Linear needs Triton")

    def quantize_input(self, x2d: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        # The kernel takes a row stride: a view of wider rows (the LoRA slots' fused branch returns the base columns
        # of a wider GEMM output) is read where it lies, not copied; only a strided last dimension is.
        return torch.ops.flux_kontext.gelu_quant_fp8_rows(x2d if x2d.stride(-1) == 1 else x2d.contiguous())


def _tanh_gelu(module) -> bool:
    return getattr(module, "approximate", None) == "tanh"


def fuse_gelu_into_quantisation(transformer: torch.nn.Module) -> str:
    """Rewrite the quantised copy's GELU -> linear pairs; returns what was done, for the optimisation's report.
    `FLUX_FP8_FUSED_GELU=0` leaves them to torchao (A/B runs)."""
    if switched_off(settings.FP8_FUSED_GELU):
        return "GELU quantisation not fused (FLUX_FP8_FUSED_GELU=0)"
    if not torch.cuda.is_available() or _op() is None:
        return "GELU quantisation not fused (needs CUDA and Triton)"
    n = 0
    for block in getattr(transformer, "transformer_blocks", []):
        for ff in (block.ff, block.ff_context):
            act, out = ff.net[0], ff.net[2]
            if _tanh_gelu(act) and isinstance(getattr(act, "proj", None), torch.nn.Module) \
                    and is_torchao_row_scaled_fp8(out):
                # the GELU moves into the output linear's input quantisation
                ff.net[0], ff.net[2] = act.proj, GeluFp8Linear.from_torchao(out)
                n += 1
    for block in getattr(transformer, "single_transformer_blocks", []):
        mlp = getattr(block.proj_out, "mlp", None)  # a SplitProjOut (fusions/split_proj_out.py)
        if isinstance(block.act_mlp, torch.nn.GELU) and _tanh_gelu(block.act_mlp) \
                and is_torchao_row_scaled_fp8(mlp):
            block.act_mlp, block.proj_out.mlp = torch.nn.Identity(), GeluFp8Linear.from_torchao(mlp)
            n += 1
    return f"GELU + row amax + fp8 cast in one Triton pass for {n} linears"
