"""What streamed partial images cost: the same request with and without the previews a stream would decode.

What: `run_preview_benchmark`, on a loaded service, runs one request twice per round, once plain and once with a
step hook that decodes `partial_images` previews at the steps a stream would (service/steps.py's `preview_steps`),
alternating which goes first, after one untimed warm-up of each. It reports the medians of the
request's total both ways, the previews' own time (the request's `preview` stage: the decodes on the worker), the
cost per preview, both as a fraction of the plain request, and a preview's cost over the request's own final VAE
decode (a preview is one such decode at the same size, plus the conversion to an image): that ratio carries over
between machines better than the fraction does. Encoding a preview (PNG, done in the HTTP layer's thread pool, off
the worker) is timed apart.
Why: the budget is the previews' cost under 10% of the request, to be measured on the GPU (synthetic-full,
edit-1024, fast tier); tools/preview_cost.py runs this there in one command.
"""
from __future__ import annotations

import statistics
import time

from kontext_server.benchmark.timing import test_image
from kontext_server.request import InferenceRequest
from kontext_server.service.steps import preview_steps
from utils import encode_image_bytes


def run_preview_benchmark(service, width: int, height: int, edit: bool, partial_images: int = 3, runs: int = 3,
                          steps: int | None = None, flags: dict | None = None) -> dict:
    image = test_image(width, height) if edit else None
    req = InferenceRequest(prompt="a red car on a mountain road, photo", width=width, height=height, steps=steps,
                           seed=1234, **(flags or {}))
    previews: list = []

    def hook(event) -> None:
        if event.step in preview_steps(event.steps, partial_images):
            previews.append(event.preview())

    def plain():
        return service.generate(req, image)

    def streamed():
        previews.clear()
        result = service.generate(req, image, on_step=hook)
        return result, len([p for p in previews if p is not None])

    plain()  # warm-ups: compile / capture of this shape, the preview decode's first call
    streamed()
    totals_plain, totals_streamed, preview_ms, counts, decode_ms = [], [], [], [], []
    for i in range(runs):
        order = (False, True) if i % 2 == 0 else (True, False)
        for with_previews in order:
            if with_previews:
                result, count = streamed()
                totals_streamed.append(result.timings_ms["total"])
                preview_ms.append(result.timings_ms.get("preview", 0.0))
                counts.append(count)
            else:
                result = plain()
                totals_plain.append(result.timings_ms["total"])
                decode_ms.append(result.timings_ms["vae_decode"])
    t0 = time.perf_counter()
    encoded = encode_image_bytes(previews[-1], "png") if previews and previews[-1] is not None else b""
    encode_ms = (time.perf_counter() - t0) * 1000 if encoded else None
    plain_ms, streamed_ms, prev_ms, vae_ms = (statistics.median(x) for x in (totals_plain, totals_streamed,
                                                                              preview_ms, decode_ms))
    n = statistics.median(counts)
    return {
        "model": service.model.source, "synthetic": service.model.synthetic, "device": service.device_info.name,
        "workload": {"width": width, "height": height, "edit": edit, "steps": result.steps, "runs": runs,
                     "partial_images": partial_images, "preview_steps": preview_steps(result.steps, partial_images),
                     "flags": flags or {}},
        "applied": [k for k, d in result.optimizations.items() if d.applied],
        "plain_total_ms": round(plain_ms, 2), "streamed_total_ms": round(streamed_ms, 2),
        "previews_per_request": n, "preview_ms_per_request": round(prev_ms, 2),
        "ms_per_preview": round(prev_ms / n, 2) if n else None,
        "preview_fraction_of_request": round(prev_ms / plain_ms, 4),
        "vae_decode_ms": round(vae_ms, 2),  # the plain request's final decode
        "preview_over_vae_decode": round(prev_ms / n / vae_ms, 3) if n and vae_ms else None,
        "wall_overhead_fraction": round((streamed_ms - plain_ms) / plain_ms, 4),
        "png_encode_ms_per_preview": round(encode_ms, 2) if encode_ms is not None else None,
        "raw": {"plain_total_ms": totals_plain, "streamed_total_ms": totals_streamed, "preview_ms": preview_ms,
                "vae_decode_ms": decode_ms},
    }
