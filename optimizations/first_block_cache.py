"""The first-block cache as a registry entry (the mechanism: caching/first_block_cache.py).

Per request: `use_first_block_cache` with `cache_threshold`. The cache is installed on the transformer instances only
(never on the class), and its state lives for one request: a session per request, whose step counts the response
reports, with the threshold it used in the entry's detail. Eager, it takes its skip decision inside the transformer
call; under CUDA graphs the graph runner replays the cache's captured pieces (the first block with the decision
scalar, then the remaining blocks or the skip path) and takes the same decision between them (cuda_graphs.py), so
the two combine. It does not run inside a whole-model compiled graph (`--compile-scope full` declares that conflict);
with regional compile it calls the compiled blocks.

The default threshold depends on the scheduler (DEFAULT_THRESHOLDS); a request's `cache_threshold` overrides it.
"""
from __future__ import annotations

import contextlib

from optimizations.base import Components, Optimization, RunContext
from optimizations.caching.first_block_cache import FirstBlockCache, installed_cache

# The threshold a request gets when it gives none, by the scheduler it runs (RunContext.scheduler), each tuned for
# that scheduler's default step count. Euler, 28 steps: 0.12. DPM-Solver++ 2M, 14 steps: 0.24, because its steps
# cover the same sigma range in half as many steps, and the first block's residual changes about in proportion to
# the step, so twice the threshold skips on the same drift per unit of sigma as 0.12 does on Euler-28.
# Not validated on real weights here (random weights skip nothing at either value): a request can always set its own.
DEFAULT_THRESHOLDS = {"euler": 0.12, "dpm_solver": 0.24}
SCHEDULER_NAMES = {"euler": "Euler", "dpm_solver": "DPM-Solver++"}


def default_threshold(scheduler: str) -> float:
    return DEFAULT_THRESHOLDS.get(scheduler, DEFAULT_THRESHOLDS["euler"])


class FirstBlockCacheOpt(Optimization):
    name, flag, load_time, lossy = "first_block_cache", "use_first_block_cache", False, True
    in_warm_key = True  # the cached forward calls the compiled blocks in its own way; under graphs, its own graphs
    offload_conflict = "the step cache replaces the transformer's forward, which the offload hooks wrap as well"

    def prepare(self, components: Components) -> str:
        for module in components.variants.values():
            cache_for(module)
        defaults = ", ".join(f"{SCHEDULER_NAMES[s]} {t:g}" for s, t in DEFAULT_THRESHOLDS.items())
        return (f"first-block cache installed on the transformer instance(s); threshold per request (default by "
                f"scheduler: {defaults})")

    def adopt(self, components: Components, precision: str, module) -> None:
        cache_for(module)

    @staticmethod
    def threshold(run: RunContext) -> tuple[float, str]:
        """The threshold this request runs with, and where it comes from."""
        given = getattr(run.request, "cache_threshold", None)
        if given is not None:
            return float(given), "the request's"
        return default_threshold(run.scheduler), f"the {SCHEDULER_NAMES.get(run.scheduler, run.scheduler)} default"

    @contextlib.contextmanager
    def activate(self, run: RunContext):
        threshold, source = self.threshold(run)
        with cache_for(run.variant).session(threshold, run.collective) as stats:
            run.report["step_cache"] = stats  # computed / skipped calls, read after the generation
            yield
        how = "; decided per step between captured graphs" if stats.graphed else ""
        run.details[self.name] = f"threshold {threshold:g} ({source}){how}"


def cache_for(module) -> FirstBlockCache:
    """The cache installed on this transformer instance, installing one if none is (e.g. on an fp8 copy made
    after the cache was prepared, which carries its own copied cache)."""
    return installed_cache(module) or FirstBlockCache(module)
