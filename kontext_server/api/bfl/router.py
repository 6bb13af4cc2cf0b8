"""The BFL-shaped routes: POST /v1/flux-kontext-dev (submit), GET /v1/get_result (poll), DELETE /v1/jobs/{id}
(cancel). Keys: `x-key` (BFL's header) or `Authorization: Bearer`, like every keyed route."""
from __future__ import annotations

from fastapi import APIRouter, Query, Request

from kontext_server.api.bfl import serving
from kontext_server.api.bfl.protocol import CancelResponse, KontextRequest, ResultResponse, SubmitResponse

router = APIRouter(prefix="/v1", tags=["BFL-compatible (async jobs)"])
RESPONSES = {401: {}, 413: {}, 422: {}, 429: {}, 503: {}}


@router.post("/flux-kontext-dev", response_model=SubmitResponse, responses=RESPONSES)
async def flux_kontext_dev(body: KontextRequest, request: Request):
    """Submit a generation or an edit; answers at once with the job's id and the URL to poll."""
    return await serving.submit(request, body)


@router.get("/get_result", response_model=ResultResponse, responses={422: {}})
async def get_result(request: Request, id: str = Query(..., min_length=1, max_length=64)):  # noqa: A002 - BFL's name
    """A job's status (Pending, Ready, Error, Task not found), progress 0..1 and result."""
    return await serving.get_result(request, id)


@router.delete("/jobs/{job_id}", response_model=CancelResponse, responses={404: {}, 409: {}})
async def cancel_job(job_id: str, request: Request):
    """Cancel a job: a waiting one never runs; a running one stops at its next denoising step."""
    return await serving.cancel(request, job_id)
