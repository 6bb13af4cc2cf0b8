"""What the routes share: the server's settings and the objects one app holds (service, engine, metrics).

Routes reach them through `server(request)` (the app's state), so several apps can live in one process (tests)."""
from __future__ import annotations

from dataclasses import dataclass

from fastapi import Request


@dataclass
class ServerSettings:
    max_queue: int = 16
    queue_timeout: float = 120.0
    request_timeout: float = 600.0
    shutdown_grace: float = 30.0
    drain_seconds: float = 0.0  # after SIGTERM, keep the listener open this long (see lifecycle.py)
    max_body_bytes: int = 32 * 1024 * 1024
    load_in_background: bool = True


@dataclass
class Server:
    service: object  # kontext_server.service.FluxService
    engine: object  # kontext_server.engine.Engine
    metrics: object  # kontext_server.api.metrics.Metrics
    settings: ServerSettings


def server(request: Request) -> Server:
    return request.app.state.server
