"""HTTP routes. Validation and encoding happen here; model work is submitted to the engine and awaited.

The event loop never runs GPU work: image decode/encode go to the thread pool, generation to the engine's
single worker. Every error is JSON: {"error": code, "message": text, "detail": [...]}.
"""
from __future__ import annotations

import asyncio
import json
import logging
import re
import signal
import threading
import time
import uuid
from contextlib import asynccontextmanager
from dataclasses import dataclass

from fastapi import FastAPI, Query, Request
from fastapi.concurrency import run_in_threadpool
from fastapi.exceptions import RequestValidationError
from fastapi.responses import JSONResponse, Response
from starlette.exceptions import HTTPException as StarletteHTTPException

import engine as eng
from metrics import Metrics
from schemas import InferenceRequest, InferenceResponse, ModelInfo, OptimizationReport
from service import FluxService, StrictError
from utils import ImageInputError, decode_image, encode_image

log = logging.getLogger("flux.api")
REQUEST_ID_RE = re.compile(r"^[A-Za-z0-9._-]{1,64}$")


@dataclass
class ServerSettings:
    max_queue: int = 16
    queue_timeout: float = 120.0
    request_timeout: float = 600.0
    shutdown_grace: float = 30.0
    max_body_bytes: int = 32 * 1024 * 1024
    load_in_background: bool = True


def error_response(status: int, code: str, message: str, detail=None, headers=None) -> JSONResponse:
    body = {"error": code, "message": message}
    if detail is not None:
        body["detail"] = detail
    return JSONResponse(body, status_code=status, headers=headers)


def _clean_errors(errors) -> list[dict]:
    """pydantic errors without the raw input (it may be huge, binary or unserialisable)."""
    out = []
    for e in errors:
        kind = str(e.get("type", "value_error"))
        msg = str(e.get("msg", "invalid"))
        loc = [str(p) for p in e.get("loc", ()) if p != "body"]
        if kind == "json_invalid":  # its location is a character offset, not a field
            msg, loc = f"{msg} at character {loc[-1] if loc else '?'}", []
        out.append({"field": ".".join(loc) or "body", "message": msg, "type": kind})
    return out


class BodySizeLimit:
    """ASGI middleware: 413 before a huge body is buffered, with or without Content-Length.

    A chunked body that grows past the limit is cut off: the app sees the client as gone (so nothing raises
    through FastAPI's body parser, which would turn it into a 400), its own answer is dropped, and the client
    gets the 413."""

    def __init__(self, app, max_bytes: int):
        self.app, self.max_bytes = app, max_bytes

    async def __call__(self, scope, receive, send):
        if scope["type"] != "http":
            return await self.app(scope, receive, send)
        for name, value in scope.get("headers", []):
            if name == b"content-length":
                try:
                    too_big = int(value) > self.max_bytes
                except ValueError:
                    too_big = False
                if too_big:
                    return await self._reject(send)
        seen = 0
        exceeded = False

        async def limited_receive():
            nonlocal seen, exceeded
            if exceeded:
                return {"type": "http.disconnect"}
            message = await receive()
            if message["type"] == "http.request":
                seen += len(message.get("body", b""))
                if seen > self.max_bytes:
                    exceeded = True
                    return {"type": "http.disconnect"}
            return message

        async def guarded_send(message):
            if not exceeded:
                await send(message)

        await self.app(scope, limited_receive, guarded_send)
        if exceeded:
            await self._reject(send)

    async def _reject(self, send):
        await _send_json(send, 413, {"error": "payload_too_large",
                                     "message": f"request body is larger than {self.max_bytes} bytes"})


async def _send_json(send, status: int, body: dict, extra_headers: list | None = None) -> None:
    data = json.dumps(body).encode()
    headers = [(b"content-type", b"application/json"), (b"content-length", str(len(data)).encode())]
    await send({"type": "http.response.start", "status": status, "headers": headers + (extra_headers or [])})
    await send({"type": "http.response.body", "body": data})


