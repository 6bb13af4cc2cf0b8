"""The job manager: stored jobs onto the engine, their progress, their one answer, restart recovery and expiry.

What:
- `submit(spec)`: writes the job (and its input image's bytes) to the store, then queues it on the engine. A full
  queue (QueueFull) or store (JobsFull) removes it again and raises: the client gets a 429 and no id.
- On the worker, `StoredJob.run` first moves the job to `running` in the store (committed), then generates with a
  step hook that records progress (steps done / steps). A job that is no longer `pending` then is not run.
- When the engine's future completes, a finisher thread encodes the image, saves it in the output store and writes
  the job's final state (`ready` or `error`) with its webhook delivery, in one transaction; the device worker never
  waits for that work.
- `cancel(id)`: a pending job is finished as cancelled and removed from the queue; a running one is stopped at its
  next step and then finished as cancelled.
- `recover()` (once the model is loaded): a job found `running` was interrupted by the restart: it is finished as an
  error ("interrupted by restart"), never run again. Pending jobs are queued again (`on_restart="run"`) or finished
  as errors (`"error"`).
- A sweeper thread deletes expired jobs and their output files every `sweep_interval` seconds.
Exactly once: a job runs only after the conditional pending -> running update succeeded, which happens at most once
per job; a restart never moves a job back to pending. Every accepted job reaches exactly one of ready / error (the
final update is conditional too), or is still pending / running in the store, and so is answered by get_result.
A graceful shutdown (SIGTERM) leaves queued jobs pending in the store: they run after the next start.
Contract: `describe(row) -> dict` (given by the HTTP layer) makes the JSON a webhook delivers; `on_event(name,
**info)` feeds metrics. Thread-safe.
"""
from __future__ import annotations

import json
import logging
import math
import threading
import time
from concurrent.futures import Future, ThreadPoolExecutor
from dataclasses import dataclass, field
from typing import Any, Callable

from kontext_server import engine as eng
from kontext_server.jobs import GenerateJob
from kontext_server.jobstore.store import JobRow, JobStore
from kontext_server.request import InferenceRequest
from kontext_server.storage.base import StoreError
from utils import encode_image_bytes

log = logging.getLogger("flux.jobs")
CONTENT_TYPES = {"png": "image/png", "jpeg": "image/jpeg", "webp": "image/webp"}
INTERRUPTED = "interrupted by restart"


class JobsFull(eng.EngineError):
    status, code = 429, "too_many_jobs"


@dataclass
class JobSpec:
    """An accepted job, as the route hands it over: the request the service runs, its decoded reference image (or
    None) and that image's original bytes (kept in the store until the job runs), its plan, the route's own fields
    (`meta`: safety_tolerance, base_url ...) and the webhook."""
    id: str
    request: InferenceRequest
    image: Any = None
    input_bytes: bytes | None = None
    plan: dict | None = None
    meta: dict = field(default_factory=dict)
    webhook_url: str | None = None
    webhook_secret: str | None = None


@dataclass
class ManagerSettings:
    result_ttl: float = 3600.0
    on_restart: str = "run"  # run | error
    max_jobs: int = 10000
    sweep_interval: float = 60.0


class StoredJob:
    """The engine payload of a stored job (runs on the worker thread)."""

    def __init__(self, manager: "JobManager", spec: JobSpec):
        self.manager, self.spec = manager, spec

    def run(self, service, should_stop):
        self.started()
        spec = self.spec
        return service.generate(spec.request, spec.image, should_stop=should_stop, plan=spec.plan,
                                on_step=self.on_step)

    def started(self) -> None:
        """Mark the job running in the store, before any of its work counts; Cancelled when it was cancelled first."""
        m, spec = self.manager, self.spec
        if not m.store.mark_running(spec.id):
            raise eng.Cancelled("the job was cancelled before it started")
        m.progress[spec.id] = 0.0
        m.on_event("started", job_id=spec.id)
        log.info("job %s started", spec.id)

    def on_step(self, event) -> None:
        self.manager.progress[self.spec.id] = event.step / max(1, event.steps)

    def remote(self) -> tuple[GenerateJob, Callable[[], None]]:
        """For an engine whose generations run in another process (serving/ray_serve's RemoteEngine): the generation
        as a GenerateJob whose step hook records progress here, and `started`, which that engine calls when the
        remote worker begins it (the store's record of it). A job cancelled meanwhile raises there, and the engine
        stops the remote generation: its result is never recorded."""
        spec = self.spec
        return GenerateJob(spec.request, spec.image, spec.plan, on_step=self.on_step), self.started


