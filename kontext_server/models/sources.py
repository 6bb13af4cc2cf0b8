"""Where the pipeline comes from: `tiny` (tiny.py), `synthetic-full` (synthetic.py), or real weights from a hub id, the
local Hugging Face cache or a diffusers directory (hub.py); optionally its transformer from one single file in
Black Forest Labs' layout, bf16 or fp8 (`--transformer`, single_file.py).

`load_model` is the one entry: it returns a LoadedModel that says whether the weights carry meaning, where they came
from (hub, cache offline, directory, built here), the single file's report, how long the load took and the host
memory it peaked at (host_memory.py). A model that cannot be found or a file that cannot be used raises
ModelLoadError whose message says what was tried and what to do (the server stops at start-up with it).
"""
from __future__ import annotations

import logging
import time
from dataclasses import dataclass, field
from pathlib import Path

import torch

from kontext_server.models import ModelLoadError, host_memory, hub, single_file
from kontext_server.models import synthetic as synthetic_model
from kontext_server.models import tiny as tiny_model
from kontext_server.models.fp8_storage import Fp8Storage

log = logging.getLogger(__name__)

TINY = "tiny"
SYNTHETIC_FULL = "synthetic-full"
HUB_DEFAULT = "black-forest-labs/FLUX.1-Kontext-dev"

__all__ = ["HUB_DEFAULT", "LoadedModel", "ModelLoadError", "SYNTHETIC_FULL", "TINY", "load_model"]


@dataclass
class LoadedModel:
    pipe: object  # FluxKontextPipeline
    source: str  # what the user asked for (tiny, synthetic-full, hub id or path)
    synthetic: bool  # weights are random / toy: images carry no meaning
    description: str
    load_seconds: float
    origin: dict = field(default_factory=dict)  # where the pipeline came from (hub.Location.origin, or built)
    transformer_file: dict | None = None  # --transformer: the file, its layout and storage (single_file)
    fp8: Fp8Storage | None = None  # what that file stores in fp8: the fp8 variant reuses it
    host_memory: dict = field(default_factory=dict)  # host_memory.summary of the whole load
    stage_seconds: dict = field(default_factory=dict)  # transformer file / pipeline


def model_dtype(device: str) -> torch.dtype:
    """bf16 on CUDA like the real model; fp32 on CPU (bf16 matmuls are slow there)."""
    return torch.bfloat16 if device.startswith("cuda") else torch.float32


def _model_step(source: str, fn, *args, **kwargs):
    """fn(*args, **kwargs), its ModelLoadError prefixed with the model asked for."""
    try:
        return fn(*args, **kwargs)
    except ModelLoadError as exc:
        raise ModelLoadError(f"Could not load model {source!r}: {exc}") from None


def _quiet_progress_bars() -> None:
    """Loading bars are noise in server logs; errors still surface as exceptions."""
    import diffusers.utils.logging as dlog
    import transformers.utils.logging as tlog

    dlog.disable_progress_bar()
    tlog.disable_progress_bar()


def load_model(source: str, device: str, cache_dir: Path | None = None,
               transformer: str | Path | None = None, on_host: bool = False) -> LoadedModel:
    """The pipeline `source` names, with its transformer from the single file `transformer` when given. `on_host`:
    loaded into host memory in `device`'s dtype and left there, for a memory budget to place
    (kontext_server/service/memory_tiers.py); synthetic-full is then built through the device one tensor at a time."""
    _quiet_progress_bars()
    t0 = time.perf_counter()
    dtype = model_dtype(device)
    with host_memory.measure() as mem:
        location = None
        if source == TINY:
            pipeline_dir = tiny_model.ensure_tiny_saved(cache_dir)
            origin = {"kind": "built", "path": str(pipeline_dir)}
        elif source == SYNTHETIC_FULL:
            synthetic_model.check_device(device)
            pipeline_dir, origin = None, {"kind": "built", "path": None}
        else:
            location = _model_step(source, hub.locate, source, skip=("transformer",) if transformer else ())
            pipeline_dir, origin = location.local_dir, location.origin
        stages, fp8, file_report, components = {}, None, None, {}
        if transformer:
            tf = time.perf_counter()
            try:
                loaded = single_file.load_transformer(transformer, "cpu" if on_host else device, dtype, pipeline_dir)
            except ModelLoadError as exc:
                raise ModelLoadError(f"Could not load --transformer {exc}") from None
            components["transformer"], fp8, file_report = loaded.module, loaded.fp8, loaded.report
            stages["transformer_file"] = round(time.perf_counter() - tf, 2)
        t1 = time.perf_counter()
        if source == TINY:
            pipe = tiny_model.load_tiny(device, cache_dir, on_host=on_host, **components)
            synthetic, desc = True, "tiny: real Kontext pipeline classes at toy size, deterministic random weights"
        elif source == SYNTHETIC_FULL:
            pipe = synthetic_model.build_synthetic_full(device, on_host=on_host, **components)
            synthetic = True
            desc = "synthetic-full: full FLUX.1-Kontext architecture with RANDOM weights; for speed measurement only"
        else:
            pipe = _model_step(source, hub.load_pipeline, location, dtype, **components)
            if not on_host:
                pipe = pipe.to(device)
            synthetic, desc = False, f"pretrained weights from {source}"
        stages["pipeline"] = round(time.perf_counter() - t1, 2)
    if transformer:
        desc += f"; transformer from the single file {file_report['file']}"
    pipe.set_progress_bar_config(disable=True)
    for name in ("transformer", "vae", "text_encoder", "text_encoder_2"):
        getattr(pipe, name).eval().requires_grad_(False)
    return LoadedModel(pipe=pipe, source=source, synthetic=synthetic, description=desc,
                       load_seconds=time.perf_counter() - t0, origin=origin, transformer_file=file_report, fp8=fp8,
                       host_memory=host_memory.summary(mem.result), stage_seconds=stages)
