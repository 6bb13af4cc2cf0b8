"""GET /benchmark: the request benchmark on the loaded model, run by the worker like a generation."""
from __future__ import annotations

from fastapi import APIRouter, Query, Request

from kontext_server import engine as eng
from kontext_server.api.context import server
from kontext_server.api.dispatch import submit_and_wait
from kontext_server.api.errors import engine_error_response, field_error, not_ready_response
from kontext_server.jobs import BenchmarkJob

router = APIRouter()


@router.get("/benchmark")
async def benchmark(request: Request, runs: int = Query(3, ge=1, le=20), steps: int = Query(4, ge=1, le=50),
                    width: int = Query(256, ge=256, le=2048), height: int = Query(256, ge=256, le=2048),
                    edit: bool = Query(False)):
    srv = server(request)
    if width % 16 or height % 16:
        return field_error(422, "validation_error", "query.width" if width % 16 else "query.height",
                           "must be a multiple of 16")
    if srv.service.state != "ready":
        return not_ready_response(srv.service.state)
    job = BenchmarkJob(dict(runs=runs, steps=steps, width=width, height=height, edit=edit))
    try:
        _job, result = await submit_and_wait(srv.engine, request, job, request.state.request_id)
    except eng.EngineError as exc:
        return engine_error_response(exc, srv.engine)
    return result
