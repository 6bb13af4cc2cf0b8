"""build_app: the FastAPI app of one service (lifespan, middleware, error handlers, routers).

The event loop never runs model work: images are decoded / encoded in the thread pool, generation runs on the
engine's single worker. Routes live in routes/ (one module per endpoint group) and openai/ (the OpenAI-compatible
routes); their wire formats in protocol.py and openai/protocol.py. Errors answered outside a route take the shape of
the route family the path belongs to: BFL's for the BFL-shaped job routes and /v1/files, OpenAI's for the rest of
/v1, the /inference shape elsewhere. Every app holds a job manager (kontext_server/jobstore) on its data directory
and an output store (jobs_setup.py).
Keys and per-key limits (ServerSettings.api_keys / rate_limit) guard every path but OPEN_PATHS: a route added later
is guarded unless it is listed there.

The engine and the metrics are injectable: by default the app builds the local `engine.Engine` (one worker thread on
this process's device) and its own `Metrics`. Another engine with the same interface (submit -> a job whose
`future` is a concurrent Future; cancel, queue_depth, in_flight, accepting, retry_after_seconds, start,
stop_accepting, drain) serves the same routes, schemas, errors and headers from elsewhere: the Ray Serve ingress
(kontext_server/serving/ray_serve) passes one that calls model replicas, with a service proxy in place of the service.
"""
from __future__ import annotations

from fastapi import FastAPI, Request
from fastapi.exceptions import RequestValidationError
from starlette.exceptions import HTTPException as StarletteHTTPException

from kontext_server import __version__
from kontext_server import engine as eng
from kontext_server.api.context import Server, ServerSettings
from kontext_server.api.bfl import errors as bfl_errors
from kontext_server.api.bfl import router as bfl_router
from kontext_server.api.errors import clean_errors, error_body_for, error_response
from kontext_server.api.jobs_setup import build_jobs
from kontext_server.api.lifecycle import lifespan_for
from kontext_server.api.metrics import Metrics
from kontext_server.api.middleware import BodySizeLimit, KeyGuard, RequestContext
from kontext_server.api.openai import errors as openai_errors
from kontext_server.api.openai import router as openai_router
from kontext_server.api.output_store import OutputStore
from kontext_server.api.rate_limit import RateLimiter
from kontext_server.api.routes import benchmark, files, health, inference, playground
from kontext_server.provenance import C2paSigner, Provenance, ProvenanceConfigError
from kontext_server.safety import SafetyHook

ROUTERS = (inference.router, health.router, benchmark.router, openai_router.router, bfl_router.router, files.router,
           playground.router)
# Open without a key: probes, the scrape (unless --metrics-key-required), the API's own documentation and the
# playground page (/ui: its API calls send the key the user types).
OPEN_PATHS = frozenset({"/health", "/live", "/metrics", "/docs", "/docs/oauth2-redirect", "/redoc", "/openapi.json",
                        *playground.PATHS})
# Paths whose requests run a job on the worker: each holds one of its key's concurrency slots.
JOB_PATHS = frozenset({"/inference", "/benchmark", "/v1/images/generations", "/v1/images/edits"})
# Open prefixes: the output store's signed URLs (the signature is the credential).
OPEN_PREFIXES = ("/v1/files/",)
# Need a key but are not rate-limited: polling a job is cheap, and a limit sized for generations would starve it.
UNLIMITED_PATHS = frozenset({"/v1/get_result"})


