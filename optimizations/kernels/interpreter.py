"""Triton's CPU interpreter made to compute as the GPU does in the two places where it does not, so that our kernels'
tests and the benches' CPU modes (no GPU) compare roundings that mean something.

- Casts (`_convert_float`, Triton 3.6-3.9): the interpreter truncates fp32 -> bf16 and rounds fp32 -> fp8 e4m3
  without carrying a mantissa overflow into the exponent (127.97 becomes 64, not 128). The GPU rounds both to
  nearest even (fp8 saturating at 448): these two casts are done by torch instead, which rounds as the GPU does.
- Dots (`create_dot`, Triton 3.9): the interpreter keeps bf16 tiles as their raw 16-bit patterns (numpy has no
  bf16) and multiplies those integers. The GPU multiplies the values, accumulating in fp32: so does the patch.

Contract: `match_the_gpu()` patches the interpreter in this process when Triton runs interpreted
(TRITON_INTERPRET=1, read by Triton into `triton.knobs`), else does nothing; calling it again does nothing more.
All else stays Triton's.
"""
from __future__ import annotations

import torch

_applied = False


def match_the_gpu() -> None:
    global _applied
    try:
        import numpy as np
        import triton
        import triton.language as tl
        from triton.runtime import interpreter
    except ImportError:
        return
    if _applied or not triton.knobs.runtime.interpret:
        return
    _applied = True
    _round_casts(np, tl, interpreter)
    _dot_bf16_values(np, tl, interpreter)


def _round_casts(np, tl, interpreter) -> None:
    original = interpreter._convert_float
    targets = {tl.bfloat16: (torch.bfloat16, torch.int16, np.uint16),
               tl.float8e4nv: (torch.float8_e4m3fn, torch.uint8, np.uint8)}

    def convert(data, input_dtype, output_dtype, rounding_mode):
        if input_dtype == tl.float32 and output_dtype in targets and rounding_mode != interpreter._ir.ROUNDING_MODE.RTZ:
            dtype, bits, np_bits = targets[output_dtype]
            x = torch.from_numpy(np.ascontiguousarray(data).view(np.float32))
            if dtype == torch.float8_e4m3fn:
                x = x.clamp(-448.0, 448.0)  # the GPU's cvt.rn.satfinite; NaN stays NaN
            return x.to(dtype).view(bits).numpy().view(np_bits).reshape(data.shape)
        return original(data, input_dtype, output_dtype, rounding_mode)

    interpreter._convert_float = convert


def _dot_bf16_values(np, tl, interpreter) -> None:
    builder = type(interpreter.interpreter_builder)
    original = builder.create_dot

    def values(h):
        if h.dtype.scalar == tl.bfloat16:
            return (h.data.astype(np.uint32) << 16).view(np.float32)
        return h.data

    def create_dot(self, a, b, d, input_precision, max_num_imprecise_acc):
        if tl.bfloat16 not in (a.dtype.scalar, b.dtype.scalar):
            return original(self, a, b, d, input_precision, max_num_imprecise_acc)
        out = np.matmul(values(a), values(b), dtype=np.float32) + d.data
        return interpreter.TensorHandle(out.astype(d.data.dtype), d.dtype.scalar)

    builder.create_dot = create_dot
