"""Serving the Images API: a validated OpenAI request -> InferenceRequest + reference image -> one GenerateJob on the
engine -> OpenAI's response (or a stream, streaming.py).

What it decides:
- `quality` picks a tier by filling the optimisation flags the request left unset (an explicit use_* flag in
  extra_body wins): high = the exact tier (lossy ones off), medium = fp8 GEMMs at the default steps, low = the fast
  tier (fp8 + DPM-Solver++ at its default steps; CUDA graphs are on by default where prepared), auto = the server's
  default request. The response's `quality` is the tier asked for, auto reported as high (the server default is the
  exact tier); what actually ran is in the report (a flag whose optimisation is not prepared here does not run).
- `size`: WxH, or auto / omitted: the input's aspect ratio at about 1 MP for an edit, 1024x1024 otherwise.
- The seed is drawn here when the request gives none, so it is known before a stream starts (`X-Seed`).
- `response_format: "url"` saves each image in the app's output store (local files behind signed URLs by default, or
  S3) and answers URLs that expire after --result-ttl.
Our report goes in headers (X-Seed, X-Timings-Ms as JSON, X-Optimizations: the applied optimisations, comma-separated)
and in the extra top-level field `kontext`. Errors are OpenAI-shaped (errors.py) and never a 500 for bad input.
"""
from __future__ import annotations

import secrets
import time

from fastapi import Request
from fastapi.concurrency import run_in_threadpool
from fastapi.responses import JSONResponse, Response
from pydantic import ValidationError

from kontext_server import engine as eng
from kontext_server.api.context import Server, server
from kontext_server.api.dispatch import submit_and_wait
from kontext_server.api.errors import clean_errors
from kontext_server.api.moderation import screen
from kontext_server.api.openai import errors
from kontext_server.api.openai.protocol import EXTRA_FIELDS, ImageRequest, ImagesResponse, parse_size
from kontext_server.api.openai.responses import encode_all, finish_timings, log_outcome, report, report_headers
from kontext_server.api.openai.streaming import stream_images
from kontext_server.jobs import GenerateJob, lora_field
from kontext_server.lora.library import LoraError
from kontext_server.request import FLAG_TO_OPTIMIZATION, MAX_SEED, InferenceRequest
from kontext_server.safety import INPUT, OUTPUT, SafetyCheckFailed
from kontext_server.service import StrictError
from kontext_server.storage.base import StoreError
from utils import ImageInputError, decode_image_bytes

# quality -> the flags it sets when the request leaves them unset (None: the server's default for that flag)
TIERS = {
    "high": {"use_mxfp4": False, "use_dpm_solver": False, "use_first_block_cache": False},
    "medium": {"use_mxfp4": True, "use_dpm_solver": False, "use_first_block_cache": False},
    "low": {"use_mxfp4": True, "use_dpm_solver": True},
    "auto": {},
}
RENAMED = {"width": "size", "height": "size", "num_images": "n"}  # InferenceRequest's names -> OpenAI's


def resolved_quality(quality: str | None) -> str:
    return "high" if quality in (None, "auto") else quality


def to_inference_request(body: ImageRequest, seed: int, adapter: str | None = None) -> InferenceRequest:
    """The request the service runs (ValidationError with InferenceRequest's field names). `adapter`: the LoRA
    adapter `model` selected (model_adapter), run at scale 1 before the adapters of extra_body's `loras`."""
    size = parse_size(body.size)
    extras = {name: getattr(body, name) for name in EXTRA_FIELDS}
    flags = {**TIERS[body.quality or "auto"],
             **{k: v for k, v in extras.items() if k in FLAG_TO_OPTIMIZATION and v is not None}}
    others = {k: v for k, v in extras.items() if k not in FLAG_TO_OPTIMIZATION}
    others["seed"] = seed
    if adapter is not None:
        others["loras"] = [{"name": adapter, "scale": 1.0}, *(others.get("loras") or [])]
    return InferenceRequest(prompt=body.prompt, width=size[0] if size else None, height=size[1] if size else None,
                            num_images=body.n or 1, output_format=body.output_format or "png", **others, **flags)


def validation_error(exc: ValidationError) -> JSONResponse:
    errs = clean_errors(exc.errors())
    for e in errs:
        e["field"] = RENAMED.get(e["field"], e["field"])
    return errors.validation_response(errs)


class ModelNotFound(LookupError):
    pass


def model_adapter(srv: Server, model: str | None) -> str | None:
    """What `model` selects: None for the served model (its id, or left out), else the name of a LoRA adapter of
    GET /v1/models' list, which the request then runs (as vLLM serves its adapters under their own model names).
    ModelNotFound for anything else."""
    if model in (None, "", srv.model_id):
        return None
    adapters = srv.service.lora_names()
    if model in adapters:
        return model
    also = f" and its LoRA adapters {', '.join(map(repr, adapters))}" if adapters else ""
    raise ModelNotFound(f"model {model!r} does not exist here; this server serves {srv.model_id!r}{also} "
                        f"(GET /v1/models)")


