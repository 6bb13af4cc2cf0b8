"""The GPU engine: one worker thread owns the device; requests wait in a bounded queue.

The event loop only submits jobs and awaits their futures; no model work ever runs on it. Everything that
can go wrong with one job (bad luck, OOM, timeout, client gone) ends that job with a typed error and leaves
the worker serving the next one.
"""
from __future__ import annotations

import collections
import gc
import logging
import statistics
import threading
import time
import uuid
from concurrent.futures import Future
from dataclasses import dataclass, field
from typing import Any, Callable

log = logging.getLogger("flux.engine")


class EngineError(Exception):
    status = 500
    code = "internal_error"


class QueueFull(EngineError):
    status, code = 429, "queue_full"


class QueueTimeout(EngineError):
    status, code = 503, "queue_timeout"


class RequestTimeout(EngineError):
    status, code = 504, "request_timeout"


class Cancelled(EngineError):
    status, code = 499, "cancelled"  # the client went away; nobody reads this answer


class OutOfMemory(EngineError):
    status, code = 503, "out_of_memory"


class ShuttingDown(EngineError):
    status, code = 503, "shutting_down"


class GenerationFailed(EngineError):
    status, code = 500, "generation_failed"


class InvalidInput(EngineError):
    """The job found its input unusable (e.g. a LoRA file that proved bad when read): 422 naming the field."""
    status, code = 422, "validation_error"

    def __init__(self, message: str, field: str | None = None, kind: str = "value_error"):
        super().__init__(message)
        self.field, self.kind = field, kind


def is_oom(exc: BaseException) -> bool:
    try:
        import torch

        if isinstance(exc, torch.OutOfMemoryError):
            return True
    except Exception:  # pragma: no cover - torch always importable here
        pass
    return isinstance(exc, MemoryError) or "out of memory" in str(exc).lower() and isinstance(exc, RuntimeError)


@dataclass
class Job:
    payload: Any  # what the run function needs (validated request + decoded image)
    id: str = field(default_factory=lambda: uuid.uuid4().hex[:16])
    future: Future = field(default_factory=Future)
    enqueued_at: float = field(default_factory=time.monotonic)
    started_at: float | None = None
    cancel_event: threading.Event = field(default_factory=threading.Event)
    deadline: float | None = None  # monotonic time after which a running job is interrupted
    stop_reason: type[EngineError] | None = None
    queue_timeout: float | None = None  # overrides the engine's (durable async jobs wait as long as it takes)

    def settle(self, result: Any = None, error: BaseException | None = None) -> bool:
        """Complete the future with the result or the error, unless it is done already (a job gets exactly one
        answer); True when this call completed it."""
        if self.future.done():
            return False
        if error is not None:
            self.future.set_exception(error)
        else:
            self.future.set_result(result)
        return True

    def should_stop(self) -> EngineError | None:
        """Checked by the generation between denoising steps."""
        if self.cancel_event.is_set():
            return (self.stop_reason or Cancelled)("request cancelled: the client disconnected")
        if self.deadline is not None and time.monotonic() > self.deadline:
            return RequestTimeout("generation ran past the request timeout and was interrupted")
        return None


