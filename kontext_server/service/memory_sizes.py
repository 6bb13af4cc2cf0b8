"""What the memory-tier planner needs to know about the loaded model: each component's bytes, and the working memory
of the largest request it plans for.

What: `measure(pipe, ...)` returns memory_tiers.ComponentSizes from the loaded modules' own parameters and buffers.
The fp8 copy is sized before it is made, from the exact transformer: each linear `low_precision` quantises counts one
byte per weight and a float32 scale per output row, everything else what it holds now.
Working memory, estimated (tools/memory_tiers.py measures the real peaks on the GPU):
- one transformer call: ACTIVATIONS_PER_TOKEN tensors of the model's width per token of its sequence (a single
  block holds about that many at its peak: the residual, the norm, the MLP before and after its GELU, q / k / v
  before and after RoPE, the attention output and the concatenation proj_out takes);
- the VAE decode: VAE_LIVE_TENSORS tensors of the decoder's full-resolution width (its second block's channels,
  upsampled to full size) per output pixel;
- T5: four tensors of its feed-forward width per token.
The design request is the largest of --warmup's shapes, else a 1024x1024 edit with one reference image.
`device_budget` is what `--memory-budget auto` means: the device's free memory at start-up, within the process's
memory fraction (torch.cuda.set_per_process_memory_fraction) when one is set.
"""
from __future__ import annotations

import torch

from kontext_server.service.memory_tiers import ComponentSizes, TransformerSizes
from optimizations.low_precision import skip_module
from optimizations.modulation_table import is_modulation_linear
from utils import module_bytes

ACTIVATIONS_PER_TOKEN = 24
VAE_LIVE_TENSORS = 3
TEXT_TOKENS = 512  # what FluxKontextPipeline pads T5's prompt to
DEFAULT_DESIGN = (1024, 1024, 1)  # width, height, reference images
PATCH = 16  # output pixels per token side: the VAE's 8x and the transformer's 2x2 patches


def _tensor_bytes(t: torch.Tensor) -> int:
    return t.numel() * t.element_size()


def _blocks(transformer) -> list[tuple[str, torch.nn.Module]]:
    return [(f"{name}.{i}", block) for name in ("transformer_blocks", "single_transformer_blocks")
            for i, block in enumerate(getattr(transformer, name, []))]


def _fp8_saving(module: torch.nn.Module, prefix: str = "") -> int:
    """Bytes the fp8 copy saves on `module` (a transformer, or one of its blocks under `prefix`)."""
    saved = 0
    for name, m in module.named_modules():
        fqn = f"{prefix}.{name}".strip(".") if prefix else name
        if isinstance(m, torch.nn.Linear) and not skip_module(m, fqn):
            w = m.weight
            saved += _tensor_bytes(w) - w.numel() - 4 * w.shape[0]  # 1 byte per weight + a float32 scale per row
    return saved


def _modulation_bytes(transformer) -> int:
    return sum(module_bytes(m) for fqn, m in transformer.named_modules()
               if isinstance(m, torch.nn.Linear) and is_modulation_linear(fqn))


def transformer_sizes(transformer, fp8: bool = False) -> TransformerSizes:
    """The exact transformer's sizes, or (fp8) those its fp8 copy will have."""
    blocks = [(name, module_bytes(b) - (_fp8_saving(b, name) if fp8 else 0)) for name, b in _blocks(transformer)]
    total = module_bytes(transformer) - (_fp8_saving(transformer) if fp8 else 0)
    in_blocks = sum(n for _, n in blocks)
    return TransformerSizes(total=total, outside_blocks=total - in_blocks,
                            largest_block=max((n for _, n in blocks), default=0),
                            modulation=_modulation_bytes(transformer))  # kept in the model's dtype by the fp8 copy


def _largest_leaf(module: torch.nn.Module) -> int:
    return max((sum(_tensor_bytes(t) for t in (*m.parameters(recurse=False), *m.buffers(recurse=False)))
                for m in module.modules()), default=0)


