"""The request benchmark: what a running server has prepared, all flags off vs the server default vs everything
prepared, on the loaded model. Served at GET /benchmark and run by `flux_kontext_optimized.py` with no arguments."""
from __future__ import annotations

import torch

from kontext_server.benchmark.timing import finish_rows, sampling_clocks, test_image, time_request
from kontext_server.request import FLAG_TO_OPTIMIZATION, InferenceRequest
from kontext_server.settings import code_switches


def run_request_benchmark(service, runs: int = 3, steps: int = 4, width: int = 256, height: int = 256,
                          edit: bool = False, should_stop=None, progress=None) -> dict:
    """Unoptimised vs the server's default vs everything it prepared, on the loaded model."""
    image = test_image(width, height) if edit else None
    base = dict(prompt="a red car on a mountain road, photo", width=width, height=height, steps=steps, seed=1234)
    variants = [("0", "all request flags off (load-time optimisations stay on)", {f: False for f in FLAG_TO_OPTIMIZATION}),
                ("default", "server default (lossless prepared optimisations)", {}),
                ("all", "everything prepared (incl. lossy: fp8, DPM-Solver++, step cache)",
                 {f: True for f in FLAG_TO_OPTIMIZATION})]
    rows = []
    with sampling_clocks(service) as sampler:
        for key, label, flags in variants:
            if progress:
                progress(label)
            req = InferenceRequest(**base, **flags)
            if key == "all" and req.use_dpm_solver and "dpm_solver" in service.prepared:
                req = req.model_copy(update={"steps": max(1, steps // 2)})  # the solver's point: half the steps
            row = {"stage": key, "label": label, **time_request(service, req, image, runs, should_stop, sampler)}
            rows.append(row)
    finish_rows(rows)
    return {"model": service.model.source, "synthetic": service.model.synthetic,
            "device": service.device_info.name, "workload": {"width": width, "height": height, "edit": edit,
                                                              "steps": steps, "runs": runs},
            "torch": torch.__version__, "code_switches": code_switches(), "rows": rows}