class Engine:
    def __init__(self, run: Callable[[Job], Any], *, max_queue: int = 16, queue_timeout: float = 60.0,
                 request_timeout: float = 600.0, on_event: Callable[[str, Job, dict], None] | None = None):
        self._run = run
        self.max_queue = max_queue
        self.queue_timeout = queue_timeout
        self.request_timeout = request_timeout
        self._on_event = on_event or (lambda *a: None)
        self._queue: collections.deque[Job] = collections.deque()
        self._cv = threading.Condition()
        self._running: Job | None = None
        self._accepting = True
        self._stop = False
        self._thread: threading.Thread | None = None
        self._recent_durations: collections.deque[float] = collections.deque(maxlen=20)

    # ---- state -------------------------------------------------------------------------------------------
    @property
    def queue_depth(self) -> int:
        return len(self._queue)

    @property
    def in_flight(self) -> int:
        return 1 if self._running is not None else 0

    @property
    def accepting(self) -> bool:
        return self._accepting

    @property
    def worker_alive(self) -> bool:
        """The worker thread is running (False before start() and after a drain ended it)."""
        return self._thread is not None and self._thread.is_alive()

    def typical_job_seconds(self) -> float | None:
        """The median run time of the last 20 jobs that succeeded (None before any): a median, so that a few
        cold-start (compile) jobs do not inflate it."""
        return statistics.median(self._recent_durations) if self._recent_durations else None

    def retry_after_seconds(self) -> int:
        """A client's fair wait: the queue ahead times the recent typical job time (at least 1 s)."""
        typical = self.typical_job_seconds()
        if typical is None:
            return 1  # nothing measured yet: a short wait, not a guess multiplied by the queue
        return max(1, int(round(typical * (self.queue_depth + 1))))

    # ---- lifecycle ---------------------------------------------------------------------------------------
    def start(self) -> None:
        if self._thread is None:
            self._thread = threading.Thread(target=self._loop, name="gpu-worker", daemon=True)
            self._thread.start()

    def stop_accepting(self) -> None:
        with self._cv:
            self._accepting = False

    def drain(self, grace: float) -> bool:
        """Stop accepting, let queued and running work finish within `grace` seconds. True if all finished."""
        self.stop_accepting()
        deadline = time.monotonic() + grace
        with self._cv:
            while (self._queue or self._running) and time.monotonic() < deadline:
                self._cv.wait(timeout=min(0.1, max(0.0, deadline - time.monotonic())))
            finished = not self._queue and not self._running
            for job in list(self._queue):  # what is left gets a clear answer, not a dropped connection
                self._queue.remove(job)
                self._finish(job, error=ShuttingDown("server is shutting down"))
            if self._running is not None:
                self._running.stop_reason = ShuttingDown
                self._running.cancel_event.set()
            self._stop = True
            self._cv.notify_all()
        return finished

    # ---- submission (event loop side; never blocks) ------------------------------------------------------
    def submit(self, payload: Any, job_id: str | None = None, *, queue_timeout: float | None = None,
               force: bool = False) -> Job:
        """Queue a job (QueueFull past max_queue, ShuttingDown while draining). `force`: past max_queue too (jobs
        accepted before a restart, which must not be refused now); `queue_timeout`: this job's own."""
        job = Job(payload=payload, queue_timeout=queue_timeout)
        if job_id:
            job.id = job_id
        with self._cv:
            if not self._accepting:
                raise ShuttingDown("server is shutting down and accepts no new requests")
            if len(self._queue) >= self.max_queue and not force:
                raise QueueFull(f"queue is full ({self.max_queue} waiting)")
            self._queue.append(job)
            self._cv.notify_all()
        self._on_event("queued", job, {})
        return job

    def cancel(self, job: Job, reason: type[EngineError] = Cancelled) -> None:
        """Remove a queued job, or interrupt a running one at its next step."""
        with self._cv:
            if job in self._queue:
                self._queue.remove(job)
                msg = "request cancelled: the client disconnected" if reason is Cancelled else \
                    f"request waited longer than the queue timeout ({self.queue_timeout:.0f} s)"
                self._finish(job, error=reason(msg))
                return
            if reason is QueueTimeout or job.future.done():
                return  # it started (or ended) in time: a queue timeout no longer applies
        job.stop_reason = reason
        job.cancel_event.set()

    # ---- worker ------------------------------------------------------------------------------------------
    def _finish(self, job: Job, result: Any = None, error: BaseException | None = None) -> None:
        if job.settle(result, error):
            self._on_event("finished", job, {"error": error})

    def _loop(self) -> None:
        while True:
            with self._cv:
                while not self._queue and not self._stop:
                    self._cv.wait()
                if self._stop and not self._queue:
                    return
                job = self._queue.popleft()
                self._running = job
            try:
                self._execute(job)
            finally:
                with self._cv:
                    self._running = None
                    self._cv.notify_all()

    def _execute(self, job: Job) -> None:
        waited = time.monotonic() - job.enqueued_at
        if job.cancel_event.is_set():
            return self._finish(job, error=(job.stop_reason or Cancelled)("request cancelled before it started"))
        limit = self.queue_timeout if job.queue_timeout is None else job.queue_timeout
        if waited > limit:
            return self._finish(job, error=QueueTimeout(
                f"request waited {waited:.1f} s in the queue, longer than the {limit:.0f} s timeout"))
        job.started_at = time.monotonic()
        job.deadline = job.started_at + self.request_timeout
        self._on_event("started", job, {"queue_wait_s": waited})
        oom = None
        try:
            result = self._run(job)
        except EngineError as exc:
            self._finish(job, error=exc)
        except BaseException as exc:  # noqa: BLE001 - one job's failure must never end the worker
            if is_oom(exc):
                oom = str(exc)  # only the text: the exception's traceback holds the job's tensors
            else:
                log.exception("job %s failed", job.id)
                self._finish(job, error=GenerationFailed(f"{type(exc).__name__}: {exc}"))
        else:
            self._recent_durations.append(time.monotonic() - job.started_at)
            self._finish(job, result=result)
        if oom is not None:
            # Outside the except block: while the exception was being handled its traceback kept the failed
            # generation's frames (and their tensors) alive, so nothing could be freed there.
            free_device_memory()
            log.warning("job %s: out of memory: %s", job.id, oom)
            self._finish(job, error=OutOfMemory(
                "the GPU ran out of memory for this request; try fewer images or a smaller size"))


def free_device_memory() -> None:
    """After an OOM: drop the failed request's tensors and return cached blocks so smaller requests fit."""
    gc.collect()
    try:
        import torch

        if torch.cuda.is_available():
            torch.cuda.empty_cache()
    except Exception:  # pragma: no cover
        pass
