"""`tiny`: the real FluxKontextPipeline classes at toy size, built offline and deterministically.

Saved with `save_pretrained` once into the cache directory and always loaded back through `from_pretrained`, so tests
exercise the same loading path as real weights. Tokenizers are real transformers classes with tiny vocabularies
(CLIP from a hand-written byte-level vocabulary, T5 from a few SentencePiece pieces): no hub access.
Its images are noise: the weights are random. It exists for tests and for trying the server on any machine.
"""
from __future__ import annotations

import json
import os
import shutil
import tempfile
from pathlib import Path

import torch

from kontext_server import settings
from kontext_server.models.config import FULL_CONFIG_PATH
from kontext_server.models.tokenizers import build_tiny_clip_tokenizer, build_tiny_t5_tokenizer

# Bump when the tiny recipe changes so a stale cached copy is never loaded.
TINY_RECIPE_VERSION = 2


def build_tiny_pipeline(seed: int = 0):
    """The real Kontext pipeline classes at diffusers' dummy-test sizes (a few MB), deterministic by seed.

    The VAE keeps 4 blocks so its scale factor is 8 as in the real model: sizes and token counts follow the
    real arithmetic (a 256x256 image is 16x16 = 256 image tokens).
    """
    from diffusers import AutoencoderKL, FlowMatchEulerDiscreteScheduler, FluxKontextPipeline, FluxTransformer2DModel
    from transformers import CLIPTextConfig, CLIPTextModel, T5Config, T5EncoderModel

    full = json.loads(FULL_CONFIG_PATH.read_text())
    torch.manual_seed(seed)
    transformer = FluxTransformer2DModel(
        patch_size=1, in_channels=16, num_layers=1, num_single_layers=2, attention_head_dim=16,
        num_attention_heads=2, joint_attention_dim=32, pooled_projection_dim=32, axes_dims_rope=[4, 4, 8],
        guidance_embeds=True,
    )
    clip_tok = build_tiny_clip_tokenizer()
    text_encoder = CLIPTextModel(CLIPTextConfig(
        bos_token_id=clip_tok.bos_token_id, eos_token_id=clip_tok.eos_token_id, pad_token_id=clip_tok.pad_token_id,
        hidden_size=32, intermediate_size=37, layer_norm_eps=1e-05, num_attention_heads=4, num_hidden_layers=2,
        vocab_size=len(clip_tok), hidden_act="gelu", projection_dim=32, max_position_embeddings=77,
    ))
    t5_tok = build_tiny_t5_tokenizer()
    text_encoder_2 = T5EncoderModel(T5Config(
        vocab_size=len(t5_tok), d_model=32, d_ff=37, d_kv=8, num_heads=4, num_layers=2,
        relative_attention_num_buckets=8, feed_forward_proj="gated-gelu", pad_token_id=0, eos_token_id=1,
        decoder_start_token_id=0,
    ))
    vae = AutoencoderKL(
        in_channels=3, out_channels=3, latent_channels=4, block_out_channels=(16, 16, 32, 32), layers_per_block=1,
        down_block_types=("DownEncoderBlock2D",) * 4, up_block_types=("UpDecoderBlock2D",) * 4,
        norm_num_groups=8, sample_size=256, use_quant_conv=False, use_post_quant_conv=False,
        shift_factor=full["vae"]["shift_factor"], scaling_factor=full["vae"]["scaling_factor"],
    )
    scheduler = FlowMatchEulerDiscreteScheduler(**{k: v for k, v in full["scheduler"].items() if not k.startswith("_")})
    return FluxKontextPipeline(
        scheduler=scheduler, vae=vae, text_encoder=text_encoder, tokenizer=clip_tok,
        text_encoder_2=text_encoder_2, tokenizer_2=t5_tok, transformer=transformer,
    )


def ensure_tiny_saved(cache_dir: Path | None = None) -> Path:
    """Build and save the tiny pipeline once; later calls return the saved directory."""
    target = (cache_dir or settings.default_cache_dir()) / f"tiny-v{TINY_RECIPE_VERSION}"
    if (target / "model_index.json").exists():
        return target
    target.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix="tiny-", dir=target.parent))
    try:
        build_tiny_pipeline().save_pretrained(tmp)
        try:
            os.replace(tmp, target)  # atomic: a concurrent builder never sees half a directory
        except OSError:
            if not (target / "model_index.json").exists():
                raise
    finally:
        shutil.rmtree(tmp, ignore_errors=True)
    return target


def load_tiny(device: str, cache_dir: Path | None = None, on_host: bool = False, **components):
    """The saved tiny pipeline through from_pretrained; `components` are given instead of loaded (a transformer
    from --transformer). `on_host`: in `device`'s dtype, left in host memory (a memory budget places it)."""
    from diffusers import FluxKontextPipeline

    path = ensure_tiny_saved(cache_dir)
    # fp32 on CPU (bf16 matmuls are slow there); bf16 on GPU like the real model.
    dtype = torch.bfloat16 if device.startswith("cuda") else torch.float32
    pipe = FluxKontextPipeline.from_pretrained(path, dtype=dtype, local_files_only=True, **components)
    return pipe if on_host else pipe.to(device)
