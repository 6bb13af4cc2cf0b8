"""What a finished generation becomes on the /v1 routes: encoded images (base64 or stored URLs), our report (the
extra field `kontext` and the X-Seed / X-Timings-Ms / X-Optimizations headers), the timings and the log line.
Shared by the JSON response (serving.py) and the stream (streaming.py)."""
from __future__ import annotations

import base64
import json
import logging
import time

from fastapi import Request

from kontext_server.api.context import Server
from kontext_server.api.openai.protocol import ImageData, Report
from kontext_server.api.protocol import ModelInfo, OptimizationReport
from kontext_server.request import InferenceRequest
from utils import encode_image_bytes, map_images

log = logging.getLogger("flux.api")
CONTENT_TYPES = {"png": "image/png", "jpeg": "image/jpeg", "webp": "image/webp"}


def report(rid: str, srv: Server, result, timings: dict) -> Report:
    m = srv.service.model
    return Report(request_id=rid, seed=result.seed, width=result.width, height=result.height, steps=result.steps,
                  steps_computed=result.steps_computed, steps_skipped=result.steps_skipped, timings_ms=timings,
                  optimizations={k: OptimizationReport(requested=d.requested, applied=d.applied, detail=d.detail)
                                 for k, d in result.optimizations.items()},
                  model=ModelInfo(source=m.source, synthetic=m.synthetic, description=m.description),
                  loras=list(result.loras), context_parallel=getattr(result, "parallel", None),
                  warnings=result.warnings, size_reason=getattr(result, "size_reason", "") or None,
                  references=getattr(result, "references", 0), memory_tier=getattr(result, "memory_tier", None))


def report_headers(rep: Report) -> dict[str, str]:
    applied = [k for k, o in rep.optimizations.items() if o.applied]
    return {"X-Seed": str(rep.seed), "X-Timings-Ms": json.dumps(rep.timings_ms, separators=(",", ":")),
            "X-Optimizations": ",".join(applied) or "none"}


def finish_timings(srv: Server, job, result, t0: float) -> dict:
    timings = dict(result.timings_ms)
    timings["queue_wait"] = round(((job.started_at or job.enqueued_at) - job.enqueued_at) * 1000, 3)
    timings["request_total"] = round((time.perf_counter() - t0) * 1000, 3)
    srv.metrics.observe_result(timings, result.steps_computed, result.steps_skipped)
    return timings


def log_outcome(request: Request, req: InferenceRequest, outcome: str, edit: bool, extra: str = "") -> None:
    request.state.logged = True
    log.info("request %s %s size=%sx%s steps=%s images=%d edit=%s%s outcome=%s", request.state.request_id,
             request.url.path, req.width or "auto", req.height or "auto", req.steps or "default", req.num_images, edit,
             extra, outcome)


def encode_all(images, fmt: str, compression: int | None, store, expires_at: float = 0.0,
               base_url: str = "", provenance=None, prompt: str | None = None, final: bool = True) -> list[ImageData]:
    """The images encoded (thread pool; several in parallel) with the server's provenance
    (kontext_server/provenance.py; `final` False for a preview: no C2PA signature): base64, or saved in the output
    store and given by a URL valid until `expires_at` when a store is passed."""
    quality = [compression] if compression is not None else []

    def encode(im) -> bytes:
        if provenance is not None:
            return provenance.encode(im, fmt, *quality, prompt=prompt, final=final)
        return encode_image_bytes(im, fmt, *quality)

    encoded = map_images(encode, list(images))
    if store is None:
        return [ImageData(b64_json=base64.b64encode(data).decode("ascii")) for data in encoded]
    out = []
    for data in encoded:  # saved in the images' order
        key = store.save(data, CONTENT_TYPES[fmt], expires_at)
        out.append(ImageData(url=store.url(key, expires_at, base_url)))
    return out

