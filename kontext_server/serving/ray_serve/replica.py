"""FluxModel: one model replica, the same FluxService (load, optimise, generate) behind Ray Serve, one per GPU.

What: the constructor loads and warms the service (the compile cache directory is shared by the replicas of a host:
the first compiles, the others load its artifacts; service/compile_lock.py), then starts a local Engine: the same
bounded queue and single worker as the local server. `run(payload, job_id, planned_with)` is a streaming method:
it yields ("started", replica id) when the worker begins the job, then ("result", value) or ("error", EngineError);
with `relay_steps` (the ingress's job has a step hook: a stream's previews, a job's progress) also ("step", (step,
steps, preview or None)) after each denoising step, the preview decoded here at the steps `partial_images` picks.
The ingress needs "started" to know whether a request whose replica died can be retried elsewhere (no event is sent
on arrival: each streamed item costs a message, and the path's overhead is measured against a plain Serve app).
Why the constructor blocks on loading: Serve sends a replica no traffic until its constructor returns, so a replica
that is loading or compiling gets none; `check_health` then fails whenever the replica cannot serve (load failed,
worker gone), and Serve replaces it.
Contract: Ray sends at most `max_ongoing_requests` (1 running + FLUX_REPLICA_QUEUE) calls at once; the engine's
queue is sized to that, so it never refuses what Ray sent. A cancelled call (client gone, queue timeout at the
ingress) cancels its job: a queued one never runs, a running one stops at its next step. Every wait is bounded
(queue timeout + request timeout + a margin). A heartbeat thread reports state, health and metrics to FluxStatus.
Limits: one device per replica (Ray sets CUDA_VISIBLE_DEVICES; the service uses "cuda"), or N with context
parallelism (rank r uses cuda:r of the replica's GPUs).
"""
from __future__ import annotations

import asyncio
import dataclasses
import logging
import os
import socket
import threading

import torch
from ray import serve

from kontext_server import engine as eng
from kontext_server.api.context import ServerSettings
from kontext_server.api.metrics import Metrics
from kontext_server.jobs import GenerateJob
from kontext_server.parallel import build_service
from kontext_server.service import GenerationResult, ServiceConfig, StrictError
from kontext_server.service.steps import preview_steps
from kontext_server.serving.ray_serve.errors import StrictRejected
from kontext_server.serving.ray_serve.logs import configure_logging

log = logging.getLogger("flux.ray")
WAIT_MARGIN_S = 60.0  # beyond queue + request timeout, before a call gives up on its own job
LOCAL_QUEUE_BOUND = 1024  # above any max_ongoing_requests: Ray's limit is the one that holds


def plan_key(prepared: dict, device_info, offloaded: dict | None = None) -> tuple:
    """What a plan made elsewhere depends on: the same key here means the ingress's plan fits this replica
    (`offloaded`: what a memory budget offloads on it)."""
    key = (tuple(sorted(prepared)), device_info.name, device_info.capability)
    return key + (tuple(sorted(offloaded)),) if offloaded else key


