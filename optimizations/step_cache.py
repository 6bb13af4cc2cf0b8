"""Optimisation wrapper for the first-block cache (mechanism in first_block_cache.py).

Per request: `use_first_block_cache` with `cache_threshold`. The cache is installed on the eager transformer
instances only (never on the class), and its state lives for one request. Whole-model compile and CUDA graphs
cannot skip blocks data-dependently, so a cached request runs the eager transformer; the response says so.
"""
from __future__ import annotations

from .base import Optimization, RunContext
from .first_block_cache import FirstBlockCache


class FirstBlockCacheOpt(Optimization):
    name, flag, load_time, lossy = "first_block_cache", "use_first_block_cache", False, True
    toggle = True

    def prepare(self, service) -> str:
        service.step_caches = {}
        for (precision, compiled), module in service.transformer_variants.items():
            if not compiled:
                service.step_caches[precision] = FirstBlockCache(module)
        return "first-block cache installed on the eager transformer(s); threshold per request"

    def activate(self, run: RunContext):
        threshold = run.request.cache_threshold
        cache = run.service.step_caches[run.precision]
        ctx = cache.session(threshold)
        return ctx, f"threshold {threshold}"