def check_request(srv: Server, body: ImageRequest) -> JSONResponse | None:
    """What can be refused before any work: the response format, the stream's options, readiness (the model is
    model_adapter's)."""
    if body.response_format == "url" and (srv.output_store is None or body.stream):
        why = ("a stream sends b64_json images" if body.stream else
               "this server has no output store configured, so it cannot return URLs; use b64_json")
        return errors.invalid("response_format", why)
    if body.stream and (body.n or 1) > 1:
        return errors.invalid("n", "a stream sends one image's partial images and the image: use n=1 with stream")
    if srv.service.state != "ready":
        return errors.not_ready_response(srv.service.state)
    return None


async def decode_reference(image_bytes: bytes | list[bytes] | None):
    """(the reference image(s): one PIL image, a list of 2-4, or None; error response or None)."""
    if image_bytes is None:
        return None, None
    parts = image_bytes if isinstance(image_bytes, list) else [image_bytes]
    decoded = []
    for i, data in enumerate(parts):
        try:
            decoded.append(await run_in_threadpool(decode_image_bytes, data))
        except ImageInputError as exc:
            status = 413 if exc.status == 413 else 400
            which = f"image {i + 1} of {len(parts)}: " if len(parts) > 1 else ""
            return None, errors.invalid("image", which + str(exc),
                                        code="image_too_large" if status == 413 else "invalid_image", status=status)
    return (decoded[0] if len(decoded) == 1 else decoded), None


def plan_or_error(srv: Server, req: InferenceRequest, image):
    """(plan, None) or (None, a 400 for a strict request that cannot get what it asked for)."""
    try:
        return srv.service.plan(req, image), None
    except StrictError as exc:
        field = exc.problems[0][0] if exc.problems else None
        return None, errors.error_response(400, str(exc), param=field, code="strict")


async def create_images(request: Request, body: ImageRequest, image_bytes: bytes | None, edit: bool) -> Response:
    """The whole route after parsing: checks, conversion, plan, the job, and the response (JSON or a stream)."""
    srv = server(request)
    refused = check_request(srv, body)
    if refused is not None:
        return refused
    try:  # after the readiness check: the adapters are known once the model (or a replica) is loaded
        adapter = model_adapter(srv, body.model)
    except ModelNotFound as exc:
        return errors.error_response(404, str(exc), param="model", code="model_not_found")
    try:
        req = to_inference_request(body, body.seed if body.seed is not None else secrets.randbelow(MAX_SEED),
                                   adapter)
    except ValidationError as exc:
        return validation_error(exc)
    image, refused = await decode_reference(image_bytes)
    if refused is not None:
        return refused
    try:
        blocked = await screen(srv, request.state.request_id, req.prompt, image, INPUT)
    except SafetyCheckFailed as exc:
        return errors.safety_failed(exc)
    if blocked is not None:
        return errors.moderation_blocked(blocked)
    plan, refused = plan_or_error(srv, req, image)
    if refused is not None:
        return refused
    try:  # an adapter known to be unusable never reaches the queue
        srv.service.check_loras(req)
    except LoraError as exc:
        return errors.invalid(lora_field(exc), str(exc), code=exc.kind)
    quality = resolved_quality(body.quality)
    compression = body.output_compression
    if body.stream:
        return stream_images(request, srv, req, image, plan, quality=quality, compression=compression,
                             partial_images=body.partial_images or 0, edit=edit)
    t0 = time.perf_counter()
    try:
        job, result = await submit_and_wait(srv.engine, request, GenerateJob(req, image, plan),
                                            request.state.request_id)
    except eng.EngineError as exc:
        log_outcome(request, req, f"{exc.status} {exc.code}", edit)
        return errors.engine_error_response(exc, srv.engine)
    try:
        blocked = await screen(srv, request.state.request_id, req.prompt, result.images, OUTPUT)
    except SafetyCheckFailed as exc:
        return errors.safety_failed(exc)
    if blocked is not None:
        log_outcome(request, req, "400 moderation_blocked", edit)
        return errors.moderation_blocked(blocked)
    try:
        store = srv.output_store if body.response_format == "url" else None
        expires_at, base_url = time.time() + srv.settings.result_ttl, srv.settings.base_url(request)
        data = await run_in_threadpool(lambda: encode_all(result.images, req.output_format, compression, store,
                                                          expires_at, base_url, provenance=srv.provenance,
                                                          prompt=req.prompt))
    except StoreError as exc:
        log_outcome(request, req, "503 output_store_failed", edit)
        return errors.error_response(503, str(exc), code="output_store_failed", headers={"Retry-After": "5"})
    timings = finish_timings(srv, job, result, t0)
    rep = report(request.state.request_id, srv, result, timings)
    log_outcome(request, req, "200", edit, f" timings_ms={ {k: round(v) for k, v in timings.items()} }")
    out = ImagesResponse(created=int(time.time()), data=data, output_format=req.output_format,
                         size=f"{result.width}x{result.height}", quality=quality, kontext=rep)
    # pydantic's serialiser: the body is megabytes of base64, which Python's json module encodes several times slower
    return Response(out.model_dump_json(exclude_none=True), media_type="application/json",
                    headers=report_headers(rep))