@serve.deployment(name="FluxModel")
class FluxModel:
    def __init__(self, config: ServiceConfig, server: ServerSettings, status, heartbeat_s: float = 1.0):
        configure_logging()
        ctx = serve.get_replica_context()
        self.replica_id = ctx.replica_id.unique_id
        self.actor_name = ctx.replica_id.to_full_id_str()  # Ray's actor name, in namespace "serve"
        self.host = socket.gethostname()
        self.service = build_service(config)  # with context_parallel N: rank 0 of N (its children, N GPUs)
        self.metrics = Metrics()
        self.server = server
        # job id -> (the call's loop, its event queue): registered before the job is queued, so "started" is sent once
        self._calls: dict[str, tuple[asyncio.AbstractEventLoop, asyncio.Queue]] = {}
        # Ray admits at most max_ongoing_requests calls at once: this queue is never the one that refuses.
        self.engine = eng.Engine(self._run_job, max_queue=LOCAL_QUEUE_BOUND, queue_timeout=server.queue_timeout,
                                 request_timeout=server.request_timeout, on_event=self._on_event)
        self._status = status
        self._heartbeat_s = heartbeat_s
        self._stop = threading.Event()
        self._heartbeat = threading.Thread(target=self._heartbeat_loop, name="flux-heartbeat", daemon=True)
        self._heartbeat.start()
        try:
            self.service.load()
        except Exception:
            log.exception("replica %s: the model failed to load", self.replica_id)
            self._push()  # say "failed" (with the error) before Serve replaces this replica
            self._stop.set()
            raise
        self.engine.start()
        self._push()
        log.info("replica %s ready on %s (%s)", self.replica_id, self.host, self.service.device_info.name)

    # ---- requests ------------------------------------------------------------------------------------------------
    async def run(self, payload, job_id: str, planned_with: tuple | None = None, relay_steps: bool = False):
        payload = self._fit_plan(payload, planned_with)
        loop, events = asyncio.get_running_loop(), asyncio.Queue()
        if relay_steps and isinstance(payload, GenerateJob):
            payload = dataclasses.replace(payload, on_step=_step_relay(loop, events, payload.partial_images))
        self._calls[job_id] = (loop, events)
        try:
            job = self.engine.submit(payload, job_id=job_id)
        except eng.EngineError as exc:
            self._calls.pop(job_id, None)
            yield ("error", exc)
            return
        fut = asyncio.wrap_future(job.future)
        deadline = loop.time() + self.server.queue_timeout + self.server.request_timeout + WAIT_MARGIN_S
        getter = None
        try:
            while not fut.done():
                getter = asyncio.ensure_future(events.get())
                await asyncio.wait({fut, getter}, timeout=max(0.0, deadline - loop.time()),
                                   return_when=asyncio.FIRST_COMPLETED)
                if getter.done():
                    yield getter.result()
                    continue
                getter.cancel()
                if not fut.done():
                    self.engine.cancel(job, eng.RequestTimeout)
                    yield ("error", eng.RequestTimeout(f"replica {self.replica_id} gave up after its time budget"))
                    return
            while not events.empty():  # events the worker handed over before the job's result was set
                yield events.get_nowait()
            exc = fut.exception()
            yield ("error", exc) if exc is not None else ("result", fut.result())
        finally:
            if getter is not None:
                getter.cancel()
            self._calls.pop(job_id, None)
            if not job.future.done():  # the ingress cancelled the call (client gone, queue timeout): the job too
                self.engine.cancel(job, eng.Cancelled)

    def _fit_plan(self, payload, planned_with: tuple | None):
        """The ingress planned with some replica's prepared set; on a replica whose set differs, plan here."""
        if isinstance(payload, GenerateJob) and payload.plan is not None and \
                planned_with != plan_key(self.service.prepared, self.service.device_info, self.service.offloaded()):
            return dataclasses.replace(payload, plan=None)
        return payload

    def _run_job(self, job: eng.Job):
        try:
            result = job.payload.run(self.service, job.should_stop)
        except StrictError as exc:
            raise StrictRejected(str(exc)) from None
        if isinstance(result, GenerationResult):
            result.latents = None  # not sent over HTTP: do not ship tensors back
            result.replica = self.replica_id
            self.metrics.observe_result(result.timings_ms, result.steps_computed, result.steps_skipped)
        elif isinstance(result, dict):  # GET /benchmark's table
            result["replica"] = self.replica_id
        return result

    def _on_event(self, event: str, job: eng.Job, info: dict) -> None:
        if event == "started":
            self.metrics.queue_wait.observe(info["queue_wait_s"])
            call = self._calls.get(job.id)
            if call is not None:
                loop, events = call
                loop.call_soon_threadsafe(events.put_nowait, ("started", self.replica_id))

    # ---- health ----------------------------------------------------------------------------------------------------
    def check_health(self) -> None:
        """Serve calls this every health_check_period_s; raising takes the replica out and starts a new one."""
        if self.service.state != "ready":
            raise RuntimeError(f"model is {self.service.state}: {self.service.error or ''}")
        if not self.engine.worker_alive:
            raise RuntimeError("the engine's worker thread is not running")

    def report(self) -> dict:
        """What FluxStatus holds for this replica (and the ingress shows in /health and /metrics)."""
        svc, engine = self.service, self.engine
        ready = svc.state == "ready"
        return {"id": self.replica_id, "actor": self.actor_name, "host": self.host, "pid": os.getpid(),
                "state": svc.state, "error": svc.error, "accepting": engine.accepting,
                "queue_depth": engine.queue_depth, "in_flight": engine.in_flight,
                "typical_job_s": engine.typical_job_seconds(), "health": svc.health(),
                "torch_threads": torch.get_num_threads(),  # CPU results depend on it (Ray: OMP_NUM_THREADS=num_cpus)
                "prepared": dict(svc.prepared), "device_info": svc.device_info,
                "new_shapes": svc.config.new_shapes, "warm_keys": svc.runner.warm_keys if svc.runner else frozenset(),
                "plan_key": plan_key(svc.prepared, svc.device_info, svc.offloaded()), "offloaded": svc.offloaded(),
                "metrics": self.metrics.render(engine, ready=ready).decode()}

    def _push(self) -> None:
        try:
            self._status.report.remote(self.report()).result(timeout_s=10)
        except Exception as exc:  # noqa: BLE001 - a missed heartbeat is retried on the next one
            log.warning("replica %s: could not report to FluxStatus: %s", self.replica_id, exc)

    def _heartbeat_loop(self) -> None:
        while not self._stop.wait(self._heartbeat_s):
            self._push()

    def __del__(self):
        """Serve's graceful shutdown: it waited for running calls (graceful_shutdown_timeout_s); answer what is left
        and leave FluxStatus at once rather than when the heartbeat goes stale."""
        try:
            self._stop.set()
            self.engine.drain(0.0)
            self._status.forget.remote(self.replica_id).result(timeout_s=5)
        except Exception:  # noqa: BLE001 - half-built (the constructor raised), or FluxStatus gone: stale anyway
            pass


def _step_relay(loop: asyncio.AbstractEventLoop, events: asyncio.Queue, partial_images: int):
    """The replica's step hook for a relayed job: each step's (step, steps, preview or None) into the call's stream,
    the preview decoded here (on the worker, as locally) only at the steps the ingress's hook shows."""
    def on_step(event) -> None:
        image = event.preview() if event.step in preview_steps(event.steps, partial_images) else None
        try:
            loop.call_soon_threadsafe(events.put_nowait, ("step", (event.step, event.steps, image)))
        except RuntimeError:  # the call's loop has closed: nobody is listening
            pass
    return on_step
