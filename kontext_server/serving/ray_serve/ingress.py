"""FluxIngress: the same FastAPI app as the local server, on Ray Serve, with its jobs run by the model replicas.

What: the app is `api.app.build_app` itself (every route, schema, error and header), built when the replica starts
(`__serve_build_asgi_app__`, Serve's late-bound ingress) with a RemoteService in place of the service, a
RemoteEngine in place of the local engine and IngressMetrics. Its lifespan runs as on the local server (Serve runs
an ASGI app's lifespan): the engine starts, the shutdown drains.
Why one app: a client, a load balancer or a dashboard cannot tell the two servers apart except by the replica's
name in X-Replica, the `replica` field, /health's replica counts and /metrics' replica label.
Contract: the response carries one X-Request-ID: Ray's proxy adds the request's own to every response, so the app's
copy is dropped (the proxy's is the same value unless the client sent one the app refuses: docs/api.md).
"""
from __future__ import annotations

from ray import serve

from kontext_server.api.app import build_app
from kontext_server.api.context import ServerSettings
from kontext_server.service.config import ServiceConfig
from kontext_server.serving.ray_serve.board import ReplicaBoard
from kontext_server.serving.ray_serve.logs import configure_logging
from kontext_server.serving.ray_serve.metrics import IngressMetrics
from kontext_server.serving.ray_serve.remote_engine import RemoteEngine
from kontext_server.serving.ray_serve.remote_service import RemoteService


class OneRequestIdHeader:
    """ASGI wrapper: drop the app's X-Request-ID from responses (Ray's proxy appends the request's own)."""

    def __init__(self, app):
        self.app = app

    async def __call__(self, scope, receive, send):
        if scope["type"] != "http":
            return await self.app(scope, receive, send)

        async def send_one_id(message):
            if message["type"] == "http.response.start":
                message = dict(message, headers=[(k, v) for k, v in message.get("headers", [])
                                                 if k.lower() != b"x-request-id"])
            await send(message)

        await self.app(scope, receive, send_one_id)


@serve.deployment(name="FluxIngress")
@serve.ingress()
class FluxIngress:
    def __init__(self, model, status, config: ServiceConfig, server: ServerSettings):
        configure_logging()
        self.board = ReplicaBoard(status)
        self.board.start()
        self.service = RemoteService(config, self.board)
        self.engine = RemoteEngine(model, max_queue=server.max_queue, queue_timeout=server.queue_timeout,
                                   request_timeout=server.request_timeout,
                                   ready_replicas=lambda: len(self.board.ready()), plan_key=self.service.plan_key,
                                   on_replica_lost=self.board.forget)
        self.metrics = IngressMetrics(self.board)
        self.server = server

    def __serve_build_asgi_app__(self):
        app = build_app(self.service, self.server, engine=self.engine, metrics=self.metrics)
        return OneRequestIdHeader(app)

    def __del__(self):
        self.board.stop()
