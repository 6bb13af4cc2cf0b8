"""`synthetic-full`: the full FLUX.1-Kontext architecture with random weights, built directly on the GPU.

Dense-math speed does not depend on weight values, so this measures speed; it says nothing about image quality or
how often a step cache hits on real weights. The component configs are the real model's (config.py).

Under a memory budget (`on_host`) the model must not first sit whole on the GPU (the bf16 transformer alone is
~22 GiB): the transformer and T5 are built on the meta device, then each tensor is made and initialised on the GPU
(fast random numbers) and moved to host memory at once, so the GPU holds one tensor at a time; CLIP and the VAE
(small) are built in host memory. The cost: every weight crosses PCIe once more than in the direct build, and the
host holds the whole model (~33 GiB in bf16). Its random values differ from the direct build's (a uniform
1/sqrt(fan_in) per matrix, ones for 1-D norm weights, zeros for other 1-D tensors, N(0, 1) for embeddings), which
changes nothing it is for: speed.
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


def build_synthetic_full(device: str, transformer=None, on_host: bool = False, configs: dict | None = None):
    """Full-size Kontext with random weights, built on the GPU in bf16 (seconds, no download). `transformer`: one
    loaded already (from --transformer) instead of a random one. `on_host`: built into host memory, one tensor at a
    time through the device (module docstring). `configs`: other component configs (tests build small ones)."""
    if configs is None:
        check_device(device)
    from diffusers import AutoencoderKL, FlowMatchEulerDiscreteScheduler, FluxKontextPipeline, FluxTransformer2DModel
    from transformers import CLIPTextConfig, CLIPTextModel, T5Config, T5EncoderModel

    cfg = configs or full_configs()
    clip_tok, t5_tok = build_tiny_clip_tokenizer(), build_tiny_t5_tokenizer()
    torch.manual_seed(0)
    if on_host:
        with building_on("meta", torch.bfloat16):
            if transformer is None:
                transformer = FluxTransformer2DModel(**cfg["transformer"])
            text_encoder_2 = T5EncoderModel(T5Config(**cfg["text_encoder_2"]))
        with building_on("cpu", torch.bfloat16):
            vae = AutoencoderKL(**cfg["vae"])
            text_encoder = CLIPTextModel(CLIPTextConfig(**cfg["text_encoder"]))
        for m in (transformer, text_encoder_2):
            materialise_on_host(m, device)
    else:
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


def _initialise(t: torch.Tensor, name: str, owner: torch.nn.Module, generator: torch.Generator) -> None:
    """Random values for one weight (see the module docstring)."""
    if t.dim() >= 2:
        if isinstance(owner, torch.nn.Embedding):
            t.normal_(0.0, 1.0, generator=generator)
        else:
            bound = 1.0 / (t[0].numel() ** 0.5)  # 1 / sqrt(fan_in), as nn.Linear's default
            t.uniform_(-bound, bound, generator=generator)
    elif name == "weight":
        t.fill_(1.0)  # a norm's scale
    else:
        t.zero_()


def materialise_on_host(module: torch.nn.Module, device: str) -> None:
    """Give every meta parameter of `module` values made on `device` and kept in host memory, one tensor at a time;
    tied parameters stay tied. A meta buffer cannot be rebuilt this way: ModelLoadError."""
    generator = torch.Generator(device).manual_seed(0)
    made: dict[int, tuple] = {}  # id of a meta parameter -> (it, kept alive so that its id is not reused; its values)
    for mod_name, m in module.named_modules():
        for name, p in list(m._parameters.items()):
            if p is None:
                continue
            if id(p) in made:
                m._parameters[name] = made[id(p)][1]
                continue
            if not p.is_meta:
                continue
            t = torch.empty(p.shape, dtype=p.dtype, device=device)
            _initialise(t, name, m, generator)
            made[id(p)] = (p, torch.nn.Parameter(t.to("cpu"), requires_grad=False))
            m._parameters[name] = made[id(p)][1]
            del t
        for name, b in m._buffers.items():
            if b is not None and b.is_meta:
                raise ModelLoadError(f"synthetic-full: the buffer {mod_name}.{name} cannot be built in host memory")
