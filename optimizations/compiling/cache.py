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
import tempfile
import time
from pathlib import Path

import torch

from kontext_server import settings

log = logging.getLogger("flux.compile_cache")


def _triton_version() -> str:
    try:
        import triton

        return triton.__version__
    except Exception:
        return "none"


def switched_off(var: settings.EnvVar) -> bool:
    """Whether code switch `var` (an A/B switch of the fp8 rewrites, the bf16 GELU epilogue or the proj_out split)
    is off. The modules that read a switch and the cache key below share this one reading: a start with another
    setting compiles other graphs, so it gets its own file. A switch missing from settings.CODE_SWITCHES would change
    the compiled code without changing the key, so asking for one is an error."""
    if var not in settings.CODE_SWITCHES:
        raise KeyError(f"{var.name} is not in settings.CODE_SWITCHES")
    return var.off()


def cache_key(device_name: str, model_config: dict, optimizations: list[str], compile_mode: str) -> str:
    """`compile_mode` carries every compile setting that changes generated code (mode, scope, inductor flags)."""
    material = json.dumps({
        "torch": torch.__version__, "triton": _triton_version(), "device": device_name,
        "model": model_config, "optimizations": sorted(optimizations), "mode": compile_mode,
        "switches": settings.code_switches(),
    }, sort_keys=True, default=str)
    return hashlib.sha256(material.encode()).hexdigest()[:24]


class CompileCache:
    def __init__(self, directory: Path, key: str):
        self.path = Path(directory) / f"mega-cache-{key}.bin"
        self.key = key
        self.loaded = False
        self.load_detail = "not loaded"
        self.saved_bytes = 0
        self.load_seconds = self.save_seconds = 0.0
        self.saves = self.saves_skipped = 0
        self._misses_at_save = 0  # graphs this process had compiled when the file last took them in
        self._file_current = False  # the file holds everything this process has compiled (loaded or saved)

    def load(self) -> bool:
        t0 = time.perf_counter()
        try:
            return self._load()
        finally:
            self.load_seconds = time.perf_counter() - t0

    def _load(self) -> bool:
        if not self.path.exists():
            self.load_detail = f"miss: no artifacts for key {self.key}"
            return False
        try:
            info = torch.compiler.load_cache_artifacts(self.path.read_bytes())
        except Exception as exc:  # a corrupt or incompatible file must not stop the server
            self.load_detail = f"could not load {self.path.name}: {exc}"
            log.warning(self.load_detail)
            return False
        self.loaded = self._file_current = info is not None
        self.load_detail = f"loaded {self.path.name} ({self.path.stat().st_size} bytes)" if self.loaded else \
            f"{self.path.name} held no usable artifacts"
        return self.loaded

    @staticmethod
    def counters() -> dict:
        """Inductor's and AOTAutograd's cache counters for this process: hits mean compiled code came from the cache.
        An AOTAutograd miss or bypass re-traces the graph's forward on a warm start even when inductor's FX graph
        is a hit (seconds per graph at full size)."""
        from torch._dynamo.utils import counters

        c, a = counters["inductor"], counters["aot_autograd"]
        return ({k: int(c.get(k, 0)) for k in ("fxgraph_cache_hit", "fxgraph_cache_miss")}
                | {k: int(a.get(k, 0)) for k in ("autograd_cache_hit", "autograd_cache_miss", "autograd_cache_bypass")})

    @classmethod
    def _misses(cls) -> int:
        """Graphs compiled from scratch in this process so far (inductor FX graphs and AOTAutograd entries)."""
        c = cls.counters()
        return c["fxgraph_cache_miss"] + c["autograd_cache_miss"]

    def save(self) -> int:
        """Write the artifacts, unless the loaded file already holds everything this process compiled.

        After a load, a warm-up that only hit the cache has nothing new to add, and serialising the whole bundle
        again would only add to start-up (it is called after every cold run). Returns the bytes written (0: skipped).
        """
        misses = self._misses()
        if self._file_current and misses == self._misses_at_save:
            self.saves_skipped += 1
            return 0
        t0 = time.perf_counter()
        result = torch.compiler.save_cache_artifacts()
        if result is None:
            return 0
        data, _info = result
        self.path.parent.mkdir(parents=True, exist_ok=True)
        # A temporary name of this writer's own: processes sharing the directory (replicas on one host) may save the
        # same key at once; each renames a whole file over the path, and readers never see a half-written one.
        fd, tmp = tempfile.mkstemp(dir=self.path.parent, prefix=f".{self.path.name}.", suffix=".tmp")
        try:
            with os.fdopen(fd, "wb") as fh:
                fh.write(data)
            os.replace(tmp, self.path)
        except BaseException:
            Path(tmp).unlink(missing_ok=True)
            raise
        self.saved_bytes = len(data)
        self._file_current = True  # the file now holds what this process has compiled
        self._misses_at_save = misses
        self.saves += 1
        self.save_seconds += time.perf_counter() - t0
        return len(data)