def build_app(service, settings: ServerSettings | None = None, output_store: OutputStore | None = None,
              engine=None, metrics=None) -> FastAPI:
    """The app of one service. `engine` None: a local Engine running jobs on `service` here; `metrics` None: a
    fresh Metrics registry (the app's own); `output_store` None: the one the settings name (local files by default)."""
    settings = settings or ServerSettings()
    metrics = metrics if metrics is not None else Metrics()
    if engine is None:
        engine = local_engine(service, settings, metrics)
    server = Server(service=service, engine=engine, metrics=metrics, settings=settings)
    jobs = build_jobs(server, output_store)  # opens the data directory: fails here if another server holds it
    app = FastAPI(title="FLUX.1-Kontext inference server", version=__version__,
                  lifespan=lifespan_for(service, engine, settings, jobs))
    server.provenance = provenance_for(settings, server.model_id)
    server.safety = SafetyHook.from_spec(settings.safety_checker)
    app.state.server = server
    known_paths: set[str] = set()
    limiter = (RateLimiter(settings.rate_limit, job_retry_after=engine.retry_after_seconds)
               if settings.rate_limit is not None else None)
    open_paths = set(OPEN_PATHS) - ({"/metrics"} if settings.metrics_key_required else set())
    app.add_middleware(BodySizeLimit, max_bytes=settings.max_body_bytes, error_body=error_body_for)
    app.add_middleware(KeyGuard, keys=settings.api_keys, limiter=limiter, open_paths=open_paths,
                       job_paths=set(JOB_PATHS), metrics=metrics, error_body=error_body_for,
                       open_prefixes=OPEN_PREFIXES, unlimited_paths=UNLIMITED_PATHS)
    # last = outermost: 413s and 401s get a request id and are counted
    app.add_middleware(RequestContext, metrics=metrics, known_paths=known_paths, error_body=error_body_for)

    @app.exception_handler(RequestValidationError)
    async def on_validation_error(request: Request, exc: RequestValidationError):
        errors = clean_errors(exc.errors(), request.headers.get("content-type"))
        if bfl_errors.is_bfl_path(request.url.path):
            return bfl_errors.field_errors(errors)
        if openai_errors.is_openai_path(request.url.path):
            return openai_errors.validation_response(errors)
        msg = "; ".join(f"{e['field']}: {e['message']}" for e in errors) or "invalid request"
        return error_response(422, "validation_error", msg, errors)

    @app.exception_handler(StarletteHTTPException)
    async def on_http_error(request: Request, exc: StarletteHTTPException):
        if bfl_errors.is_bfl_path(request.url.path):
            return bfl_errors.error_response(exc.status_code, str(exc.detail), headers=exc.headers)
        if openai_errors.is_openai_path(request.url.path):
            code = {404: "not_found", 405: "method_not_allowed"}.get(exc.status_code, "http_error")
            return openai_errors.error_response(exc.status_code, str(exc.detail), code=code, headers=exc.headers)
        return error_response(exc.status_code, "http_error", str(exc.detail))

    for router in ROUTERS:
        app.include_router(router)
    known_paths.update(r.path for r in app.routes if hasattr(r, "path"))  # FastAPI's own: /docs, /openapi.json
    known_paths.update(r.path for router in ROUTERS for r in router.routes)
    return app


def provenance_for(settings: ServerSettings, model_id: str) -> Provenance:
    """The encoder's provenance from the settings (ProvenanceConfigError: a C2PA certificate or key that cannot
    sign, or only one of the two given)."""
    signer = None
    if settings.c2pa_cert or settings.c2pa_key:
        if not (settings.c2pa_cert and settings.c2pa_key):
            raise ProvenanceConfigError("C2PA signing needs both --c2pa-cert and --c2pa-key")
        signer = C2paSigner.from_files(settings.c2pa_cert, settings.c2pa_key, model_id)
    return Provenance(metadata=settings.provenance_metadata, prompt=settings.provenance_prompt, model=model_id,
                      signer=signer)


def local_engine(service, settings: ServerSettings, metrics: Metrics) -> eng.Engine:
    """The local engine: one worker thread running each job's payload on `service`, queue waits into `metrics`."""
    def on_event(event: str, job: eng.Job, info: dict):
        if event == "started":
            metrics.queue_wait.observe(info["queue_wait_s"])

    return eng.Engine(lambda job: job.payload.run(service, job.should_stop), max_queue=settings.max_queue,
                      queue_timeout=settings.queue_timeout, request_timeout=settings.request_timeout,
                      on_event=on_event)


create_app = build_app  # the name the tests and earlier releases use
