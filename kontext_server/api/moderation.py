"""The safety hook on the request path (kontext_server/safety.py): the input check before a job is queued, the
output check before anything is encoded, each in the thread pool. Shared by /inference and the /v1 routes, which
answer a blocked request in their own shape."""
from __future__ import annotations

import logging

from fastapi.concurrency import run_in_threadpool

from kontext_server.safety import INPUT, Verdict
from kontext_server.service.sizes import as_references

log = logging.getLogger("flux.api")


async def screen(srv, request_id: str, prompt: str, images, stage: str = INPUT) -> Verdict | None:
    """None when the request may go on (no checker configured, or it allowed it); the blocking Verdict otherwise.
    SafetyCheckFailed when the checker raised (the request is not served)."""
    if srv.safety is None:
        return None
    verdict = await run_in_threadpool(srv.safety.check, prompt, as_references(images), stage)
    if verdict.allowed:
        return None
    log.info("request %s blocked by the safety checker at the %s check", request_id, stage)
    return verdict


def blocked_message(verdict: Verdict) -> str:
    what = "the request" if verdict.stage == INPUT else "the generated image"
    return f"the safety checker blocked {what}: {verdict.reason}"
