"""Webhook delivery: each finished job with a `webhook_url` gets its result POSTed there, signed, retried, recorded.

What: the job store writes a delivery in the same transaction as the job's final state; `WebhookSender` (one thread
plus a small pool) sends each due delivery: `POST <webhook_url>` with the JSON body of `GET /v1/get_result`, and the
headers
- `X-Webhook-Signature: sha256=<hex>`: HMAC-SHA256 of the raw body under the job's `webhook_secret` (only when the
  job gave one);
- `X-Webhook-Id: <job id>` (the same on every attempt: receivers deduplicate with it) and `X-Webhook-Attempt: <n>`.
A 2xx answer is delivered. Anything else (another status, a timeout, a refused address) is retried after each of
`retry_delays` (1, 5, 30 s by default), then recorded as failed. No redirect is followed.
Contract: a delivery never changes its job's state and never runs on the device worker. Deliveries are in the
store, so one pending when the server stops is sent after it starts again. Delivery is at least once: a server
killed during an attempt sends it again after the restart. Secrets and URL query strings are never logged.
Limits: `max_parallel` deliveries at once (4); each attempt within `policy.timeout` seconds (10).
"""
from __future__ import annotations

import hashlib
import hmac
import logging
import threading
import time
from concurrent.futures import ThreadPoolExecutor
from typing import Callable

from kontext_server import safe_http
from kontext_server.jobstore.store import Delivery, JobStore

log = logging.getLogger("flux.webhooks")
SIGNATURE_HEADER = "X-Webhook-Signature"


def signature(secret: str, body: bytes) -> str:
    """The signature header's value: `sha256=<hex HMAC-SHA256 of the raw body>`."""
    return "sha256=" + hmac.new(secret.encode("utf-8"), body, hashlib.sha256).hexdigest()


class WebhookSender:
    def __init__(self, store: JobStore, policy: safe_http.FetchPolicy, retry_delays: tuple[float, ...] = (1, 5, 30),
                 max_parallel: int = 4, on_outcome: Callable[[str], None] | None = None,
                 resolver: safe_http.Resolver = safe_http.system_resolver):
        self.store, self.policy, self.retry_delays = store, policy, tuple(retry_delays)
        self.on_outcome = on_outcome or (lambda outcome: None)
        self.resolver = resolver
        self._pool = ThreadPoolExecutor(max_parallel, thread_name_prefix="webhook")
        self._max_parallel = max_parallel
        self._inflight: set[str] = set()
        self._cv = threading.Condition()
        self._stop = False
        self._thread: threading.Thread | None = None

    def start(self) -> None:
        if self._thread is None:
            self._thread = threading.Thread(target=self._loop, name="webhook-sender", daemon=True)
            self._thread.start()

    def wake(self) -> None:
        with self._cv:
            self._cv.notify_all()

    def stop(self, wait: float = 5.0) -> None:
        with self._cv:
            self._stop = True
            self._cv.notify_all()
        if self._thread is not None:
            self._thread.join(wait)
        self._pool.shutdown(wait=False, cancel_futures=True)

    def _loop(self) -> None:
        while True:
            with self._cv:
                if self._stop:
                    return
                exclude = set(self._inflight)
            free = self._max_parallel - len(exclude)
            due = self.store.due_deliveries(time.time(), exclude, limit=max(free, 0)) if free > 0 else []
            for d in due:
                with self._cv:
                    self._inflight.add(d.job_id)
                self._pool.submit(self._attempt, d)
            with self._cv:
                if self._stop:
                    return
                nxt = self.store.next_delivery_at()
                wait = 1.0 if nxt is None else min(1.0, max(0.01, nxt - time.time()))
                if not due or free <= len(due):
                    self._cv.wait(wait)

    def _attempt(self, d: Delivery) -> None:
        attempt = d.attempts + 1
        headers = {"Content-Type": "application/json", "X-Webhook-Id": d.job_id, "X-Webhook-Attempt": str(attempt),
                   "User-Agent": "flux-kontext-server-webhook"}
        if d.secret:
            headers[SIGNATURE_HEADER] = signature(d.secret, d.body)
        error = None
        try:
            status = safe_http.post(d.url, d.body, headers, self.policy, self.resolver)
            if not 200 <= status < 300:
                error = f"answered HTTP {status}"
        except safe_http.FetchError as exc:
            error = str(exc)
        except Exception as exc:  # noqa: BLE001 - a delivery's failure must not end the sender
            error = f"{type(exc).__name__}: {exc}"
        try:
            if error is None:
                self.store.record_attempt(d.job_id, delivered=True, error=None, next_at=None)
                self.on_outcome("delivered")
                log.info("webhook job=%s attempt=%d delivered to %s", d.job_id, attempt, safe_http.redact(d.url))
            elif attempt <= len(self.retry_delays):
                self.store.record_attempt(d.job_id, delivered=False, error=error,
                                          next_at=time.time() + self.retry_delays[attempt - 1])
                self.on_outcome("retry")
                log.warning("webhook job=%s attempt=%d failed (%s); retry in %g s", d.job_id, attempt, error,
                            self.retry_delays[attempt - 1])
            else:
                self.store.record_attempt(d.job_id, delivered=False, error=error, next_at=None)
                self.on_outcome("failed")
                log.warning("webhook job=%s attempt=%d failed (%s); giving up", d.job_id, attempt, error)
        except Exception:  # the store closed under us at shutdown: the delivery stays pending for the next start
            log.debug("webhook job=%s: could not record the attempt", d.job_id, exc_info=True)
        finally:
            with self._cv:
                self._inflight.discard(d.job_id)
                self._cv.notify_all()
