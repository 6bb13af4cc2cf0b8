"""`synthetic-full`: the full FLUX.1-Kontext architecture with random weights, built directly on the GPU.

Dense-math speed does not depend on weight values, so this measures speed; it says nothing about image quality or
how often a step cache hits on real weights. The component configs are the real model's (config.py).
"""
from __future__ import annotations

import contextlib

import torch

from kontext_server.models import ModelLoadError
from kontext_server.models.config import full_configs
from kontext_server.models.tokenizers import build_tiny_clip_tokenizer, build_tiny_t5_tokenizer


@contextlib.contextmanager
def building_on(device: str, dtype: torch.dtype):
    """Modules constructed inside are allocated on `device` in `dtype` and initialised there (no copy)."""
    prev = torch.get_default_dtype()
    torch.set_default_dtype(dtype)
    try:
        with torch.device(device):
            yield
    finally:
        torch.set_default_dtype(prev)


def check_device(device: str) -> None:
    if not device.startswith("cuda"):
        raise ModelLoadError("synthetic-full needs a CUDA GPU (it is ~17B parameters in bf16); use --model tiny on CPU")


def build_synthetic_full(device: str, transformer=None):
    """Full-size Kontext with random weights, built on the GPU in bf16 (seconds, no download). `transformer`: one
    loaded already (from --transformer) instead of a random one."""
    check_device(device)
    from diffusers import AutoencoderKL, FlowMatchEulerDiscreteScheduler, FluxKontextPipeline, FluxTransformer2DModel
    from transformers import CLIPTextConfig, CLIPTextModel, T5Config, T5EncoderModel

    cfg = full_configs()
    clip_tok, t5_tok = build_tiny_clip_tokenizer(), build_tiny_t5_tokenizer()
    torch.manual_seed(0)
    with building_on(device, torch.bfloat16):
        if transformer is None:
            transformer = FluxTransformer2DModel(**cfg["transformer"])
        vae = AutoencoderKL(**cfg["vae"])
        text_encoder = CLIPTextModel(CLIPTextConfig(**cfg["text_encoder"]))
        text_encoder_2 = T5EncoderModel(T5Config(**cfg["text_encoder_2"]))
    for m in (transformer, vae, text_encoder, text_encoder_2):
        m.eval().requires_grad_(False)
    scheduler = FlowMatchEulerDiscreteScheduler(**cfg["scheduler"])
    return FluxKontextPipeline(
        scheduler=scheduler, vae=vae, text_encoder=text_encoder, tokenizer=clip_tok,
        text_encoder_2=text_encoder_2, tokenizer_2=t5_tok, transformer=transformer,
    )
