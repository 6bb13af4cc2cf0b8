"""Serving the BFL-shaped routes: a validated KontextRequest -> InferenceRequest + reference image -> a stored job
(kontext_server.jobstore) -> `{id, polling_url}`; a stored job -> BFL's result JSON (`describe`, also the webhook's
body); cancel.

What it decides:
- size: `aspect_ratio` at about 1 megapixel; else our `width` / `height`; else the input image's aspect ratio at
  about 1 megapixel, or 1024x1024 without one (the service's own rule, service/sizes.py).
- the seed is drawn here when the request gives none, so a job queued again after a restart makes the same image.
- `result` of a Ready job: BFL's `sample` (a URL valid until the result expires), `prompt`, `seed`, `start_time`,
  `end_time`, `duration` (Unix seconds; from the job starting to run), plus ours: `width`, `height`, `steps`,
  `timings_ms`, `optimizations`, `warnings`, `expires_at`.
- `details`: `state` (queued, running, ready, error), `safety_tolerance` and `moderation` (none ran), and for an
  error its `error` code and `message` (cancelled jobs: `"error": "cancelled"`).
Errors are BFL-shaped (errors.py); bad input is a 422 naming the field, never a 500.
"""
from __future__ import annotations

import secrets
import uuid

from fastapi import Request
from fastapi.concurrency import run_in_threadpool
from fastapi.responses import JSONResponse
from pydantic import ValidationError

from kontext_server import engine as eng
from kontext_server.api.bfl import errors
from kontext_server.api.bfl.protocol import EXTRA_FIELDS, KontextRequest, ResultResponse, SubmitResponse, aspect_size
from kontext_server.api.context import Server, server
from kontext_server.api.errors import clean_errors
from kontext_server.api.image_inputs import is_url, read_image
from kontext_server.jobstore.manager import JobSpec, pack_inputs
from kontext_server.jobstore.store import JobRow
from kontext_server.request import FLAG_TO_OPTIMIZATION, MAX_SEED, InferenceRequest
from kontext_server.service import StrictError
from utils import ImageInputError

RENAMED = {"guidance_scale": "guidance", "image": "input_image"}  # InferenceRequest's names -> this route's
REFERENCE_FIELDS = ("input_image", "input_image_2", "input_image_3", "input_image_4")  # BFL's multi-reference
MODERATION = "none: this server runs no moderation model; safety_tolerance is recorded, not enforced"


def to_inference_request(body: KontextRequest, seed: int) -> InferenceRequest:
    extras = {name: getattr(body, name) for name in EXTRA_FIELDS}
    flags = {k: v for k, v in extras.items() if k in FLAG_TO_OPTIMIZATION and v is not None}
    others = {k: v for k, v in extras.items() if k not in FLAG_TO_OPTIMIZATION}
    if body.aspect_ratio is not None:
        others["width"], others["height"] = aspect_size(body.aspect_ratio)
    others["seed"] = seed
    return InferenceRequest(prompt=body.prompt, guidance_scale=body.guidance, output_format=body.output_format,
                            num_images=1, **others, **flags)


def validation_error(exc: ValidationError) -> JSONResponse:
    errs = clean_errors(exc.errors())
    for e in errs:
        e["field"] = RENAMED.get(e["field"], e["field"])
    return errors.field_errors(errs)


