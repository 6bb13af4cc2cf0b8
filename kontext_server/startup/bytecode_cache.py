"""Python bytecode for torch, diffusers and the rest, cached under the server's cache directory.

Why: a start imports a lot of Python (torch, torch._dynamo, inductor, diffusers, transformers). Python normally
caches the compiled bytecode in `__pycache__` next to each source file, but container images often turn that off
(`PYTHONDONTWRITEBYTECODE=1`) or install packages read-only without `.pyc` files. Then every start compiles all of
that source again: on such an image that was most of a warm start's time (benchmarks/2026-11-23-h100-coldstart).

So, only when Python would otherwise not keep the bytecode, it goes under the cache directory that already holds
the model and the compile caches (`<cache>/pycache`, through `sys.pycache_prefix`): the first start pays the
compilation, later starts on the same volume load it. Nothing is written into the package directories, which is
what PYTHONDONTWRITEBYTECODE usually protects. Where Python already writes `__pycache__`, nothing changes.

Must run before the heavy imports (the entry points call `enable()` first); later imports still benefit.
Stdlib only for that reason. `FLUX_BYTECODE_CACHE=0` turns it off; a PYTHONPYCACHEPREFIX the operator set is kept.
"""
from __future__ import annotations

import importlib.util
import os
import sys
from pathlib import Path

from kontext_server import settings

PROBE_PACKAGE = "torch"  # the bulk of the start-up imports; where its bytecode goes decides

status: dict | None = None  # what enable() decided (reported in /health), None before the first call


def _package_bytecode(name: str) -> tuple[bool, bool] | None:
    """(ships bytecode, directory writable) for a package, None if it is not found. find_spec on a top-level
    package locates it without importing it; its __init__'s .pyc stands for the package's."""
    try:
        spec = importlib.util.find_spec(name)
    except (ImportError, ValueError):
        return None
    if spec is None or not spec.origin or not os.path.isabs(spec.origin) or not spec.origin.endswith(".py"):
        return None
    ships = os.path.exists(importlib.util.cache_from_source(spec.origin))  # prefix unset here: __pycache__
    return ships, os.access(os.path.dirname(spec.origin), os.W_OK)


def enable(cache_dir: Path | str | None = None, probe: str = PROBE_PACKAGE) -> dict:
    """Cache bytecode under `<cache_dir>/pycache` if Python would not keep it; idempotent. Returns the decision.
    `probe`: the package whose bytecode decides (tests use a package of their own)."""
    global status
    if status is not None:
        return status
    if settings.BYTECODE_CACHE.off():
        status = {"enabled": False, "reason": f"{settings.BYTECODE_CACHE.name}=0"}
    elif sys.pycache_prefix is not None:
        status = {"enabled": False, "prefix": sys.pycache_prefix,
                  "reason": "the operator's PYTHONPYCACHEPREFIX is kept"}
    else:
        found = _package_bytecode(probe)
        ships, writable = found if found is not None else (False, True)
        if ships:
            status = {"enabled": False, "reason": f"not needed: {probe}'s bytecode is already next to its sources"}
        elif not sys.dont_write_bytecode and writable:
            status = {"enabled": False, "reason": "not needed: Python keeps bytecode next to the sources"}
        else:
            prefix = Path(cache_dir) if cache_dir is not None else settings.default_cache_dir()
            prefix = prefix / "pycache"
            try:
                prefix.mkdir(parents=True, exist_ok=True)
            except OSError as exc:
                status = {"enabled": False, "reason": f"cache directory not writable: {exc}"}
                return status
            why = ("bytecode writes are off (PYTHONDONTWRITEBYTECODE or -B)" if sys.dont_write_bytecode
                   else f"{probe}'s directory is read-only")
            # Both are read at each import, so setting them here covers every module imported from now on.
            sys.pycache_prefix = str(prefix)
            sys.dont_write_bytecode = False
            status = {"enabled": True, "prefix": str(prefix), "reason": why}
    return status
