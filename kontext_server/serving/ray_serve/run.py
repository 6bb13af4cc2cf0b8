"""`flux_kontext_optimized.py serve --engine ray`: join (or start) a Ray cluster, deploy the application behind Serve's
HTTP proxy on --host / --port, and run until SIGTERM or Ctrl-C.

What: the arguments are validated before anything starts (options.AppArgs); without a cluster address (--ray-address
or RAY_ADDRESS) Ray starts a local one on this machine, with every GPU of it. `serve.run` returns once every replica
has loaded (a model that cannot load fails the deployment: the command exits with Serve's message), unless
--background-load, which returns once the app is deployed (/health answers 503 until a replica is ready).
On SIGTERM or SIGINT: the application is deleted gracefully (the ingress stops accepting and drains for
--shutdown-grace; replicas finish their running work), then Serve and a Ray this command started are shut down.
Contract: the one process that starts and stops everything; what it started, it stops. Exit status 0 after a drain.
"""
from __future__ import annotations

import logging
import signal
import threading

from kontext_server.serving.ray_serve.options import APP_NAME, AppArgs

log = logging.getLogger("flux.ray")


def serve_forever(args: dict, *, host: str, port: int, ray_address: str | None, background_load: bool = False,
                  app_name: str = APP_NAME) -> None:
    a = AppArgs.parse(args)  # a bad option fails here, before a cluster starts
    import ray
    from ray import serve

    from kontext_server.serving.ray_serve.app import application

    started_ray = not _joined(ray_address)
    ctx = ray.init(address=ray_address or None)
    stop = threading.Event()  # after ray.init, whose own SIGTERM handler would abort the process
    previous = {sig: signal.signal(sig, lambda *_: stop.set()) for sig in (signal.SIGTERM, signal.SIGINT)}
    try:
        serve.start(proxy_location="EveryNode", http_options={"host": host, "port": port})
        app = application(a)
        if background_load:
            serve.run_many([serve.RunTarget(app, name=app_name, route_prefix="/")],
                           wait_for_applications_running=False)
        else:
            serve.run(app, name=app_name, route_prefix="/")
        log.info("serving on http://%s:%d (Ray Serve application %r; dashboard %s)", host, port, app_name,
                 ctx.dashboard_url or "off")
        print(f"ready: http://{host}:{port} (Ray Serve, application {app_name!r})", flush=True)
        while not stop.wait(1.0):
            pass
        log.info("signal received: deleting application %r (graceful)", app_name)
        serve.delete(app_name)
    finally:
        for sig, handler in previous.items():
            signal.signal(sig, handler)
        if started_ray:
            serve.shutdown()
            ray.shutdown()


def _joined(ray_address: str | None) -> bool:
    """Whether ray.init joined a cluster that was already running (RAY_ADDRESS in the environment counts)."""
    from kontext_server import settings

    return bool(ray_address or settings.RAY_ADDRESS.get())