class JobManager:
    def __init__(self, store: JobStore, engine: eng.Engine, service, output_store, settings: ManagerSettings,
                 describe: Callable[[JobRow], dict], decode_input: Callable[[bytes], Any],
                 on_event: Callable[..., None] | None = None, webhooks=None,
                 encode: Callable[[Any, str, str], bytes] | None = None):
        self.store, self.engine, self.service, self.output_store = store, engine, service, output_store
        self.settings, self.describe, self.decode_input = settings, describe, decode_input
        self.on_event = on_event or (lambda name, **info: None)
        self.webhooks = webhooks
        # (image, format, prompt) -> file bytes: the app passes its provenance encoder (kontext_server/provenance.py)
        self.encode = encode or (lambda image, fmt, prompt: encode_image_bytes(image, fmt))
        self.progress: dict[str, float] = {}
        self._jobs: dict[str, eng.Job] = {}
        self._lock = threading.Lock()
        self._finisher = ThreadPoolExecutor(2, thread_name_prefix="job-finisher")
        self._stop = threading.Event()
        self._sweeper: threading.Thread | None = None

    # ---- lifecycle ----------------------------------------------------------------------------------------------
    def start(self) -> None:
        if self.webhooks is not None:
            self.webhooks.start()
        self._sweeper = threading.Thread(target=self._sweep_loop, name="job-sweeper", daemon=True)
        self._sweeper.start()

    def close(self) -> None:
        """After the engine drained: wait for answers being written, stop the threads, close the store."""
        self._stop.set()
        self._finisher.shutdown(wait=True)
        if self.webhooks is not None:
            self.webhooks.stop()
        if self._sweeper is not None:
            self._sweeper.join(5)
        self.store.close()

    # ---- submit / cancel ----------------------------------------------------------------------------------------
    def submit(self, spec: JobSpec) -> None:
        """Store and queue (blocking: call from a worker thread). Raises JobsFull, QueueFull or ShuttingDown."""
        if self.store.count_unexpired() >= self.settings.max_jobs:
            raise JobsFull(f"the job store holds {self.settings.max_jobs} jobs (--max-jobs); results expire after "
                           f"{self.settings.result_ttl:g} s")
        self.store.insert(spec.id, spec.request.model_dump(mode="json"), spec.meta, spec.input_bytes,
                          spec.webhook_url, spec.webhook_secret)
        try:
            self._queue(spec, force=False)
        except eng.EngineError:
            self.store.remove(spec.id)
            raise
        self.on_event("accepted", job_id=spec.id)

    def _queue(self, spec: JobSpec, force: bool) -> None:
        job = self.engine.submit(StoredJob(self, spec), job_id=spec.id, queue_timeout=math.inf, force=force)
        with self._lock:
            self._jobs[spec.id] = job
        job.future.add_done_callback(lambda fut, j=job: self._finisher.submit(self._finish, j, fut))

    def cancel(self, job_id: str) -> str | None:
        """"cancelled" (a pending job, now finished), "cancelling" (a running one: it stops at its next step),
        "finished" (already ready or error), or None (no such job)."""
        row = self.store.get(job_id)
        if row is None:
            return None
        with self._lock:
            job = self._jobs.get(job_id)
        if row.status == "pending":
            if self._finish_error(job_id, "cancelled", f"cancelled by DELETE /v1/jobs/{job_id} before it started",
                                  from_states=("pending",)):
                if job is not None:
                    self.engine.cancel(job)
                return "cancelled"
            row = self.store.get(job_id)  # it started meanwhile
        if row is not None and row.status == "running" and job is not None:
            self.engine.cancel(job, eng.Cancelled)  # stops at its next step, here or on a remote replica
            return "cancelling"
        return "finished"

    def lookup(self, job_id: str) -> tuple[JobRow | None, float | None]:
        """A job's row and its progress (None when not running here). The progress is read first: a job that finishes
        in between is then read as finished, whereas the other order could pair its last `running` row with the
        progress its finish has just dropped, and a poll would see the progress fall back to 0."""
        progress = self.progress.get(job_id)
        return self.store.get(job_id), progress

    # ---- answers ------------------------------------------------------------------------------------------------
    def _finish(self, job: eng.Job, fut: Future) -> None:
        try:
            self._finish_one(job, fut)
        except Exception:  # noqa: BLE001 - the job stays as the store has it; get_result still answers
            log.exception("job %s: could not record its answer", job.id)
        finally:
            with self._lock:
                self._jobs.pop(job.id, None)
            self.progress.pop(job.id, None)

    def _finish_one(self, job: eng.Job, fut: Future) -> None:
        exc = fut.exception()
        if exc is None:
            return self._finish_ready(job.id, fut.result())
        if isinstance(exc, eng.ShuttingDown) and job.started_at is None:
            log.info("job %s stays pending: the server is shutting down; it runs after the next start", job.id)
            return
        if isinstance(exc, eng.Cancelled):
            code, msg = "cancelled", f"cancelled by DELETE /v1/jobs/{job.id} while running"
            if job.started_at is None:
                msg = f"cancelled by DELETE /v1/jobs/{job.id} before it started"
        elif isinstance(exc, eng.ShuttingDown):
            code, msg = "interrupted", "interrupted by shutdown (the server stopped while the job ran)"
        else:
            code = getattr(exc, "code", "generation_failed")
            msg = str(exc) if isinstance(exc, eng.EngineError) else f"{type(exc).__name__}: {exc}"
        self._finish_error(job.id, code, msg)

    def _finish_ready(self, job_id: str, result) -> None:
        row = self.store.get(job_id)
        if row is None:
            return
        fmt = row.request.get("output_format", "png")
        now = time.time()
        expires_at = now + self.settings.result_ttl
        data = self.encode(result.images[0], fmt, row.request["prompt"])
        try:
            key = self.output_store.save(data, CONTENT_TYPES[fmt], expires_at)
        except StoreError as exc:
            log.warning("job %s: %s", job_id, exc)
            self._finish_error(job_id, "output_store_failed", str(exc))
            return
        started = row.started_at or row.created_at
        res = {"prompt": row.request["prompt"], "seed": result.seed, "start_time": started, "end_time": now,
               "duration": round(now - started, 4), "width": result.width, "height": result.height,
               "output_format": fmt, "steps": result.steps, "steps_computed": result.steps_computed,
               "steps_skipped": result.steps_skipped, "timings_ms": dict(result.timings_ms),
               "optimizations": {k: {"requested": d.requested, "applied": d.applied, "detail": d.detail}
                                 for k, d in result.optimizations.items()},
               "warnings": list(result.warnings), "loras": list(getattr(result, "loras", [])),
               "references": getattr(result, "references", 0), "size_reason": getattr(result, "size_reason", ""),
               "context_parallel": getattr(result, "parallel", None),
               "memory_tier": getattr(result, "memory_tier", None)}
        changed = self.store.finish(job_id, "ready", expires_at=expires_at, result=res, sample_key=key,
                                    from_states=("running",), delivery_body=self._body, now=now)
        if not changed:  # cancelled at the last moment: its answer is the cancellation
            self.output_store.delete(key)
            return
        self._announce(job_id, "ready", now - row.created_at)

    def _finish_error(self, job_id: str, code: str, message: str,
                      from_states: tuple[str, ...] = ("pending", "running")) -> bool:
        now = time.time()
        changed = self.store.finish(job_id, "error", expires_at=now + self.settings.result_ttl, error_code=code,
                                    error_message=message, from_states=from_states, delivery_body=self._body, now=now)
        if changed:
            row = self.store.get(job_id)
            self._announce(job_id, "error", now - row.created_at if row else 0.0, code=code)
        return changed

    def _body(self, row: JobRow) -> bytes:
        return json.dumps(self.describe(row), separators=(",", ":")).encode()

    def _announce(self, job_id: str, status: str, age: float, code: str | None = None) -> None:
        log.info("job %s finished status=%s%s age_s=%.3f", job_id, status, f" error={code}" if code else "", age)
        self.on_event("finished", job_id=job_id, status=status, age_s=age)
        if self.webhooks is not None:
            self.webhooks.wake()

    # ---- restart ------------------------------------------------------------------------------------------------
    def recover(self) -> dict[str, int]:
        """Jobs left by the previous process: running -> error; pending -> queued again or error (on_restart)."""
        counts = {"interrupted": 0, "requeued": 0, "failed": 0}
        for job_id in self.store.ids_in("running"):
            if self._finish_error(job_id, "interrupted", INTERRUPTED + " (it was running)", from_states=("running",)):
                counts["interrupted"] += 1
        for job_id in self.store.ids_in("pending"):
            if self.settings.on_restart == "error":
                if self._finish_error(job_id, "interrupted", INTERRUPTED + " (it was waiting; --on-restart error)",
                                      from_states=("pending",)):
                    counts["interrupted"] += 1
                continue
            try:
                self._requeue(job_id)
                counts["requeued"] += 1
            except Exception as exc:  # noqa: BLE001 - one job's problem must not stop the others
                self._finish_error(job_id, getattr(exc, "code", "restart_failed"),
                                   f"could not be queued again after a restart: {exc}", from_states=("pending",))
                counts["failed"] += 1
        if any(counts.values()):
            log.info("restart: %s", counts)
        return counts

    def _requeue(self, job_id: str) -> None:
        row = self.store.get(job_id)
        request = InferenceRequest.model_validate(row.request)
        raw = self.store.input_of(job_id)
        images = [self.decode_input(one) for one in unpack_inputs(raw)] if raw is not None else []
        image = None if not images else images[0] if len(images) == 1 else images
        plan = self.service.plan(request, image)
        self._queue(JobSpec(id=job_id, request=request, image=image, plan=plan, meta=row.meta), force=True)

    # ---- expiry -------------------------------------------------------------------------------------------------
    def sweep(self, now: float | None = None) -> int:
        """Delete expired jobs and their files (and any expired file no job points at). Returns jobs deleted."""
        now = time.time() if now is None else now
        n = 0
        for job_id, key in self.store.expired(now):
            if key:
                try:
                    self.output_store.delete(key)
                except StoreError as exc:
                    log.warning("sweep: %s", exc)
                    continue  # kept: the next sweep tries again
            self.store.delete(job_id)
            n += 1
        try:
            self.output_store.sweep(now)
        except StoreError as exc:
            log.warning("sweep: %s", exc)
        return n

    def _sweep_loop(self) -> None:
        while not self._stop.wait(self.settings.sweep_interval):
            try:
                self.sweep()
            except Exception:  # noqa: BLE001 - try again next time
                log.exception("sweep failed")


# Several reference images are stored as one blob: this prefix, then each file's length (8 bytes) and bytes. One
# reference is stored as its file itself (what every stored job had before multi-reference).
_PACKED = b"KONTEXT-REFS\x00"


def pack_inputs(files: list[bytes]) -> bytes:
    """The reference files of one job as the one blob the store keeps (unpack_inputs reads it back)."""
    if len(files) == 1:
        return files[0]
    return _PACKED + b"".join(len(f).to_bytes(8, "big") + f for f in files)


def unpack_inputs(blob: bytes) -> list[bytes]:
    if not blob.startswith(_PACKED):
        return [blob]
    out, i = [], len(_PACKED)
    while i < len(blob):
        n = int.from_bytes(blob[i:i + 8], "big")
        out.append(blob[i + 8:i + 8 + n])
        i += 8 + n
    return out
