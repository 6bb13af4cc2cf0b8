"""The request benchmark: what a running server has prepared, all flags off vs the server default vs everything
prepared, on the loaded model. Served at GET /benchmark and run by `flux_kontext_optimized.py` with no arguments.

Every variant is warmed up first, then the timed runs are interleaved (one of each variant per round), so warm-up,
order and drift effects fall on all variants alike. Each row is labelled with what actually ran."""
from __future__ import annotations

import time

import torch

from kontext_server.benchmark.timing import finish_rows, sampling_clocks, summarise, test_image, timed_run, warm_up
from kontext_server.request import FLAG_TO_OPTIMIZATION, InferenceRequest
from kontext_server.settings import code_switches

VARIANTS = [("0", "all request flags off", False), ("default", "server default", None),
            ("all", "every flag on", True)]


def run_request_benchmark(service, runs: int = 3, steps: int = 4, width: int = 256, height: int = 256,
                          edit: bool = False, should_stop=None, progress=None) -> dict:
    """Unoptimised vs the server's default vs everything it prepared, on the loaded model."""
    image = test_image(width, height) if edit else None
    base = dict(prompt="a red car on a mountain road, photo", width=width, height=height, steps=steps, seed=1234)
    cuda = service.device_info.is_cuda
    plans = []
    for key, label, flag in VARIANTS:
        req = InferenceRequest(**base, **({} if flag is None else {f: flag for f in FLAG_TO_OPTIMIZATION}))
        if key == "all" and "dpm_solver" in service.prepared:
            req = req.model_copy(update={"steps": max(1, steps // 2)})  # the solver's point: half the steps
        plans.append((key, label, req))
    warm = {}
    for key, label, req in plans:
        if progress:
            progress(f"warm-up: {label}")
        warm[key] = warm_up(service, req, image, should_stop)
    results = {key: [] for key, _, _ in plans}
    if cuda:
        torch.cuda.synchronize()
        torch.cuda.reset_peak_memory_stats()
    with sampling_clocks(service) as sampler:
        t_runs = time.monotonic()
        for _ in range(runs):
            for key, _, req in plans:
                results[key].append(timed_run(service, req, image, should_stop))
        clocks = sampler.window(t_runs, time.monotonic()) if sampler is not None else None
    rows = []
    for key, label, _req in plans:
        row = summarise(results[key], *warm[key], clocks, cuda)
        ran = ", ".join(row["applied"]) or "no optimisation"
        rows.append({"stage": key, "label": f"{label}: ran {ran}", **row})
    finish_rows(rows)
    return {"model": service.model.source, "synthetic": service.model.synthetic,
            "device": service.device_info.name, "workload": {"width": width, "height": height, "edit": edit,
                                                              "steps": steps, "runs": runs},
            "torch": torch.__version__, "code_switches": code_switches(), "rows": rows}
