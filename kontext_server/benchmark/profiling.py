"""Kernel categories for profiles: a CUDA kernel or aten op name -> what it computes (GEMM, attention, quantisation,
norm / elementwise, copies), shared by the profiling tools."""
from __future__ import annotations

import re

CATEGORIES = [  # first match wins; names of CUDA kernels and aten ops, lower-cased
    # inductor's fused kernels are named after every op they absorbed ("..._scaled_dot_product_cudnn_attention_...",
    # "..._scaled_mm_..."): classify them by what they compute, not by the names they borrowed
    ("activation quantisation (fused)", r"^triton_.*amax"),
    ("norm / elementwise (triton)", r"^triton_"),
    ("attention", r"flash|fmha|cudnn.*(attn|sdpa|mha)|attention|sdpa"),
    ("gemm (fp8)", r"^nvjet_sm\d+_qq|f8|fp8|e4m3|scaled_mm|ovscale"),  # cuBLAS names fp8 GEMMs nvjet_*_qq*
    ("gemm", r"gemm|matmul|sm90_xmma|cutlass|cublas|nvjet|addmm|\bmm\b|linear"),
    ("activation quantisation", r"quant|amax|abs_max|float8|to_fp8"),
    ("norm / elementwise", r"layer_norm|rms_norm|norm|gelu|silu|mul|add|elementwise|sin|cos"),
    ("copies", r"copy|memcpy|memset|cat|clone|contiguous"),
]


def category(name: str) -> str:
    low = name.lower()
    for cat, pattern in CATEGORIES:
        if re.search(pattern, low):
            return cat
    return "other"
