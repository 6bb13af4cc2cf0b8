"""The floor model: the least time a denoising step can take on this hardware, used to judge every measurement.

Per step, the linear layers that touch tokens hold ~6.45 B parameters (the AdaLN modulation linears act on one vector,
not on tokens), so linear FLOPs = 2 x params x L; attention FLOPs = blocks x 4 x L^2 x inner dim. Divided by the
measured ceilings of the GPU (docs/design.md): bf16 and fp8 matmul, cuDNN attention. L = image tokens + reference
tokens + 512 text tokens.
"""
from __future__ import annotations

import torch

# Measured ceilings on H100 / H200 (docs/design.md).
BF16_MATMUL_TFLOPS = 790e12
FP8_MATMUL_TFLOPS = 1150e12
ATTENTION_TFLOPS = 650e12

WORKLOADS = {  # name -> (width, height, edit)
    "edit-1024": (1024, 1024, True),
    "t2i-1024": (1024, 1024, False),
    "edit-512": (512, 512, True),
}


# Linears a token does not go through: AdaLN modulation and the timestep/guidance embedders act on one vector,
# the fused copies duplicate q/k/v, and in the double blocks each token takes one stream only (image tokens the
# image-stream linears, text tokens the context-stream ones), so the context stream is not counted again.
_NOT_PER_TOKEN = ("norm", "time_text_embed", "to_qkv", "to_added_qkv", "add_q_proj", "add_k_proj", "add_v_proj",
                  "to_add_out", "ff_context", "context_embedder")


def linear_token_params(transformer) -> int:
    """Parameters of the linear layers each token passes through once per step (~6.45 B for FLUX), the same
    before and after QKV fusion (a fused to_qkv counts where its freed to_q/to_k/to_v did)."""
    names = {name for name, _ in transformer.named_modules()}
    total = 0
    for name, m in transformer.named_modules():
        if not isinstance(m, torch.nn.Linear):
            continue
        if name.endswith(".to_qkv") and name[: -len("to_qkv")] + "to_q" not in names:
            total += m.weight.numel()
        elif not any(s in name for s in _NOT_PER_TOKEN):
            total += m.weight.numel()
    return total


def floor_ms_per_step(transformer, seq_len: int, fp8: bool) -> float:
    cfg = transformer.config
    n_blocks = cfg.num_layers + cfg.num_single_layers
    inner = cfg.num_attention_heads * cfg.attention_head_dim
    lin = 2 * linear_token_params(transformer) * seq_len / (FP8_MATMUL_TFLOPS if fp8 else BF16_MATMUL_TFLOPS)
    attn = n_blocks * 4 * seq_len**2 * inner / ATTENTION_TFLOPS
    return (lin + attn) * 1000


def seq_len_for(width: int, height: int, edit: bool, text_tokens: int = 512) -> int:
    img = (width // 16) * (height // 16)
    return img * (2 if edit else 1) + text_tokens


# image tokens (output + reference image) per workload: the row counts the kernel benchmark tools use
IMAGE_TOKENS = {name: seq_len_for(w, h, edit, text_tokens=0) for name, (w, h, edit) in WORKLOADS.items()}
