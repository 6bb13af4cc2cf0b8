"""POST /inference: the server's own JSON generation route (errors: kontext_server.api.errors' shape)."""
from __future__ import annotations

import base64
import logging
import time

from fastapi import APIRouter, Request, Response
from fastapi.concurrency import run_in_threadpool

from kontext_server import engine as eng
from kontext_server.api.context import server
from kontext_server.api.dispatch import submit_and_wait
from kontext_server.api.errors import engine_error_response, error_response, field_error, not_ready_response
from kontext_server.api.moderation import blocked_message, screen
from kontext_server.api.protocol import InferenceRequest, InferenceResponse, LoraReport, ModelInfo, OptimizationReport
from kontext_server.jobs import GenerateJob, lora_field
from kontext_server.lora.library import LoraError
from kontext_server.service import StrictError
from kontext_server.api.image_inputs import read_image
from kontext_server.safety import INPUT, OUTPUT, SafetyCheckFailed, Verdict
from utils import ImageInputError, map_images

log = logging.getLogger("flux.api")
router = APIRouter()


def content_policy_response(verdict: Verdict):
    """422 content_policy: the field is `prompt` when the input was blocked, `output` when the generated image was."""
    field = "prompt" if verdict.stage == INPUT else "output"
    return error_response(422, "content_policy", blocked_message(verdict),
                          [{"field": field, "message": verdict.reason, "type": "content_policy"}])


async def decode_references(body: InferenceRequest, policy):
    """(the reference image(s), or None; an error response, or None): `image` decodes to one PIL image, `images` to
    a list (the service takes either); each is base64, a data URL or an http(s) URL fetched under `policy`
    (api/image_inputs.py). A bad one is answered naming its field (`image`, `images.N`)."""
    sources = body.reference_inputs()
    decoded = []
    for i, data in enumerate(sources):
        try:
            decoded.append((await run_in_threadpool(read_image, data, policy))[0])
        except ImageInputError as exc:
            code = "payload_too_large" if exc.status == 413 else "validation_error"
            return None, field_error(exc.status, code, "image" if body.images is None else f"images.{i}", str(exc))
    if not decoded:
        return None, None
    return (decoded if body.images is not None else decoded[0]), None


@router.post("/inference", response_model=InferenceResponse,
             responses={413: {}, 422: {}, 429: {}, 500: {}, 503: {}, 504: {}})
async def inference(body: InferenceRequest, request: Request, response: Response):
    srv = server(request)
    service, engine, metrics = srv.service, srv.engine, srv.metrics
    rid = request.state.request_id
    if service.state != "ready":
        return not_ready_response(service.state)
    t_decode = time.perf_counter()
    image, refused = await decode_references(body, srv.settings.fetch_policy())
    if refused is not None:
        return refused
    decode_ms = (time.perf_counter() - t_decode) * 1000 if image is not None else None
    try:
        blocked = await screen(srv, rid, body.prompt, image, INPUT)
    except SafetyCheckFailed as exc:
        return error_response(500, "safety_check_failed", str(exc))
    if blocked is not None:
        return content_policy_response(blocked)
    try:
        plan = service.plan(body, image)
    except StrictError as exc:
        return error_response(422, "validation_error", str(exc),
                              [{"field": f, "message": m, "type": "strict"} for f, m in exc.problems])
    try:  # a cheap look-up in the LoRA library: an adapter known to be unusable never reaches the queue
        service.check_loras(body)
    except LoraError as exc:
        return field_error(422, "validation_error", lora_field(exc), str(exc), exc.kind)
    t0 = time.perf_counter()
    try:
        job, result = await submit_and_wait(engine, request, GenerateJob(body, image, plan), rid)
    except eng.EngineError as exc:
        request.state.logged = True
        log.info("request %s prompt_len=%d size=%sx%s steps=%s outcome=%s %s", rid, len(body.prompt),
                 body.width, body.height, body.steps, exc.status, exc.code)
        return engine_error_response(exc, engine)
    try:
        blocked = await screen(srv, rid, body.prompt, result.images, OUTPUT)
    except SafetyCheckFailed as exc:
        return error_response(500, "safety_check_failed", str(exc))
    if blocked is not None:
        request.state.logged = True
        return content_policy_response(blocked)
    provenance = srv.provenance
    t_encode = time.perf_counter()
    images = await run_in_threadpool(map_images, lambda im: base64.b64encode(
        provenance.encode(im, body.output_format, prompt=body.prompt)).decode("ascii"), result.images)
    encode_ms = (time.perf_counter() - t_encode) * 1000
    timings = dict(result.timings_ms)
    if decode_ms is not None:  # the host's work around the generation: decode before request_total, encode in it
        timings["decode_input"] = round(decode_ms, 3)
    timings["encode_output"] = round(encode_ms, 3)
    timings["queue_wait"] = round(((job.started_at or job.enqueued_at) - job.enqueued_at) * 1000, 3)
    timings["request_total"] = round((time.perf_counter() - t0) * 1000, 3)
    metrics.observe_result(timings, result.steps_computed, result.steps_skipped)
    request.state.logged = True
    log.info("request %s size=%dx%d steps=%d images=%d edit=%s timings_ms=%s outcome=200", rid, result.width,
             result.height, result.steps, len(images), image is not None, {k: round(v) for k, v in timings.items()})
    m = service.model
    replica = getattr(result, "replica", None)  # set where a Ray Serve replica ran it (serving/ray)
    if replica:
        response.headers["X-Replica"] = replica
    return InferenceResponse(
        request_id=rid, images=images, output_format=body.output_format, seed=result.seed,
        width=result.width, height=result.height, steps=result.steps, steps_computed=result.steps_computed,
        steps_skipped=result.steps_skipped, timings_ms=timings,
        optimizations={k: OptimizationReport(requested=d.requested, applied=d.applied, detail=d.detail)
                       for k, d in result.optimizations.items()},
        model=ModelInfo(source=m.source, synthetic=m.synthetic, description=m.description),
        loras=[LoraReport(**lora) for lora in result.loras], warnings=result.warnings, replica=replica,
        size_reason=result.size_reason or None, references=result.references,
        context_parallel=getattr(result, "parallel", None), memory_tier=getattr(result, "memory_tier", None))
