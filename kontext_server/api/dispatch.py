"""Submitting a job to the engine from a route and awaiting it, while watching the client.

A client that disconnects cancels its job (a queued one never runs, a running one stops at its next step); a job
that waits longer than the queue timeout is answered 503. The event loop only awaits: no model work runs on it.
`submit_and_wait` is the usual call; a streaming route submits first (so a full queue is still an HTTP 429) and
awaits with `wait_for` while it streams."""
from __future__ import annotations

import asyncio
import time

from fastapi import Request

from kontext_server import engine as eng


async def submit_and_wait(engine: eng.Engine, request: Request, payload, job_id: str):
    """(job, result); raises EngineError (QueueFull / ShuttingDown at submit, or the job's own error)."""
    job = engine.submit(payload, job_id=job_id)
    return job, await wait_for(engine, request, job)


async def wait_for(engine: eng.Engine, request: Request, job: eng.Job):
    """The submitted job's result; raises its EngineError. Cancelling this coroutine cancels the job."""
    fut = asyncio.wrap_future(job.future)
    try:
        while True:
            done, _ = await asyncio.wait({fut}, timeout=0.2)
            if done:
                return fut.result()
            if await request.is_disconnected():
                engine.cancel(job, eng.Cancelled)
                await asyncio.wait({fut}, timeout=5)
                raise eng.Cancelled("client disconnected")
            if job.started_at is None and time.monotonic() - job.enqueued_at > engine.queue_timeout:
                engine.cancel(job, eng.QueueTimeout)
    except asyncio.CancelledError:
        engine.cancel(job, eng.Cancelled)
        fut.add_done_callback(_retrieve)  # nobody awaits it now: no "exception was never retrieved" line
        raise


def _retrieve(fut: asyncio.Future) -> None:
    if not fut.cancelled():
        fut.exception()