async def submit(request: Request, body: KontextRequest) -> JSONResponse | SubmitResponse:
    srv = server(request)
    if srv.service.state != "ready":
        return errors.not_ready_response(srv.service.state)
    try:
        req = to_inference_request(body, body.seed if body.seed is not None else secrets.randbelow(MAX_SEED))
    except ValidationError as exc:
        return validation_error(exc)
    given = {name: getattr(body, name) for name in REFERENCE_FIELDS if getattr(body, name) is not None}
    if given and "input_image" not in given:
        return errors.field_error(next(iter(given)), "needs input_image: references are input_image, then "
                                                     "input_image_2..4 in order", status=422)
    images, raws = [], []
    for name, value in given.items():
        try:
            img, raw_one = await run_in_threadpool(read_image, value, srv.settings.fetch_policy())
        except ImageInputError as exc:
            return errors.field_error(name, str(exc), status=exc.status)
        images.append(img)
        raws.append(raw_one)
    image = None if not images else images[0] if len(images) == 1 else images  # the service takes one or a list
    raw = pack_inputs(raws) if raws else None
    try:
        plan = srv.service.plan(req, image)
    except StrictError as exc:
        return errors.field_errors([{"field": f, "message": m, "type": "strict"} for f, m in exc.problems])
    job_id = str(uuid.uuid4())
    base = srv.settings.base_url(request)
    meta = {"safety_tolerance": body.safety_tolerance, "base_url": base, "route": request.url.path,
            "aspect_ratio": body.aspect_ratio,
            "input": None if body.input_image is None else ("url" if is_url(body.input_image) else "base64"),
            "references": len(images)}
    spec = JobSpec(id=job_id, request=req, image=image, input_bytes=raw, plan=plan, meta=meta,
                   webhook_url=body.webhook_url, webhook_secret=body.webhook_secret)
    try:
        await run_in_threadpool(srv.jobs.submit, spec)
    except eng.EngineError as exc:
        if exc.status == 429:
            srv.metrics.job_metrics.jobs_submitted.labels("rejected").inc()
        return errors.engine_error_response(exc, srv.engine.retry_after_seconds())
    return SubmitResponse(id=job_id, polling_url=f"{base}/v1/get_result?id={job_id}")


def describe(srv: Server, row: JobRow, base_url: str, progress: float | None = None) -> dict:
    """BFL's result JSON of one stored job (get_result's body, and the webhook's)."""
    details = {"safety_tolerance": row.meta.get("safety_tolerance"), "moderation": MODERATION}
    if row.status in ("pending", "running"):
        details["state"] = "queued" if row.status == "pending" else "running"
        prog = 0.0 if row.status == "pending" else (progress or 0.0)
        return ResultResponse(id=row.id, status="Pending", progress=round(prog, 4), details=details).model_dump()
    details["expires_at"] = row.expires_at
    if row.status == "error":
        details.update(state="error", error=row.error_code, message=row.error_message)
        return ResultResponse(id=row.id, status="Error", progress=None, details=details).model_dump()
    details["state"] = "ready"
    result = dict(row.result or {})
    result["sample"] = srv.output_store.url(row.sample_key, row.expires_at, base_url)
    result["expires_at"] = row.expires_at
    return ResultResponse(id=row.id, status="Ready", progress=1.0, result=result, details=details).model_dump()


def not_found(job_id: str) -> dict:
    return ResultResponse(id=job_id, status="Task not found").model_dump()


async def get_result(request: Request, job_id: str) -> dict:
    srv = server(request)
    row, progress = await run_in_threadpool(srv.jobs.lookup, job_id)
    if row is None:
        return not_found(job_id)
    out = describe(srv, row, srv.settings.base_url(request), progress)
    delivery = await run_in_threadpool(srv.jobs.store.delivery_of, job_id) if row.webhook_url else None
    if delivery is not None:
        out["details"]["webhook"] = delivery
    return out


async def cancel(request: Request, job_id: str):
    srv = server(request)
    outcome = await run_in_threadpool(srv.jobs.cancel, job_id)
    if outcome is None:
        return errors.error_response(404, f"no job {job_id!r} (never submitted, or its result expired)")
    if outcome == "finished":
        row = await run_in_threadpool(srv.jobs.store.get, job_id)
        state = row.status if row else "expired"
        return errors.error_response(409, f"job {job_id!r} already finished ({state}); nothing to cancel")
    detail = ("the job was waiting: it will never run" if outcome == "cancelled"
              else "the job is running: it stops at its next denoising step")
    return {"id": job_id, "status": outcome, "detail": detail}
