"""build_app: the FastAPI app of one service (lifespan, middleware, error handlers, routers).

The event loop never runs model work: images are decoded / encoded in the thread pool, generation runs on the
engine's single worker. Routes live in routes/ (one module per endpoint group); their wire formats in protocol.py.

The engine and the metrics are injectable: by default the app builds the local `engine.Engine` (one worker thread on
this process's device) and its own `Metrics`. Another engine with the same interface (submit -> a job whose
`future` is a concurrent Future; cancel, queue_depth, in_flight, accepting, retry_after_seconds, start,
stop_accepting, drain) serves the same routes, schemas, errors and headers from elsewhere: the Ray Serve ingress
(kontext_server/serving/ray) passes one that calls model replicas, with a service proxy in place of the service.
"""
from __future__ import annotations

from fastapi import FastAPI, Request
from fastapi.exceptions import RequestValidationError
from starlette.exceptions import HTTPException as StarletteHTTPException

from kontext_server import __version__
from kontext_server import engine as eng
from kontext_server.api.context import Server, ServerSettings
from kontext_server.api.errors import clean_errors, error_response
from kontext_server.api.lifecycle import lifespan_for
from kontext_server.api.metrics import Metrics
from kontext_server.api.middleware import BodySizeLimit, RequestContext
from kontext_server.api.routes import benchmark, health, inference

ROUTERS = (inference.router, health.router, benchmark.router)


def build_app(service, settings: ServerSettings | None = None, engine=None, metrics=None) -> FastAPI:
    """The app of one service. `engine` None: a local Engine running jobs on `service` here; `metrics` None: a
    fresh Metrics registry (the app's own)."""
    settings = settings or ServerSettings()
    metrics = metrics if metrics is not None else Metrics()
    if engine is None:
        engine = local_engine(service, settings, metrics)
    app = FastAPI(title="FLUX.1-Kontext inference server", version=__version__,
                  lifespan=lifespan_for(service, engine, settings))
    app.state.server = Server(service=service, engine=engine, metrics=metrics, settings=settings)
    known_paths: set[str] = set()
    app.add_middleware(BodySizeLimit, max_bytes=settings.max_body_bytes)
    app.add_middleware(RequestContext, metrics=metrics, known_paths=known_paths)  # last = outermost: 413s get an id

    @app.exception_handler(RequestValidationError)
    async def on_validation_error(request: Request, exc: RequestValidationError):
        errors = clean_errors(exc.errors())
        msg = "; ".join(f"{e['field']}: {e['message']}" for e in errors) or "invalid request"
        return error_response(422, "validation_error", msg, errors)

    @app.exception_handler(StarletteHTTPException)
    async def on_http_error(request: Request, exc: StarletteHTTPException):
        return error_response(exc.status_code, "http_error", str(exc.detail))

    for router in ROUTERS:
        app.include_router(router)
    known_paths.update(r.path for r in app.routes if hasattr(r, "path"))  # FastAPI's own: /docs, /openapi.json
    known_paths.update(r.path for router in ROUTERS for r in router.routes)
    return app


def local_engine(service, settings: ServerSettings, metrics: Metrics) -> eng.Engine:
    """The local engine: one worker thread running each job's payload on `service`, queue waits into `metrics`."""
    def on_event(event: str, job: eng.Job, info: dict):
        if event == "started":
            metrics.queue_wait.observe(info["queue_wait_s"])

    return eng.Engine(lambda job: job.payload.run(service, job.should_stop), max_queue=settings.max_queue,
                      queue_timeout=settings.queue_timeout, request_timeout=settings.request_timeout,
                      on_event=on_event)


create_app = build_app  # the name the tests and earlier releases use
