"""ASGI middleware of the app: a body-size limit (413 before a huge body is buffered), the key guard (API keys and
per-key limits: 401 / 429 before the route runs) and the request context (a request id on every response, metrics,
one log line per request, a JSON 500 for anything a route did not handle).

Their errors take the shape of the route family the path belongs to (`error_body(path, status, code, message)`, given
by the app). Pure ASGI on purpose: BaseHTTPMiddleware would hide client disconnects from the routes."""
from __future__ import annotations

import json
import logging
import re
import time
import uuid
from typing import Callable

from kontext_server.api.auth import KeyStore, presented_key
from kontext_server.api.metrics import Metrics
from kontext_server.api.rate_limit import RateLimiter

log = logging.getLogger("flux.api")
REQUEST_ID_RE = re.compile(r"^[A-Za-z0-9._-]{1,64}$")
ErrorBody = Callable[[str, int, str, str], dict]  # (path, status, code, message) -> JSON body


def plain_error_body(path: str, status: int, code: str, message: str) -> dict:
    return {"error": code, "message": message}


class BodySizeLimit:
    """ASGI middleware: 413 before a huge body is buffered, with or without Content-Length.

    A chunked body that grows past the limit is cut off: the app sees the client as gone (so nothing raises
    through FastAPI's body parser, which would turn it into a 400), its own answer is dropped, and the client
    gets the 413."""

    def __init__(self, app, max_bytes: int, error_body: ErrorBody = plain_error_body):
        self.app, self.max_bytes, self.error_body = app, max_bytes, error_body

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
                    return await self._reject(scope, send)
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
            await self._reject(scope, send)

    async def _reject(self, scope, send):
        await send_json(send, 413, self.error_body(scope.get("path", ""), 413, "payload_too_large",
                                                   f"request body is larger than {self.max_bytes} bytes"))


async def send_json(send, status: int, body: dict, extra_headers: list | None = None) -> None:
    data = json.dumps(body).encode()
    headers = [(b"content-type", b"application/json"), (b"content-length", str(len(data)).encode())]
    await send({"type": "http.response.start", "status": status, "headers": headers + (extra_headers or [])})
    await send({"type": "http.response.body", "body": data})


class KeyGuard:
    """Pure ASGI middleware: every path but the open ones needs a valid API key (when the server has keys) and passes
    the per-key limits (when it has a rule), before the route runs.

    Refusals: 401 (with `WWW-Authenticate: Bearer`) for a missing or unknown key; 429 with Retry-After over a limit.
    A request to one of `job_paths` holds one of its key's concurrency slots until its response is sent (a stream's
    too). Requests are counted per key id in metrics (`none` / `invalid` for refused keys), never per key."""

    def __init__(self, app, keys: KeyStore | None, limiter: RateLimiter | None, open_paths: set[str],
                 job_paths: set[str], metrics: Metrics, error_body: ErrorBody = plain_error_body,
                 open_prefixes: tuple[str, ...] = (), unlimited_paths: frozenset[str] = frozenset()):
        self.app, self.keys, self.limiter, self.metrics, self.error_body = app, keys, limiter, metrics, error_body
        self.open_paths, self.job_paths, self.open_prefixes = open_paths, job_paths, open_prefixes
        self.unlimited_paths = unlimited_paths  # need a key but pass the rate limit (polling a job's status)

    async def __call__(self, scope, receive, send):
        path = route_path(scope)  # without a mount prefix: /health is open however the app is mounted
        if (scope["type"] != "http" or path in self.open_paths or path.startswith(self.open_prefixes)
                or (self.keys is None and self.limiter is None)):
            return await self.app(scope, receive, send)
        kid = "anonymous"
        if self.keys is not None:
            presented = presented_key(scope.get("headers", []))
            kid = self.keys.identify(presented) if presented is not None else None
            if kid is None:
                label = "none" if presented is None else "invalid"
                self.metrics.requests_by_key.labels(label, "401").inc()
                msg = ("missing API key: send Authorization: Bearer <key> or x-key: <key>" if presented is None
                       else "invalid API key")
                return await send_json(send, 401, self.error_body(path, 401, "invalid_api_key", msg),
                                       [(b"www-authenticate", b"Bearer")])
        job = path in self.job_paths
        admitted = False
        if self.limiter is not None and path not in self.unlimited_paths:
            verdict = self.limiter.admit(kid, job=job)
            if not verdict.ok:
                self.metrics.requests_by_key.labels(kid, "429").inc()
                return await send_json(send, 429, self.error_body(path, 429, "rate_limit_exceeded", verdict.reason),
                                       [(b"retry-after", str(verdict.retry_after_s).encode())])
            admitted = job
        status = {"code": None}

        async def counting_send(message):
            if message["type"] == "http.response.start":
                status["code"] = message["status"]
            await send(message)

        try:
            await self.app(scope, receive, counting_send)
        finally:
            if admitted:
                self.limiter.release(kid)
            self.metrics.requests_by_key.labels(kid, str(status["code"] or 499)).inc()


def route_path(scope) -> str:
    """The path the app routes on: without the prefix it is mounted under (`root_path`: a Ray Serve route prefix,
    uvicorn's --root-path), so metrics name /inference however the app is mounted."""
    path, root = scope.get("path", ""), scope.get("root_path", "")
    return path[len(root):] or "/" if root and path.startswith(root) else path


class RequestContext:
    """Pure ASGI middleware (BaseHTTPMiddleware would hide client disconnects from the routes): a request id on
    every response, metrics, one log line per request, and a JSON 500 for anything a route did not handle."""

    def __init__(self, app, metrics: Metrics, known_paths: set[str], error_body: ErrorBody = plain_error_body):
        # known_paths: the app's route paths, reported by name in metrics; anything else is "other" (no unbounded
        # label values from scanners). The app fills the set once its routes are attached.
        self.app, self.metrics, self.known_paths, self.error_body = app, metrics, known_paths, error_body

    def _template(self, path: str) -> str:
        """A known route with a path parameter, by its template (/v1/jobs/{job_id}); else "other"."""
        for known in self.known_paths:
            if "{" in known and path.startswith(known.split("{", 1)[0]) and path.count("/") == known.count("/"):
                return known
        return "other"

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
                await send_json(send, 500, self.error_body(scope.get("path", ""), 500, "internal_error",
                                                           f"{type(exc).__name__}: {exc}"), [rid_header])
        finally:
            path = route_path(scope)
            label = path if path in self.known_paths else self._template(path)
            code = status["code"] or 499  # no answer sent: the client went away
            elapsed = time.perf_counter() - t0
            self.metrics.requests.labels(label, str(code)).inc()
            self.metrics.latency.labels(label).observe(elapsed)
            if not state.get("logged"):  # /inference logs its own, richer line
                log.info("request %s %s %s status=%s ms=%.0f", rid, scope.get("method"), path, code, elapsed * 1000)
