"""The app's life: start the worker and load the model (in the background or before serving), drain on shutdown, and
SIGTERM handling (stop accepting at once, give running work its grace period, then answer what is left 503)."""
from __future__ import annotations

import logging
import signal
import threading
from contextlib import asynccontextmanager

from fastapi import FastAPI
from fastapi.concurrency import run_in_threadpool

from kontext_server import engine as eng

log = logging.getLogger("flux.api")


def lifespan_for(service, engine: eng.Engine, settings):
    @asynccontextmanager
    async def lifespan(app: FastAPI):
        engine.start()
        if service.state == "loading":
            def load():
                try:
                    service.load()
                    log.info("model ready: %s", service.health().get("model"))
                except Exception:
                    log.exception("model failed to load")
            if settings.load_in_background:
                threading.Thread(target=load, name="model-loader", daemon=True).start()
            else:
                await run_in_threadpool(load)
        _chain_sigterm(engine, settings.shutdown_grace)
        yield
        # Shutdown: queued and running work gets the grace period, then a clear 503.
        finished = await run_in_threadpool(engine.drain, settings.shutdown_grace)
        log.info("shutdown: drained %s", "all work" if finished else "with work left (answered 503)")

    return lifespan


def _chain_sigterm(engine: eng.Engine, grace: float) -> None:
    """On SIGTERM: stop accepting at once (health turns 503), give running work `grace` seconds, then interrupt
    what is left so its client gets a JSON 503 before the server's own shutdown timeout; then hand the signal
    to the server's handler (uvicorn closes the socket and waits for open requests)."""
    if threading.current_thread() is not threading.main_thread():
        return
    previous = signal.getsignal(signal.SIGTERM)

    def handler(signum, frame):
        engine.stop_accepting()
        timer = threading.Timer(grace, engine.drain, args=(0.0,))
        timer.daemon = True
        timer.start()
        if callable(previous):
            previous(signum, frame)
        elif previous == signal.SIG_DFL:
            raise SystemExit(0)

    signal.signal(signal.SIGTERM, handler)
