"""RemoteEngine: the local Engine's interface, running each job on a Ray Serve model replica.

What: `submit(payload)` returns an `engine.Job` at once (its `future` a concurrent Future, as the routes' dispatch
expects) and drives one streaming call to FluxModel.run on the ingress's event loop: "started" names the replica and
sets `job.started_at`, then the result or the replica's EngineError ends the job. Ray's router holds
what no replica has room for (the shared queue, `max_queued_requests`); one request more raises BackPressureError,
answered 429 with Retry-After as the local queue's QueueFull.
A replica that dies: if its request had not started (in Ray's queue or the replica's), it is sent once more, to
another replica (Ray's router drops a replica that died from its rotation), and the response's warnings say so; if it
had started, the answer is 503 `replica_lost` with Retry-After (a generation is not run twice behind the client's
back). Either way the board forgets the replica at once, so /health's count drops now (one that dies before
starting anything is not named to the ingress: it leaves /health when its heartbeat goes stale, seconds later).
Contract: exactly one answer per job: only `_finish` completes the future, and only once. Every wait is bounded:
the routes' dispatch cancels a job that waits longer than the queue timeout, the replica stops a generation at the
request timeout, and this engine ends any call still open after both plus a margin (504). cancel() and drain() may
be called from any thread; the calls run on the event loop that submitted them.
Limits: queue_depth / in_flight count this ingress's jobs (with several ingress replicas, each has its own).
"""
from __future__ import annotations

import asyncio
import collections
import dataclasses
import logging
import math
import statistics
import threading
import time
from typing import Any, Callable

from ray.exceptions import RayActorError, RayTaskError
from ray.serve.exceptions import BackPressureError, RayServeException

from kontext_server import engine as eng
from kontext_server.jobs import GenerateJob
from kontext_server.service.steps import StepEvent
from kontext_server.service import GenerationResult
from kontext_server.serving.ray_serve.errors import ReplicaLost

log = logging.getLogger("flux.ray")
DEADLINE_MARGIN_S = 90.0  # beyond queue + request timeout, after the replica's own margin (replica.WAIT_MARGIN_S)


