"""Persistent compile cache ("mega-cache"): torch.compiler.save_cache_artifacts / load_cache_artifacts.

After warm-up the server saves the compile artifacts (inductor FX graphs, autotuning results, triton kernels);
the next start loads them before compiling, so the first call is a cache hit instead of a fresh compile.
The file is keyed by everything that changes the generated code: torch and triton versions, the device,
the model config and the prepared optimisation set. A stale cache is therefore never loaded: a different key
is a different file.
"""
from __future__ import annotations

import hashlib
import json
import logging
import os
from pathlib import Path

import torch

log = logging.getLogger("flux.compile_cache")


def _triton_version() -> str:
    try:
        import triton

        return triton.__version__
    except Exception:
        return "none"


def cache_key(device_name: str, model_config: dict, optimizations: list[str], compile_mode: str) -> str:
    """`compile_mode` carries every compile setting that changes generated code (mode, scope, inductor flags)."""
    material = json.dumps({
        "torch": torch.__version__, "triton": _triton_version(), "device": device_name,
        "model": model_config, "optimizations": sorted(optimizations), "mode": compile_mode,
    }, sort_keys=True, default=str)
    return hashlib.sha256(material.encode()).hexdigest()[:24]


class CompileCache:
    def __init__(self, directory: Path, key: str):
        self.path = Path(directory) / f"mega-cache-{key}.bin"
        self.key = key
        self.loaded = False
        self.load_detail = "not loaded"
        self.saved_bytes = 0

    def load(self) -> bool:
        if not self.path.exists():
            self.load_detail = f"miss: no artifacts for key {self.key}"
            return False
        try:
            info = torch.compiler.load_cache_artifacts(self.path.read_bytes())
        except Exception as exc:  # a corrupt or incompatible file must not stop the server
            self.load_detail = f"could not load {self.path.name}: {exc}"
            log.warning(self.load_detail)
            return False
        self.loaded = info is not None
        self.load_detail = f"loaded {self.path.name} ({self.path.stat().st_size} bytes)" if self.loaded else \
            f"{self.path.name} held no usable artifacts"
        return self.loaded

    @staticmethod
    def counters() -> dict:
        """Inductor's own cache counters for this process: hits mean compiled code came from the cache."""
        from torch._dynamo.utils import counters

        c = counters["inductor"]
        return {k: int(c.get(k, 0)) for k in ("fxgraph_cache_hit", "fxgraph_cache_miss")}

    def save(self) -> int:
        result = torch.compiler.save_cache_artifacts()
        if result is None:
            return 0
        data, _info = result
        self.path.parent.mkdir(parents=True, exist_ok=True)
        tmp = self.path.with_suffix(".tmp")
        tmp.write_bytes(data)
        os.replace(tmp, self.path)  # readers never see a half-written file
        self.saved_bytes = len(data)
        return len(data)
