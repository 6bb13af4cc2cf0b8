"""The first-block cache as a registry entry (the mechanism: caching/first_block_cache.py).

Per request: `use_first_block_cache` with `cache_threshold`. The cache is installed on the transformer instances only
(never on the class), and its state lives for one request: a session per request, whose step counts the response
reports. It skips blocks by a decision taken on the host each step, so it does not run inside a CUDA graph or a
whole-model compiled graph: `conflicts` says so and the planner reports it (with regional compile it calls the
compiled blocks).
"""
from __future__ import annotations

import contextlib

from optimizations.base import Components, Conflict, Optimization, RunContext
from optimizations.caching.first_block_cache import FirstBlockCache


class FirstBlockCacheOpt(Optimization):
    name, flag, load_time, lossy = "first_block_cache", "use_first_block_cache", False, True
    in_warm_key = True  # the cached forward calls the compiled blocks in its own way
    offload_conflict = "the step cache replaces the transformer's forward, which the offload hooks wrap as well"

    def prepare(self, components: Components) -> str:
        for module in components.variants.values():
            cache_for(module)
        return "first-block cache installed on the transformer instance(s); threshold per request"

    def conflicts(self) -> list[Conflict]:
        return [Conflict("cuda_graphs", drop="cuda_graphs",
                         reason="not combinable with the first-block cache (data-dependent skipping)")]

    def adopt(self, components: Components, precision: str, module) -> None:
        cache_for(module)

    @contextlib.contextmanager
    def activate(self, run: RunContext):
        threshold = run.request.cache_threshold
        with cache_for(run.variant).session(threshold, run.collective) as stats:
            run.report["step_cache"] = stats  # computed / skipped calls, read after the generation
            yield


def cache_for(module) -> FirstBlockCache:
    """The cache installed on this transformer instance, installing one if none is (e.g. on an fp8 copy made
    after the cache was prepared, which carries its own copied cache)."""
    forward = vars(module).get("forward")
    owner = getattr(forward, "__self__", None)
    return owner if isinstance(owner, FirstBlockCache) else FirstBlockCache(module)
