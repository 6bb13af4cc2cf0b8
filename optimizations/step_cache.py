"""Optimisation wrapper for the first-block cache (mechanism in first_block_cache.py).

Per request: `use_first_block_cache` with `cache_threshold`. The cache is installed on the eager transformer
instances only (never on the class), and its state lives for one request. Whole-model compile and CUDA graphs
cannot skip blocks data-dependently: with regional compile the cache calls the compiled blocks; with full-graph
compile, or with CUDA graphs, the two do not combine and the response says so.
"""
from __future__ import annotations

from .base import Optimization, RunContext
from .first_block_cache import FirstBlockCache


class FirstBlockCacheOpt(Optimization):
    name, flag, load_time, lossy = "first_block_cache", "use_first_block_cache", False, True

    def prepare(self, service) -> str:
        for module in service.transformer_variants.values():
            cache_for(module)
        return "first-block cache installed on the transformer instance(s); threshold per request"

    def activate(self, run: RunContext):
        threshold = run.request.cache_threshold
        cache = cache_for(run.service.transformer_variants[run.precision])
        return cache.session(threshold), f"threshold {threshold}"


def cache_for(module) -> FirstBlockCache:
    """The cache installed on this transformer instance, installing one if none is (e.g. on an fp8 copy made
    after the cache was prepared, which carries its own copied cache)."""
    forward = vars(module).get("forward")
    owner = getattr(forward, "__self__", None)
    return owner if isinstance(owner, FirstBlockCache) else FirstBlockCache(module)
