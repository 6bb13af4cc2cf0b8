"""Where the pipeline comes from: a hub id or local directory (real weights), `tiny`, or `synthetic-full`.

- `tiny` is the real FluxKontextPipeline at toy size. It is built offline and deterministically, saved with
  `save_pretrained` once into a cache directory, and always loaded back through `from_pretrained`, so tests
  exercise the same loading path as real weights.
- `synthetic-full` is the full-size FLUX.1-Kontext architecture with random weights, built directly on the
  GPU. Dense-math speed does not depend on weight values, so it measures speed; it says nothing about
  image quality or how often a step cache hits on real weights.
"""
from __future__ import annotations

import contextlib
import json
import logging
import os
import shutil
import string
import tempfile
import time
from dataclasses import dataclass
from pathlib import Path

import torch

from bytecode_cache import default_cache_dir  # stdlib-only home: the bytecode cache needs it before torch

log = logging.getLogger(__name__)

TINY = "tiny"
SYNTHETIC_FULL = "synthetic-full"
HUB_DEFAULT = "black-forest-labs/FLUX.1-Kontext-dev"
# Bump when the tiny recipe changes so a stale cached copy is never loaded.
TINY_RECIPE_VERSION = 2
FULL_CONFIG_PATH = Path(__file__).parent / "model_configs" / "flux-kontext-dev.json"


class ModelLoadError(RuntimeError):
    """The model could not be loaded; the message says what was tried and what to do."""


@dataclass
class LoadedModel:
    pipe: object  # FluxKontextPipeline
    source: str  # what the user asked for (tiny, synthetic-full, hub id or path)
    synthetic: bool  # weights are random / toy: images carry no meaning
    description: str
    load_seconds: float


# ---------------------------------------------------------------------------------------------------------------
# Tokenizers, built offline (no hub). Both are real transformers tokenizer classes with tiny vocabularies.
# ---------------------------------------------------------------------------------------------------------------
def _bytes_to_unicode() -> dict[int, str]:
    """GPT-2/CLIP byte -> printable-unicode table (the ByteLevel pre-tokenizer's alphabet)."""
    bs = list(range(ord("!"), ord("~") + 1)) + list(range(ord("¡"), ord("¬") + 1)) + list(range(ord("®"), ord("ÿ") + 1))
    cs = bs[:]
    n = 0
    for b in range(256):
        if b not in bs:
            bs.append(b)
            cs.append(256 + n)
            n += 1
    return dict(zip(bs, map(chr, cs)))


def build_tiny_clip_tokenizer():
    from transformers import CLIPTokenizer

    vocab: dict[str, int] = {"<|startoftext|>": 0, "<|endoftext|>": 1}
    for ch in _bytes_to_unicode().values():  # every byte alone and at a word's end: any text encodes
        vocab.setdefault(ch, len(vocab))
        vocab.setdefault(ch + "</w>", len(vocab))
    # A few merges so common words are single tokens, as with a real BPE vocabulary.
    merges = []
    for word in ("the", "a", "car", "red", "cat", "make", "photo", "of"):
        piece = word[0]
        for i, ch in enumerate(word[1:], start=1):
            nxt = ch + ("</w>" if i == len(word) - 1 else "")
            merges.append((piece, nxt))
            piece = piece + nxt
            vocab.setdefault(piece, len(vocab))
    return CLIPTokenizer(vocab=vocab, merges=merges, model_max_length=77)


def build_tiny_t5_tokenizer():
    from transformers import T5Tokenizer

    pieces = [("<pad>", 0.0), ("</s>", 0.0), ("<unk>", 0.0), ("▁", -2.0)]
    pieces += [("▁" + c, -3.0) for c in string.ascii_lowercase] + [(c, -4.0) for c in string.ascii_letters + string.digits]
    pieces += [("▁" + w, -1.0) for w in ("the", "a", "car", "red", "cat", "make", "photo", "of", "blue", "dog")]
    return T5Tokenizer(vocab=pieces, extra_ids=0, model_max_length=512)


# ---------------------------------------------------------------------------------------------------------------
# tiny
# ---------------------------------------------------------------------------------------------------------------
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
    target = (cache_dir or default_cache_dir()) / f"tiny-v{TINY_RECIPE_VERSION}"
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


def load_tiny(device: str, cache_dir: Path | None = None):
    from diffusers import FluxKontextPipeline

    path = ensure_tiny_saved(cache_dir)
    # fp32 on CPU (bf16 matmuls are slow there); bf16 on GPU like the real model.
    dtype = torch.bfloat16 if device.startswith("cuda") else torch.float32
    return FluxKontextPipeline.from_pretrained(path, dtype=dtype, local_files_only=True).to(device)