def design_request(warmup_sizes: list[tuple]) -> tuple[int, int, int]:
    """(width, height, references) of the largest --warmup shape by tokens, else DEFAULT_DESIGN."""
    shapes = [(int(s[0]), int(s[1]), int(s[2]) if len(s) > 2 else 0) for s in warmup_sizes]
    if not shapes:
        return DEFAULT_DESIGN
    return max(shapes, key=lambda s: (s[0] // PATCH) * (s[1] // PATCH) * (1 + s[2]))


def describe(width: int, height: int, refs: int) -> str:
    kind = "text-to-image" if not refs else "edit" if refs == 1 else f"edit with {refs} reference images"
    return f"a {width}x{height} {kind} ({tokens(width, height, refs):,} tokens)"


def tokens(width: int, height: int, refs: int) -> int:
    return (width // PATCH) * (height // PATCH) * (1 + refs) + TEXT_TOKENS


def measure(pipe, fp8: bool, warmup_sizes: list[tuple] = ()) -> ComponentSizes:
    """The sizes `plan_tier` takes, from the loaded pipeline (before any optimisation is prepared)."""
    t = pipe.transformer
    dtype_bytes = next(t.parameters()).element_size()
    width, height, refs = design_request(list(warmup_sizes))
    cfg = t.config
    inner = cfg.num_attention_heads * cfg.attention_head_dim
    step = tokens(width, height, refs) * inner * dtype_bytes * ACTIVATIONS_PER_TOKEN
    channels = list(pipe.vae.config.block_out_channels)
    vae_bytes = next(pipe.vae.parameters()).element_size()
    per_pixel = channels[min(1, len(channels) - 1)] * vae_bytes * VAE_LIVE_TENSORS
    t5 = pipe.text_encoder_2
    text = TEXT_TOKENS * t5.config.d_ff * next(t5.parameters()).element_size() * 4
    return ComponentSizes(
        transformer=transformer_sizes(t), transformer_fp8=transformer_sizes(t, fp8=True) if fp8 else None,
        text_encoder_2=module_bytes(t5), text_encoder_2_largest_leaf=_largest_leaf(t5),
        text_encoder=module_bytes(pipe.text_encoder), vae=module_bytes(pipe.vae), step_working=step,
        text_working=text, vae_decode_per_pixel=per_pixel, design_pixels=width * height,
        design=describe(width, height, refs))


_FULL_META = []  # the full model's meta build, made once per process


def meta_pipeline(configs: dict | None = None):
    """The full model's components (or those of `configs`) built on the meta device: their sizes without their
    memory, for planning tables (tools/memory_tiers.py --plan) and tests. Only what `measure` reads."""
    if configs is None:
        if not _FULL_META:
            _FULL_META.append(_meta_pipeline(None))
        return _FULL_META[0]
    return _meta_pipeline(configs)


def _meta_pipeline(configs: dict | None):
    from types import SimpleNamespace

    from diffusers import AutoencoderKL, FluxTransformer2DModel
    from transformers import CLIPTextConfig, CLIPTextModel, T5Config, T5EncoderModel

    from kontext_server.models.config import full_configs
    from kontext_server.models.synthetic import building_on

    cfg = configs or full_configs()
    with building_on("meta", torch.bfloat16):
        return SimpleNamespace(transformer=FluxTransformer2DModel(**cfg["transformer"]),
                               text_encoder_2=T5EncoderModel(T5Config(**cfg["text_encoder_2"])),
                               text_encoder=CLIPTextModel(CLIPTextConfig(**cfg["text_encoder"])),
                               vae=AutoencoderKL(**cfg["vae"]))


def device_budget(device: str) -> int:
    """`auto`: the device's free memory now, within the process's memory fraction where one is set."""
    idx = torch.device(device).index
    idx = torch.cuda.current_device() if idx is None else idx
    free, total = torch.cuda.mem_get_info(idx)
    fraction = getattr(torch.cuda, "get_per_process_memory_fraction", lambda _: 1.0)(idx)
    return int(min(free + torch.cuda.memory_reserved(idx), fraction * total))