class RequestContext:
    """Pure ASGI middleware (BaseHTTPMiddleware would hide client disconnects from the routes): a request id on
    every response, metrics, one log line per request, and a JSON 500 for anything a route did not handle."""

    def __init__(self, app, metrics: Metrics):
        self.app, self.metrics = app, metrics

    async def __call__(self, scope, receive, send):
        if scope["type"] != "http":
            return await self.app(scope, receive, send)
        rid = next((v.decode("latin-1") for k, v in scope.get("headers", []) if k == b"x-request-id"), "")
        rid = rid if REQUEST_ID_RE.match(rid) else uuid.uuid4().hex[:16]
        state = scope.setdefault("state", {})
        state["request_id"] = rid
        rid_header = (b"x-request-id", rid.encode())
        status = {"code": None}
        t0 = time.perf_counter()

        async def send_with_id(message):
            if message["type"] == "http.response.start":
                status["code"] = message["status"]
                message = dict(message, headers=list(message.get("headers", [])) + [rid_header])
            await send(message)

        try:
            await self.app(scope, receive, send_with_id)
        except Exception as exc:  # noqa: BLE001 - last resort: still JSON, still counted, still logged
            log.exception("request %s: unhandled error on %s", rid, scope.get("path"))
            if status["code"] is None:
                status["code"] = 500
                await _send_json(send, 500, {"error": "internal_error", "message": f"{type(exc).__name__}: {exc}"},
                                 [rid_header])
        finally:
            path = scope.get("path", "")
            label = path if path in KNOWN_PATHS else "other"
            code = status["code"] or 499  # no answer sent: the client went away
            elapsed = time.perf_counter() - t0
            self.metrics.requests.labels(label, str(code)).inc()
            self.metrics.latency.labels(label).observe(elapsed)
            if not state.get("logged"):  # /inference logs its own, richer line
                log.info("request %s %s %s status=%s ms=%.0f", rid, scope.get("method"), path, code, elapsed * 1000)