# ---------------------------------------------------------------------------------------------------------------
# synthetic-full
# ---------------------------------------------------------------------------------------------------------------
def full_configs() -> dict[str, dict]:
    """The real model's config per component (model_configs/flux-kontext-dev.json), without the `_` keys (notes,
    diffusers' class names) at either level."""
    return {name: {k: v for k, v in cfg.items() if not k.startswith("_")}
            for name, cfg in json.loads(FULL_CONFIG_PATH.read_text()).items() if not name.startswith("_")}


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


def build_synthetic_full(device: str):
    """Full-size Kontext with random weights, built on the GPU in bf16 (seconds, no download)."""
    if not device.startswith("cuda"):
        raise ModelLoadError("synthetic-full needs a CUDA GPU (it is ~17B parameters in bf16); use --model tiny on CPU")
    from diffusers import AutoencoderKL, FlowMatchEulerDiscreteScheduler, FluxKontextPipeline, FluxTransformer2DModel
    from transformers import CLIPTextConfig, CLIPTextModel, T5Config, T5EncoderModel

    cfg = full_configs()
    clip_tok, t5_tok = build_tiny_clip_tokenizer(), build_tiny_t5_tokenizer()
    torch.manual_seed(0)
    with building_on(device, torch.bfloat16):
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


# ---------------------------------------------------------------------------------------------------------------
# real weights
# ---------------------------------------------------------------------------------------------------------------
def load_pretrained(model: str, device: str):
    """A local directory or a hub id, through FluxKontextPipeline.from_pretrained (bf16 on CUDA)."""
    from diffusers import FluxKontextPipeline

    dtype = torch.bfloat16 if device.startswith("cuda") else torch.float32
    tried = []
    path = Path(model).expanduser()
    if path.exists():
        if not (path / "model_index.json").exists():
            raise ModelLoadError(
                f"Could not load model {model!r}: the directory exists but has no model_index.json "
                "(expected a diffusers FluxKontextPipeline folder). For an offline test model use --model tiny."
            )
        tried.append(f"local directory {path}")
        try:
            return FluxKontextPipeline.from_pretrained(path, dtype=dtype, local_files_only=True).to(device)
        except Exception as exc:  # corrupt or partial download
            raise ModelLoadError(f"Could not load model from local directory {path}: {exc}") from exc
    tried.append(f"local directory {path} (does not exist)")
    token = os.environ.get("HF_TOKEN") or os.environ.get("HUGGING_FACE_HUB_TOKEN")
    try:
        return FluxKontextPipeline.from_pretrained(model, dtype=dtype, token=token).to(device)
    except Exception as exc:
        tried.append(f"Hugging Face Hub id {model!r} ({type(exc).__name__}: {str(exc).splitlines()[0][:300]})")
        hint = "" if token else " FLUX.1-Kontext-dev is gated: set HF_TOKEN."
        raise ModelLoadError(
            f"Could not load model {model!r}. Tried: " + "; ".join(tried) + "." + hint
            + " For an offline test model use --model tiny (or --model synthetic-full on a GPU for speed tests)."
        ) from exc


def _quiet_progress_bars() -> None:
    """Loading bars are noise in server logs; errors still surface as exceptions."""
    import diffusers.utils.logging as dlog
    import transformers.utils.logging as tlog

    dlog.disable_progress_bar()
    tlog.disable_progress_bar()


def load_model(source: str, device: str, cache_dir: Path | None = None) -> LoadedModel:
    _quiet_progress_bars()
    t0 = time.perf_counter()
    if source == TINY:
        pipe = load_tiny(device, cache_dir)
        synthetic, desc = True, "tiny: real Kontext pipeline classes at toy size, deterministic random weights"
    elif source == SYNTHETIC_FULL:
        pipe = build_synthetic_full(device)
        synthetic = True
        desc = "synthetic-full: full FLUX.1-Kontext architecture with RANDOM weights; for speed measurement only"
    else:
        pipe = load_pretrained(source, device)
        synthetic, desc = False, f"pretrained weights from {source}"
    pipe.set_progress_bar_config(disable=True)
    for name in ("transformer", "vae", "text_encoder", "text_encoder_2"):
        getattr(pipe, name).eval().requires_grad_(False)
    return LoadedModel(pipe=pipe, source=source, synthetic=synthetic, description=desc,
                       load_seconds=time.perf_counter() - t0)
