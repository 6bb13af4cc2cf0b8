"""Probes and scrapes: GET /health (200 ready, 503 loading / failed / draining), GET /live, GET /metrics."""
from __future__ import annotations

from fastapi import APIRouter, Request
from fastapi.concurrency import run_in_threadpool
from fastapi.responses import JSONResponse, Response

from kontext_server.api.context import server

router = APIRouter()


@router.get("/health")
async def health(request: Request):
    srv = server(request)
    info = srv.service.health()
    info["queue_depth"], info["in_flight"] = srv.engine.queue_depth, srv.engine.in_flight
    if srv.jobs is not None:
        info["jobs"] = {"by_status": await run_in_threadpool(srv.jobs.store.counts_by_status),
                        "output_store": srv.output_store.kind, "data_dir": str(srv.jobs.store.path.parent)}
    info["provenance"] = srv.provenance.describe()
    info["safety_checker"] = srv.safety.describe() if srv.safety is not None else None
    if not srv.engine.accepting:
        info["status"] = "draining"
    # From the body's own status, read once above: the model may finish loading while this handler awaits, and a
    # second reading of the state would answer 200 with a body that says "loading"
    ok = info["status"] == "ready"
    return JSONResponse(info, status_code=200 if ok else 503)


@router.get("/live")
async def live():
    return {"status": "alive"}


@router.get("/metrics")
async def metrics(request: Request):
    srv = server(request)
    counts = await run_in_threadpool(srv.jobs.store.counts_by_status) if srv.jobs is not None else None
    data = srv.metrics.render(srv.engine, ready=srv.service.state == "ready", job_counts=counts)
    return Response(data, media_type="text/plain; version=0.0.4; charset=utf-8")
