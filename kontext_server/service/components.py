"""The loaded model as the service holds it: the pipeline, its transformer variants, the VAE's functions, the
compile cache, and the upstream fixes applied at load.

What: `load_components` loads a model source and wraps it in `optimizations.base.Components` (what optimisations
act on); `open_compile_cache` keys and opens the on-disk compile cache before compile is prepared.
Why apart from the service: loading and what was loaded are one concern; planning and running a request are others.
"""
from __future__ import annotations

import logging
import os
from dataclasses import dataclass, field
from pathlib import Path

from kontext_server import settings
from kontext_server.models import sources
from optimizations.base import Components, DeviceInfo, EXACT
from optimizations.compiling.cache import CompileCache, cache_key
from optimizations.fp8.stored import StoredFp8
from patches import t5_contiguous_position_bias

log = logging.getLogger("flux.service")


@dataclass
class Loaded:
    model: sources.LoadedModel
    components: Components
    load_fixes: dict = field(default_factory=dict)  # patches/ applied to the loaded components, with counts


def load_components(source: str, device: str, device_info: DeviceInfo, cache_root: Path,
                    transformer: str | None = None, on_host: bool = False) -> Loaded:
    """`on_host`: the model stays in host memory for a memory budget to place (memory_tiers.py, offload.py)."""
    model = sources.load_model(source, device, cache_root, transformer=transformer, on_host=on_host)
    pipe = model.pipe
    stored = None
    if model.fp8 is not None:  # the file's fp8 weights, which the fp8 copy takes instead of quantising again
        stored = StoredFp8(row_scales=model.fp8.row_scales, source=Path(model.transformer_file["file"]).name,
                           not_reusable=model.fp8.not_reusable)
    components = Components(pipe=pipe, device_info=device_info, variants={EXACT: pipe.transformer},
                            vae_encode={"eager": pipe.vae.encode}, vae_decode={"eager": pipe.vae.decode},
                            stored_fp8=stored)
    # Older transformers hand T5's bias to SDPA as a strided view: the GPU falls back to fp32 math attention
    fixes = {"t5_contiguous_position_bias": t5_contiguous_position_bias.apply(pipe.text_encoder_2)}
    return Loaded(model=model, components=components, load_fixes=fixes)


def _inductor_cache_dir_is_default() -> bool:
    """True unless the operator chose TORCHINDUCTOR_CACHE_DIR (importing diffusers already sets torch's default)."""
    current = settings.INDUCTOR_CACHE_DIR.get()
    if current is None:
        return True
    try:
        from torch._inductor.runtime.cache_dir_utils import default_cache_dir
    except ImportError:  # older torch: keep whatever is there
        return False
    return os.path.abspath(current) == os.path.abspath(default_cache_dir())


def open_compile_cache(loaded: Loaded, cache_root: Path, names: list[str], compile_settings: str) -> CompileCache:
    """Key and load the compile cache for a prepared set `names`.

    Inductor's own on-disk cache (compiled kernels, C++ objects) goes next to the model cache, unless the operator
    chose one: a restart on the same machine or volume then skips kernel compilation. The mega-cache file is the
    portable part (it carries GPU kernels; on CPU the C++ is rebuilt from it). `compile_settings` carries every
    compile setting that changes generated code (mode / scope / inductor flags)."""
    if _inductor_cache_dir_is_default():
        settings.set_process_env(settings.INDUCTOR_CACHE_DIR, str(cache_root / "inductor"))
    cfg = dict(loaded.components.variants[EXACT].config)
    key = cache_key(loaded.components.device_info.name, {k: v for k, v in cfg.items() if not k.startswith("_")}
                    | {"source": loaded.model.source}, names, compile_settings)
    cache = CompileCache(cache_root / "compile", key)
    cache.load()
    return cache