def create_app(service: FluxService, settings: ServerSettings | None = None) -> FastAPI:
    settings = settings or ServerSettings()
    metrics = Metrics()

    def run_job(job: eng.Job):
        kind = job.payload["kind"]
        if kind == "generate":
            return service.generate(job.payload["request"], job.payload["image"], should_stop=job.should_stop,
                                    plan=job.payload["plan"])
        if kind == "benchmark":
            import benchmark

            return benchmark.run_request_benchmark(service, should_stop=job.should_stop, **job.payload["params"])
        raise ValueError(f"unknown job kind {kind}")

    def on_event(event: str, job: eng.Job, info: dict):
        if event == "started":
            metrics.queue_wait.observe(info["queue_wait_s"])

    engine = eng.Engine(run_job, max_queue=settings.max_queue, queue_timeout=settings.queue_timeout,
                        request_timeout=settings.request_timeout, on_event=on_event)

    @asynccontextmanager
    async def lifespan(app: FastAPI):
        engine.start()
        if service.state == "loading":
            def load():
                try:
                    service.load()
                    log.info("model ready: %s", service.health().get("model"))
                except Exception:
                    log.exception("model failed to load")
            if settings.load_in_background:
                threading.Thread(target=load, name="model-loader", daemon=True).start()
            else:
                await run_in_threadpool(load)
        _chain_sigterm(engine, settings.shutdown_grace)
        yield
        # Shutdown: queued and running work gets the grace period, then a clear 503.
        finished = await run_in_threadpool(engine.drain, settings.shutdown_grace)
        log.info("shutdown: drained %s", "all work" if finished else "with work left (answered 503)")

    app = FastAPI(title="FLUX.1-Kontext inference server", version="1.0", lifespan=lifespan)
    app.state.service, app.state.engine, app.state.metrics, app.state.settings = service, engine, metrics, settings
    app.add_middleware(BodySizeLimit, max_bytes=settings.max_body_bytes)
    app.add_middleware(RequestContext, metrics=metrics)  # added last = outermost: the 413 gets an id too

    @app.exception_handler(RequestValidationError)
    async def on_validation_error(request: Request, exc: RequestValidationError):
        errors = _clean_errors(exc.errors())
        msg = "; ".join(f"{e['field']}: {e['message']}" for e in errors) or "invalid request"
        return error_response(422, "validation_error", msg, errors)

    @app.exception_handler(StarletteHTTPException)
    async def on_http_error(request: Request, exc: StarletteHTTPException):
        return error_response(exc.status_code, "http_error", str(exc.detail))

    def engine_error_response(exc: eng.EngineError) -> JSONResponse:
        headers = None
        if exc.status in (429, 503):
            headers = {"Retry-After": str(engine.retry_after_seconds())}
        return error_response(exc.status, exc.code, str(exc), headers=headers)

    async def submit_and_wait(request: Request, payload: dict, rid: str):
        job = engine.submit(payload, job_id=rid)  # QueueFull / ShuttingDown raise here
        fut = asyncio.wrap_future(job.future)
        while True:
            done, _ = await asyncio.wait({fut}, timeout=0.2)
            if done:
                return job, fut.result()
            if await request.is_disconnected():
                engine.cancel(job, eng.Cancelled)
                await asyncio.wait({fut}, timeout=5)
                raise eng.Cancelled("client disconnected")
            if job.started_at is None and time.monotonic() - job.enqueued_at > engine.queue_timeout:
                engine.cancel(job, eng.QueueTimeout)

    @app.post("/inference", response_model=InferenceResponse,
              responses={413: {}, 422: {}, 429: {}, 500: {}, 503: {}, 504: {}})
    async def inference(body: InferenceRequest, request: Request):
        rid = request.state.request_id
        if service.state != "ready":
            return error_response(503, "not_ready", f"model is {service.state}",
                                  headers={"Retry-After": "5"})
        image = None
        if body.image is not None:
            try:
                image = await run_in_threadpool(decode_image, body.image)
            except ImageInputError as exc:
                code = "payload_too_large" if exc.status == 413 else "validation_error"
                return error_response(exc.status, code, f"image: {exc}",
                                      [{"field": "image", "message": str(exc), "type": "value_error"}])
        try:
            plan = service.plan(body, image)
        except StrictError as exc:
            return error_response(422, "validation_error", str(exc),
                                  [{"field": f, "message": m, "type": "strict"} for f, m in exc.problems])
        t0 = time.perf_counter()
        try:
            job, result = await submit_and_wait(
                request, {"kind": "generate", "request": body, "image": image, "plan": plan}, rid)
        except eng.EngineError as exc:
            request.state.logged = True
            log.info("request %s prompt_len=%d size=%sx%s steps=%s outcome=%s %s", rid, len(body.prompt),
                     body.width, body.height, body.steps, exc.status, exc.code)
            return engine_error_response(exc)
        images = await run_in_threadpool(lambda: [encode_image(im, body.output_format) for im in result.images])
        timings = dict(result.timings_ms)
        timings["queue_wait"] = round(((job.started_at or job.enqueued_at) - job.enqueued_at) * 1000, 3)
        timings["request_total"] = round((time.perf_counter() - t0) * 1000, 3)
        metrics.observe_result(timings, result.steps_computed, result.steps_skipped)
        request.state.logged = True
        log.info("request %s size=%dx%d steps=%d images=%d edit=%s timings_ms=%s outcome=200", rid, result.width,
                 result.height, result.steps, len(images), image is not None,
                 {k: round(v) for k, v in timings.items()})
        m = service.model
        return InferenceResponse(
            request_id=rid, images=images, output_format=body.output_format, seed=result.seed,
            width=result.width, height=result.height, steps=result.steps, steps_computed=result.steps_computed,
            steps_skipped=result.steps_skipped, timings_ms=timings,
            optimizations={k: OptimizationReport(requested=d.requested, applied=d.applied, detail=d.detail)
                           for k, d in result.optimizations.items()},
            model=ModelInfo(source=m.source, synthetic=m.synthetic, description=m.description),
            warnings=result.warnings)

    @app.get("/health")
    async def health():
        info = service.health()
        info["queue_depth"], info["in_flight"] = engine.queue_depth, engine.in_flight
        if not engine.accepting:
            info["status"] = "draining"
        ok = service.state == "ready" and engine.accepting
        return JSONResponse(info, status_code=200 if ok else 503)

    @app.get("/live")
    async def live():
        return {"status": "alive"}

    @app.get("/metrics")
    async def metrics_endpoint():
        data = metrics.render(engine, ready=service.state == "ready")
        return Response(data, media_type="text/plain; version=0.0.4; charset=utf-8")

    @app.get("/benchmark")
    async def benchmark_endpoint(request: Request, runs: int = Query(3, ge=1, le=20),
                                 steps: int = Query(4, ge=1, le=50), width: int = Query(256, ge=256, le=2048),
                                 height: int = Query(256, ge=256, le=2048), edit: bool = Query(False)):
        if width % 16 or height % 16:
            field = "query.width" if width % 16 else "query.height"
            return error_response(422, "validation_error", f"{field}: must be a multiple of 16",
                                  [{"field": field, "message": "must be a multiple of 16", "type": "value_error"}])
        if service.state != "ready":
            return error_response(503, "not_ready", f"model is {service.state}", headers={"Retry-After": "5"})
        params = dict(runs=runs, steps=steps, width=width, height=height, edit=edit)
        try:
            _job, result = await submit_and_wait(request, {"kind": "benchmark", "params": params},
                                                 request.state.request_id)
        except eng.EngineError as exc:
            return engine_error_response(exc)
        return result

    return app


KNOWN_PATHS = {"/inference", "/health", "/live", "/metrics", "/benchmark"}


def _chain_sigterm(engine: eng.Engine, grace: float) -> None:
    """On SIGTERM: stop accepting at once (health turns 503), give running work `grace` seconds, then interrupt
    what is left so its client gets a JSON 503 before the server's own shutdown timeout; then hand the signal
    to the server's handler (uvicorn closes the socket and waits for open requests)."""
    if threading.current_thread() is not threading.main_thread():
        return
    previous = signal.getsignal(signal.SIGTERM)

    def handler(signum, frame):
        engine.stop_accepting()
        timer = threading.Timer(grace, engine.drain, args=(0.0,))
        timer.daemon = True
        timer.start()
        if callable(previous):
            previous(signum, frame)
        elif previous == signal.SIG_DFL:
            raise SystemExit(0)

    signal.signal(signal.SIGTERM, handler)
