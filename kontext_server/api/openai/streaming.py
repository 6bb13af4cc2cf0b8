"""`stream: true`: server-sent events in OpenAI's schema, partial images while the job denoises, then the image.

Events: `image_generation.partial_image` / `image_edit.partial_image` (partial_image_index 0, 1, ...), then
`image_generation.completed` / `image_edit.completed` with the image, usage and our report (`kontext`). Each is one
SSE message, `event: <type>` and `data: <json>`. A failure after the stream began is an `error` event with OpenAI's
error body (the SDK raises it); a failure before (a full queue) is still an HTTP status.
Previews come from the service's per-step hook: at `partial_images` evenly spaced steps before the last one
(`preview_steps` in service/steps.py; fewer when the run has fewer steps, as OpenAI allows), the hook asks the step
for its preview on the worker thread and hands the image to the event loop with `loop.call_soon_threadsafe`.
Encoding runs in the thread pool; the event loop only moves events. A client that disconnects cancels its job.
"""
from __future__ import annotations

import asyncio
import json
import time

from fastapi import Request
from fastapi.concurrency import run_in_threadpool
from fastapi.responses import Response, StreamingResponse
from pydantic import BaseModel

from kontext_server import engine as eng
from kontext_server.api.context import Server
from kontext_server.api.dispatch import wait_for
from kontext_server.api.moderation import blocked_message, screen
from kontext_server.api.openai import errors
from kontext_server.api.openai.protocol import CompletedEvent, PartialImageEvent
from kontext_server.api.openai.responses import encode_all, finish_timings, log_outcome, report
from kontext_server.jobs import GenerateJob
from kontext_server.request import InferenceRequest
from kontext_server.safety import OUTPUT, SafetyCheckFailed
from kontext_server.service.steps import preview_steps

_DONE = object()


def sse(event: str, data: dict | BaseModel) -> bytes:
    """One server-sent event; a model is serialised by pydantic (fast on megabytes of base64)."""
    text = data.model_dump_json() if isinstance(data, BaseModel) else json.dumps(data, separators=(",", ":"))
    return f"event: {event}\ndata: {text}\n\n".encode()


def stream_images(request: Request, srv: Server, req: InferenceRequest, image, plan, *, quality: str,
                  compression: int | None, partial_images: int, edit: bool) -> Response:
    """Submit the job now (a full queue or a draining server is still a plain HTTP error) and stream its events."""
    kind = "image_edit" if edit else "image_generation"
    loop = asyncio.get_running_loop()
    queue: asyncio.Queue = asyncio.Queue()

    def on_step(event) -> None:  # the worker thread, between two steps
        if event.step in preview_steps(event.steps, partial_images):
            preview = event.preview()
            if preview is not None:
                try:
                    loop.call_soon_threadsafe(queue.put_nowait, preview)
                except RuntimeError:  # the event loop is gone (shutdown): nobody is listening
                    pass

    t0 = time.perf_counter()
    try:
        job = srv.engine.submit(GenerateJob(req, image, plan, on_step, partial_images=partial_images),
                                job_id=request.state.request_id)
    except eng.EngineError as exc:
        log_outcome(request, req, f"{exc.status} {exc.code}", edit, " stream=True")
        return errors.engine_error_response(exc, srv.engine)
    fmt = req.output_format

    async def moderated(images) -> bytes | None:
        """None, or the error event that ends the stream: the safety checker blocked an image (a preview included,
        so no part of a blocked image is shown) or failed."""
        try:
            blocked = await screen(srv, request.state.request_id, req.prompt, images, OUTPUT)
        except SafetyCheckFailed as exc:
            return sse("error", errors.error_body(500, str(exc), code="safety_check_failed"))
        if blocked is None:
            return None
        log_outcome(request, req, "400 moderation_blocked", edit, " stream=True")
        return sse("error", errors.error_body(400, blocked_message(blocked), code="moderation_blocked"))

    async def events():
        waiter = asyncio.ensure_future(wait_for(srv.engine, request, job))
        # After the worker's previews: they were handed over before the job's result was.
        waiter.add_done_callback(lambda _: queue.put_nowait(_DONE))
        index = 0
        try:
            while (item := await queue.get()) is not _DONE:
                if (refusal := await moderated([item])) is not None:
                    yield refusal
                    return
                data = await run_in_threadpool(lambda: encode_all([item], fmt, compression, None,
                                                                  provenance=srv.provenance, prompt=req.prompt,
                                                                  final=False))
                yield sse(f"{kind}.partial_image", PartialImageEvent(
                    type=f"{kind}.partial_image", b64_json=data[0].b64_json, created_at=int(time.time()),
                    output_format=fmt, partial_image_index=index, quality=quality,
                    size=f"{item.width}x{item.height}"))
                index += 1
            try:
                result = waiter.result()
            except eng.EngineError as exc:
                log_outcome(request, req, f"{exc.status} {exc.code}", edit, " stream=True")
                yield sse("error", errors.error_body(exc.status, str(exc), code=exc.code))
                return
            if (refusal := await moderated(result.images[:1])) is not None:
                yield refusal
                return
            data = await run_in_threadpool(lambda: encode_all(result.images[:1], fmt, compression, None,
                                                              provenance=srv.provenance, prompt=req.prompt))
            timings = finish_timings(srv, job, result, t0)
            rep = report(request.state.request_id, srv, result, timings)
            log_outcome(request, req, "200", edit, f" stream=True partial_images={index}")
            yield sse(f"{kind}.completed", CompletedEvent(
                type=f"{kind}.completed", b64_json=data[0].b64_json, created_at=int(time.time()), output_format=fmt,
                quality=quality, size=f"{result.width}x{result.height}", kontext=rep))
        finally:
            if not waiter.done():  # the client went away mid-stream: its job stops at the next step
                waiter.cancel()

    headers = {"X-Seed": str(req.seed), "Cache-Control": "no-cache", "X-Accel-Buffering": "no"}
    return StreamingResponse(events(), media_type="text/event-stream", headers=headers)
