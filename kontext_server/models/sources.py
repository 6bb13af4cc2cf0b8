"""Where the pipeline comes from: `tiny` (tiny.py), `synthetic-full` (synthetic.py), or real weights from a hub id
or a local diffusers directory (here).

`load_model` is the one entry: it returns a LoadedModel that says whether the weights carry meaning. A model that
cannot be found raises ModelLoadError whose message says what was tried and what to do (the server stops at
start-up with it).
"""
from __future__ import annotations

import logging
import time
from dataclasses import dataclass
from pathlib import Path

import torch

from kontext_server import settings
from kontext_server.models import ModelLoadError
from kontext_server.models import synthetic as synthetic_model
from kontext_server.models import tiny as tiny_model

log = logging.getLogger(__name__)

TINY = "tiny"
SYNTHETIC_FULL = "synthetic-full"
HUB_DEFAULT = "black-forest-labs/FLUX.1-Kontext-dev"

__all__ = ["HUB_DEFAULT", "LoadedModel", "ModelLoadError", "SYNTHETIC_FULL", "TINY", "load_model", "load_pretrained"]


@dataclass
class LoadedModel:
    pipe: object  # FluxKontextPipeline
    source: str  # what the user asked for (tiny, synthetic-full, hub id or path)
    synthetic: bool  # weights are random / toy: images carry no meaning
    description: str
    load_seconds: float


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
    token = settings.HF_TOKEN.get() or settings.HF_TOKEN_LEGACY.get()
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
        pipe = tiny_model.load_tiny(device, cache_dir)
        synthetic, desc = True, "tiny: real Kontext pipeline classes at toy size, deterministic random weights"
    elif source == SYNTHETIC_FULL:
        pipe = synthetic_model.build_synthetic_full(device)
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
