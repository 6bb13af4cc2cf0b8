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


def lifespan_for(service, engine: eng.Engine, settings, jobs=None):
    """`jobs`: the app's JobManager (or None): started with the app, its stored jobs recovered once the model is
    ready, closed after the engine drained (queued async jobs stay pending in the store for the next start)."""
    def recover():
        if jobs is not None:
            try:
                jobs.recover()
            except Exception:
                log.exception("could not recover the stored jobs")

    @asynccontextmanager
    async def lifespan(app: FastAPI):
        engine.start()
        if jobs is not None:
            jobs.start()
        if service.state == "loading":
            def load():
                try:
                    service.load()
                    log.info("model ready: %s", service.health().get("model"))
                except Exception:
                    log.exception("model failed to load")
                    return
                recover()
            if settings.load_in_background:
                threading.Thread(target=load, name="model-loader", daemon=True).start()
            else:
                await run_in_threadpool(load)
        else:
            await run_in_threadpool(recover)
        _chain_sigterm(engine, settings.shutdown_grace, settings.drain_seconds)
        yield
        # Shutdown: queued and running work gets the grace period, then a clear 503.
        finished = await run_in_threadpool(engine.drain, settings.shutdown_grace)
        log.info("shutdown: drained %s", "all work" if finished else "with work left (answered 503)")
        if jobs is not None:
            await run_in_threadpool(jobs.close)

    return lifespan


def _chain_sigterm(engine: eng.Engine, grace: float, drain_seconds: float) -> None:
    """On SIGTERM, what a load balancer's readiness probe expects:
    - at once: stop accepting (/health 503 "draining"; new work 503 shutting_down with Retry-After), while the
      listening socket stays open for `drain_seconds`, so probes and late clients get those answers instead of a
      refused connection;
    - then hand the signal to the server's own handler (uvicorn closes the socket and waits for open requests);
    - running work gets `grace` seconds from the signal, then what is left is interrupted at its next step and its
      client gets a JSON 503 before the server's own shutdown timeout."""
    if threading.current_thread() is not threading.main_thread():
        return
    previous = signal.getsignal(signal.SIGTERM)

    def close(signum, frame):
        if callable(previous):
            previous(signum, frame)
        elif previous == signal.SIG_DFL:  # no server handler: end the process as the default would
            signal.signal(signal.SIGTERM, signal.SIG_DFL)
            signal.raise_signal(signal.SIGTERM)

    def handler(signum, frame):
        first = engine.accepting
        engine.stop_accepting()
        if not first:  # a second SIGTERM: stop waiting
            return close(signum, frame)
        timer = threading.Timer(grace, engine.drain, args=(0.0,))
        timer.daemon = True
        timer.start()
        if drain_seconds > 0:
            log.info("SIGTERM: draining for %.0f s before closing the listener", drain_seconds)
            closer = threading.Timer(drain_seconds, close, args=(signum, frame))
            closer.daemon = True
            closer.start()
        else:
            close(signum, frame)

    signal.signal(signal.SIGTERM, handler)
