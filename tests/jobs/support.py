"""What the job tests share: an in-process app on the tiny model, polling a job, and small HTTP servers on loopback
that a test starts in a thread (a webhook receiver, an image host)."""
from __future__ import annotations

import threading
import time
from contextlib import contextmanager
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer

from fastapi.testclient import TestClient

from kontext_server.api.app import ServerSettings, create_app

FAST = {"width": 256, "height": 256, "steps": 2, "output_format": "png"}


@contextmanager
def app_client(service, output_store=None, **settings):
    """A TestClient of a new app on `service` (lifespan run: the job manager started and closed)."""
    app = create_app(service, ServerSettings(load_in_background=False, **settings), output_store=output_store)
    with TestClient(app) as client:
        yield client


def poll(client, job_id: str, timeout: float = 60.0, until=("Ready", "Error", "Task not found"),
         interval: float = 0.01) -> tuple[dict, list[float]]:
    """Poll get_result until the status is one of `until`; (last answer, the progress values seen)."""
    seen: list[float] = []
    deadline = time.monotonic() + timeout
    while True:
        r = client.get("/v1/get_result", params={"id": job_id})
        assert r.status_code == 200, r.text
        body = r.json()
        if body["progress"] is not None:
            seen.append(body["progress"])
        if body["status"] in until:
            return body, seen
        assert time.monotonic() < deadline, f"job {job_id} still {body} after {timeout} s"
        time.sleep(interval)


def wait_for(predicate, timeout: float = 30.0, interval: float = 0.02):
    deadline = time.monotonic() + timeout
    while True:
        value = predicate()
        if value:
            return value
        assert time.monotonic() < deadline, "condition not met in time"
        time.sleep(interval)


@contextmanager
def http_server(handler_cls: type[BaseHTTPRequestHandler]):
    """A threaded HTTP server on 127.0.0.1 (a free port) serving `handler_cls`; yields its base URL."""
    server = ThreadingHTTPServer(("127.0.0.1", 0), handler_cls)
    server.daemon_threads = True
    thread = threading.Thread(target=server.serve_forever, daemon=True)
    thread.start()
    try:
        yield f"http://127.0.0.1:{server.server_address[1]}"
    finally:
        server.shutdown()
        server.server_close()
