"""Timing a request the way every benchmark here does: a warm-up first (compile / capture reported as cold start),
then `runs` timed runs; medians and spread per stage, peak memory, the GPU's clocks during the timed runs."""
from __future__ import annotations

import contextlib
import time

import numpy as np
import torch
from PIL import Image

from kontext_server.benchmark.fidelity import fidelity
from kontext_server.benchmark.gpu_clocks import ClockSampler
from kontext_server.request import InferenceRequest

STAGE_KEYS = ("text_encode", "image_encode", "transformer", "transformer_per_step", "vae_decode", "glue", "total")


def test_image(width: int, height: int) -> Image.Image:
    """A deterministic, structured input image (gradients + shapes), not constant: encoders see real content."""
    x = np.linspace(0, 1, width)[None, :, None]
    y = np.linspace(0, 1, height)[:, None, None]
    arr = np.concatenate([x * np.ones_like(y), y * np.ones_like(x), (x * y) ** 0.5], axis=2)
    return Image.fromarray((arr * 255).astype(np.uint8))


def warm_up(service, req: InferenceRequest, image, should_stop=None):
    """One untimed generation (compile / capture happen here and are reported as cold start); (result, ms)."""
    t0 = time.perf_counter()
    warm = service.generate(req, image, should_stop=should_stop, output_type="np")
    return warm, (time.perf_counter() - t0) * 1000


def timed_run(service, req: InferenceRequest, image, should_stop=None):
    if should_stop and (err := should_stop()):
        raise err
    return service.generate(req, image, should_stop=should_stop, output_type="np")


def summarise(results: list, warm, warm_ms: float, clocks: dict | None, cuda: bool) -> dict:
    """One row from a variant's timed runs. The per-stage figures are those of the run with the median total, so
    they add up to the total shown (medians taken stage by stage do not); the spread is the totals' min-max."""
    totals = [r.timings_ms["total"] for r in results]
    median_run = sorted(results, key=lambda r: r.timings_ms["total"])[(len(results) - 1) // 2]
    last = results[-1]
    return {
        "timings_ms": {k: round(median_run.timings_ms.get(k, 0.0), 2) for k in STAGE_KEYS},
        "total_min_ms": round(min(totals), 2), "total_max_ms": round(max(totals), 2),
        "totals_ms": [round(t, 2) for t in totals],
        "cold_start_ms": round(warm.timings_ms.get("cold_start", 0.0), 1),  # compile / capture, not the timed runs
        "first_run_ms": round(warm_ms, 1),
        "steps": last.steps, "steps_computed": last.steps_computed, "steps_skipped": last.steps_skipped,
        "cache_threshold": last.cache_threshold,  # None: the first-block cache did not run
        "peak_memory_gib": round(torch.cuda.max_memory_allocated() / 2**30, 2) if cuda else None,
        "applied": [k for k, d in last.optimizations.items() if d.applied],
        "not_applied": {k: d.detail for k, d in last.optimizations.items() if d.requested and not d.applied},
        "gpu_clocks": clocks,
        "_result": last,
    }


def time_request(service, req: InferenceRequest, image, runs: int, should_stop=None,
                 sampler: ClockSampler | None = None) -> dict:
    """Warm-up (reported), then `runs` timed runs of one variant, summarised; with a sampler the GPU's clocks and
    power during the timed runs."""
    cuda = service.device_info.is_cuda
    warm, warm_ms = warm_up(service, req, image, should_stop)
    if cuda:
        torch.cuda.synchronize()
        torch.cuda.reset_peak_memory_stats()
    t_runs = time.monotonic()
    results = [timed_run(service, req, image, should_stop) for _ in range(runs)]
    clocks = sampler.window(t_runs, time.monotonic()) if sampler is not None else None
    return summarise(results, warm, warm_ms, clocks, cuda)


def within_noise(a: dict, b: dict) -> bool:
    """Whether two rows' totals overlap (min-max of their timed runs): their ratio is then noise, not a speed-up."""
    return a["total_min_ms"] <= b["total_max_ms"] and b["total_min_ms"] <= a["total_max_ms"]


def finish_rows(rows: list[dict], ref_key: str = "0") -> None:
    """Ratios against the reference row and the previous row. End to end always; where the step counts differ, per
    step as well (a row with half the steps is not twice as fast per step); each ratio says when it is inside the
    noise of the two rows' timed runs."""
    base = next((r for r in rows if r["stage"] == ref_key), rows[0])
    prev = None
    for row in rows:
        t = row["timings_ms"]
        row["speedup_vs_stage0"] = round(base["timings_ms"]["total"] / t["total"], 2)
        row["within_noise_vs_stage0"] = row is not base and within_noise(base, row)
        if row["steps"] != base["steps"] and t["transformer_per_step"]:
            row["per_step_speedup_vs_stage0"] = round(base["timings_ms"]["transformer_per_step"]
                                                      / t["transformer_per_step"], 2)
        if prev is not None:
            row["speedup_vs_previous"] = round(prev["timings_ms"]["total"] / t["total"], 2)
            row["within_noise_vs_previous"] = within_noise(prev, row)
        row["fidelity_vs_stage0"] = fidelity(base["_result"], row["_result"]) if row is not base else {}
        if row["stage"].endswith("c"):  # a side row (the cache variant) is not "the previous stage"
            main = next((r for r in rows if r["stage"] == row["stage"][:-1]), None)
            if main is not None:  # against the same row without the cache: the cache's own error
                row["fidelity_vs_uncached"] = {"stage": main["stage"], **fidelity(main["_result"], row["_result"])}
        else:
            prev = row
    for row in rows:
        row.pop("_result", None)


def clock_sampler(service) -> ClockSampler | None:
    """A started sampler of the service's GPU, None on CPU. An H100 at its power cap clocks down under sustained fp8
    work (docs/benchmarking.md): each benchmark row says what clocks its timed runs had."""
    if not service.device_info.is_cuda:
        return None
    return ClockSampler(sample_ms=100, device_index=torch.device(service.device).index or 0).start()


@contextlib.contextmanager
def sampling_clocks(service):
    """clock_sampler's sampler (or None) for the duration of a benchmark; its nvidia-smi child stopped after."""
    sampler = clock_sampler(service)
    try:
        yield sampler
    finally:
        if sampler is not None:
            sampler.stop()