class RemoteEngine:
    def __init__(self, handle, *, max_queue: int, queue_timeout: float, request_timeout: float,
                 ready_replicas: Callable[[], int] = lambda: 1, plan_key: Callable[[], Any] = lambda: None,
                 on_replica_lost: Callable[[str | None], None] = lambda rid: None):
        self._handle = handle.options(stream=True)
        self.max_queue = max_queue  # enforced by Ray (the model deployment's max_queued_requests); for reports
        self.queue_timeout = queue_timeout
        self.request_timeout = request_timeout
        self._ready_replicas = ready_replicas
        self._plan_key = plan_key
        self._on_replica_lost = on_replica_lost
        self._jobs: dict[int, tuple[eng.Job, asyncio.Task, asyncio.AbstractEventLoop]] = {}
        self._lock = threading.Lock()
        self._accepting = True
        self._recent_durations: collections.deque[float] = collections.deque(maxlen=20)
        self._loop: asyncio.AbstractEventLoop | None = None

    # ---- state -------------------------------------------------------------------------------------------------------
    def _open_jobs(self) -> list[eng.Job]:
        with self._lock:
            return [job for job, _, _ in self._jobs.values()]

    @property
    def queue_depth(self) -> int:
        """Jobs no replica has started yet (in Ray's queue or a replica's)."""
        return sum(job.started_at is None for job in self._open_jobs())

    @property
    def in_flight(self) -> int:
        """Jobs a replica is running."""
        return sum(job.started_at is not None for job in self._open_jobs())

    @property
    def accepting(self) -> bool:
        return self._accepting

    def typical_job_seconds(self) -> float | None:
        return statistics.median(self._recent_durations) if self._recent_durations else None

    def retry_after_seconds(self) -> int:
        """The local engine's estimate spread over the ready replicas: the typical job time times the queue ahead
        of one replica, plus one (at least 1 s; 1 before any job has succeeded)."""
        typical = self.typical_job_seconds()
        if typical is None:
            return 1
        per_replica = self.queue_depth / max(1, self._ready_replicas())
        return max(1, int(round(typical * (per_replica + 1))))

    # ---- lifecycle -------------------------------------------------------------------------------------------------
    def start(self) -> None:
        """Nothing to start (the replicas run the jobs); notes the app's event loop, from which calls made by other
        threads (the job manager's) are started."""
        try:
            self._loop = asyncio.get_running_loop()
        except RuntimeError:
            pass

    def stop_accepting(self) -> None:
        self._accepting = False

    def drain(self, grace: float) -> bool:
        """Stop accepting; give open jobs `grace` seconds; answer what is left 503 shutting_down."""
        self.stop_accepting()
        deadline = time.monotonic() + grace
        while self._open_jobs() and time.monotonic() < deadline:
            time.sleep(0.05)
        left = self._open_jobs()
        for job in left:
            self.cancel(job, eng.ShuttingDown)
        return not left

    # ---- submission (event loop side; never blocks) ------------------------------------------------------------------
    def submit(self, payload: Any, job_id: str | None = None, *, queue_timeout: float | None = None,
               force: bool = False) -> eng.Job:
        """As engine.Engine.submit. `queue_timeout`: this job's own (math.inf: a durable job waits as long as it
        takes); `force` is accepted for the interface: the shared queue is Ray's, which may still answer 429."""
        if not self._accepting:
            raise eng.ShuttingDown("server is shutting down and accepts no new requests")
        job = eng.Job(payload=payload, queue_timeout=queue_timeout)
        if job_id:
            job.id = job_id
        try:
            loop = asyncio.get_running_loop()
        except RuntimeError:  # another thread (the job manager's): the call starts on the app's loop
            loop = self._loop
            if loop is None:
                raise eng.ShuttingDown("the engine has not started: no event loop to call the replicas from")
            loop.call_soon_threadsafe(self._launch, job, loop)
            return job
        self._launch(job, loop)
        return job

    def _launch(self, job: eng.Job, loop: asyncio.AbstractEventLoop) -> None:
        if job.future.done():  # cancelled before its call could start
            return
        task = loop.create_task(self._drive(job))
        with self._lock:
            self._jobs[id(job)] = (job, task, loop)

    def cancel(self, job: eng.Job, reason: type[eng.EngineError] = eng.Cancelled) -> None:
        """Answer the job with `reason` now and cancel its call (the replica cancels the generation: a queued one
        never runs, a running one stops at its next step). A queue timeout no longer applies once it started."""
        if job.future.done() or (reason is eng.QueueTimeout and job.started_at is not None):
            return
        msgs = {eng.Cancelled: "request cancelled: the client disconnected",
                eng.QueueTimeout: f"request waited longer than the queue timeout ({self.queue_timeout:.0f} s)",
                eng.ShuttingDown: "server is shutting down"}
        self._finish(job, error=reason(msgs.get(reason, "request cancelled")))
        with self._lock:
            entry = self._jobs.get(id(job))
        if entry is not None:
            _, task, loop = entry
            try:
                loop.call_soon_threadsafe(task.cancel)
            except RuntimeError:  # the loop has closed: the call went with it, and the job is answered
                pass

    # ---- the call ----------------------------------------------------------------------------------------------------
    def _finish(self, job: eng.Job, result: Any = None, error: BaseException | None = None) -> None:
        with self._lock:  # the one place a job's future completes: exactly one answer
            job.settle(result, error)

    async def _drive(self, job: eng.Job) -> None:
        queue_timeout = self.queue_timeout if job.queue_timeout is None else job.queue_timeout
        budget = queue_timeout + self.request_timeout + DEADLINE_MARGIN_S
        payload, relay_steps, on_started = _wire_payload(job.payload)
        try:
            async with asyncio.timeout(budget if math.isfinite(budget) else None):
                lost: str | None = None
                for attempt in (1, 2):
                    outcome = await self._attempt(job, payload, attempt, lost, relay_steps, on_started)
                    if outcome is None:
                        return
                    lost = outcome  # its replica died before starting it: send it once more
        except TimeoutError:
            self._finish(job, error=eng.RequestTimeout(f"no answer from the model replicas within {budget:.0f} s"))
        except asyncio.CancelledError:
            pass  # cancel() answered the job already
        except Exception as exc:  # noqa: BLE001 - never leave a job unanswered
            log.exception("job %s: the call to the model replicas failed", job.id)
            self._finish(job, error=eng.GenerationFailed(f"{type(exc).__name__}: {exc}"))
        finally:
            self._finish(job, error=eng.GenerationFailed("the model replica ended the call without an answer"))
            with self._lock:
                self._jobs.pop(id(job), None)

    async def _attempt(self, job: eng.Job, payload, attempt: int, lost_before: str | None,
                       relay_steps: bool = False, on_started: Callable[[], None] | None = None) -> str | None:
        """One call. None: the job is answered; "lost": its replica died before starting it (retry once)."""
        extra = (True,) if relay_steps else ()  # the replica's relay_steps, sent only when set
        gen = self._handle.run.remote(payload, job.id, self._plan_key(), *extra)
        replica: str | None = None
        try:
            async for kind, value in gen:
                if kind == "step":  # (step, steps, preview image or None): the hook sees a local StepEvent
                    step, steps, image = value
                    job.payload.on_step(StepEvent(step, steps, preview=lambda image=image: image))
                elif kind == "started":
                    replica = value
                    job.started_at = time.monotonic()
                    if on_started is not None:
                        try:
                            on_started()  # e.g. a durable job marked running in its store
                        except eng.EngineError as exc:  # it was cancelled meanwhile: stop the replica's work
                            self._finish(job, error=exc)
                            gen.cancel()
                            return None
                elif kind == "result":
                    if job.started_at is not None:
                        self._recent_durations.append(time.monotonic() - job.started_at)
                    if lost_before is not None and isinstance(value, GenerationResult):
                        value.warnings = list(value.warnings) + [
                            f"the replica first given this request died before starting it; it ran on {replica}"]
                    self._finish(job, result=value)
                    return None
                elif kind == "error":
                    self._finish(job, error=value)
                    return None
            return None  # the stream ended without an answer: _drive's finally answers 500
        except BackPressureError:
            self._finish(job, error=eng.QueueFull(
                f"queue is full ({self.max_queue} waiting for a model replica, every replica busy)"))
            return None
        except RayActorError as exc:  # ActorDiedError, ActorUnavailableError: the replica is gone
            self._on_replica_lost(replica)
            if job.started_at is None and attempt == 1:
                log.warning("job %s: its replica died before starting it; sending it once more", job.id)
                return "lost"
            log.warning("job %s: replica %s died while running it: %s", job.id, replica, exc)
            self._finish(job, error=ReplicaLost(
                f"the model replica running this request ({replica}) died; it was not run to the end"))
            return None
        except RayTaskError as exc:  # an exception in the replica's own code, outside the job
            self._finish(job, error=eng.GenerationFailed(f"replica {replica}: {exc.cause!r}"))
            return None
        except RayServeException as exc:  # e.g. the deployment is being deleted
            self._finish(job, error=eng.ShuttingDown(f"no model replica can take the request: {exc}"))
            return None
        except asyncio.CancelledError:
            gen.cancel()
            raise


def _wire_payload(payload):
    """What crosses to the replica: the request without its base64 image (the decoded image travels beside it), and
    without its step hook (a closure over this process's event loop): `relay_steps` tells the replica to stream the
    step events back, which `_attempt` replays into the hook here. Returns (payload, relay_steps, on_started)."""
    on_started = None
    if hasattr(payload, "remote"):  # a durable job (jobstore.StoredJob): its generation, its store's bookkeeping here
        payload, on_started = payload.remote()
    if not isinstance(payload, GenerateJob):
        return payload, False, on_started
    changes = {"on_step": None}
    if payload.request.image is not None:
        changes["request"] = payload.request.model_copy(update={"image": None})
    return dataclasses.replace(payload, **changes), payload.on_step is not None, on_started
