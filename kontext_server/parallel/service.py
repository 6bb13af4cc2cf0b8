"""FluxService on one rank of a context-parallel group: rank 0 serves, the other ranks follow its jobs.

What: `ParallelService` is a FluxService whose runner splits every transformer call over the group (adapter.py).
On rank 0, `generate`, `prepare` and `warm_up` post the job (the request with its seed fixed, the decoded reference
image, the plan; or the names, or the shape) to the followers, then run it here; `follow()` is a follower's loop: it
runs each posted job through the same methods, with `output_type="latent"` (only rank 0 decodes and answers).
Every job ends with the group's agreement (group.py): a failure on any rank fails the job on every rank; rank 0
raises `RankFailed` (503, with the failing rank's error) or its own error (a cancel: 499, a timeout: 504).
Why a subclass and not code in FluxService: the one-process service stays as it was; the routes, the engine, the
benchmark and the Ray replica see the same interface (`build_service` picks the class).
Contract: jobs run one at a time on rank 0's worker thread; every rank prepares and warms up the same shapes at
load, so their collectives line up.
"""
from __future__ import annotations

import dataclasses
import logging
import os
import secrets
from typing import Callable

from kontext_server import engine as eng
from kontext_server import settings
from kontext_server.parallel.adapter import SequenceSplit
from kontext_server.parallel.group import BROKEN, FAILED, OK, Group, PeerFailed, is_collective_error
from kontext_server.request import MAX_SEED, InferenceRequest
from kontext_server.service import FluxService, ServiceConfig

log = logging.getLogger("flux.parallel")


class RankFailed(eng.EngineError):
    """A rank of the context-parallel group failed this request (or the group cannot run it)."""
    status, code = 503, "context_parallel_failed"


def _fail_injection() -> tuple[int, str, bool] | None:
    """FLUX_CP_FAIL_AT=RANK:TEXT[:inside] (tests only): that rank fails a generation whose prompt contains TEXT, after
    its first step (between two transformer calls), or with `:inside` inside its first transformer call."""
    spec = settings.CP_FAIL_AT.get()
    if not spec:
        return None
    rank, _, rest = spec.partition(":")
    text, _, where = rest.partition(":")
    return int(rank), text, where == "inside"


class ParallelService(FluxService):
    def __init__(self, config: ServiceConfig, rank: int = 0, group: Group | None = None):
        # The ranks compile together: a follower waiting for rank 0's compile lock would leave rank 0's warm-up
        # waiting for it in a collective.
        super().__init__(dataclasses.replace(config, compile_lock_wait=0.0))
        self.rank = rank
        self.group = group
        if self.device.startswith("cuda"):
            from optimizations.base import DeviceInfo

            self.device = f"cuda:{rank}"  # one GPU per rank, among the visible ones
            self.device_info = DeviceInfo.detect(self.device, config.context_parallel)
        self._injection = _fail_injection()
        self._prompt = ""  # the running generation's prompt (for the test-only failure injection)

    # ---- state: a lost rank or a broken group makes the service not ready --------------------------------------
    @property
    def state(self) -> str:
        if self._state == "ready" and self.group is not None and self.group.broken:
            return "failed"
        return self._state

    @state.setter
    def state(self, value: str) -> None:
        self._state = value

    @property
    def error(self) -> str | None:
        if self._state == "ready" and self.group is not None and self.group.broken:
            return f"context-parallel group unusable: {self.group.broken}"
        return self._error

    @error.setter
    def error(self, value: str | None) -> None:
        self._error = value

    # ---- load ---------------------------------------------------------------------------------------------------
    def load(self) -> None:
        import torch

        n = self.config.context_parallel
        if self.device == "cpu":  # N processes share the cores
            torch.set_num_threads(max(1, (os.cpu_count() or 1) // n))
        try:
            if self.group is None:  # rank 0: start the followers and join them (launch.py)
                from kontext_server.parallel import launch

                self.group = launch.start_followers(self)
            if self.group.store is None:
                self.group.connect()
            self.parallel = SequenceSplit(self.group)
            if self._injection is not None and self._injection[2]:
                self.parallel.inject = self._injected_failure
        except Exception as exc:
            self.state, self.error = "failed", f"{type(exc).__name__}: {exc}"
            raise
        try:
            self._job(super().load)  # every rank loads, prepares and warms up the same: one agreed job
        except RankFailed as exc:
            self.state, self.error = "failed", str(exc)
            raise
        heads = self.components.variants["exact"].config.num_attention_heads
        if heads % self.group.split.ulysses:
            self.state = "failed"
            self.error = (f"Ulysses over {self.group.split.ulysses} ranks needs the {heads} attention heads to divide: "
                          f"use a ring degree (FLUX_CP_RING_DEGREE) that leaves a divisor of {heads}")
            raise ValueError(self.error)

    # ---- jobs ---------------------------------------------------------------------------------------------------
    def _post(self, job: tuple) -> None:
        """Rank 0, once loaded: hand the job to the followers (during load every rank runs its own, alike)."""
        if self.rank == 0 and self._state == "ready":
            if self.group.broken:
                raise RankFailed(f"the context-parallel group cannot run requests: {self.group.broken}")
            self.group.post(job)

    def _job(self, fn: Callable):
        """Run fn as one job of the group: every rank ends it with the same outcome (group.py)."""
        error: BaseException | None = None
        try:
            value = fn()
        except PeerFailed as exc:  # the failing rank's sync ended the job here: no final sync
            status = exc.status
        except BaseException as exc:  # noqa: BLE001 - any failure ends the job on every rank
            error = exc
            status = BROKEN if is_collective_error(exc) else FAILED
            self.group.report_error(f"{type(exc).__name__}: {exc}")
            try:
                status = max(status, self.group.sync(status))
            except Exception:  # noqa: BLE001 - the control group itself failed
                status = BROKEN
        else:
            try:
                status = self.group.sync(OK)
            except Exception as exc:  # noqa: BLE001
                error, status = exc, BROKEN
            if status == OK:
                return value
        if status == BROKEN and not self.group.broken:
            self.group.broken = (f"a collective failed or timed out (job {self.group.job_id}): "
                                 "restart the server to rebuild the group")
            log.error("context-parallel group broken: %s", error)
        raise self._failure(error)

    def _failure(self, error: BaseException | None) -> BaseException:
        """The exception a failed job raises on this rank."""
        if self.rank != 0:
            return error if error is not None else PeerFailed(FAILED)
        peers = self.group.errors()
        self.group.results()  # followers that finished before the failure: their summaries are not shown
        own = error is not None and not isinstance(error, PeerFailed)
        if own and not peers:
            return error  # rank 0's own failure (a cancel: 499, a timeout: 504, OOM, a model that cannot load)
        if own:
            peers[0] = f"{type(error).__name__}: {error}"
        detail = "; ".join(f"rank {r}: {m}" for r, m in sorted(peers.items())) or "no rank reported an error"
        broken = f" (the group is broken: {self.group.broken})" if self.group.broken else ""
        return RankFailed(f"context-parallel generation failed: {detail}{broken}")

    def generate(self, req: InferenceRequest, image=None, should_stop=None, output_type: str = "pil", plan=None,
                 on_step=None):
        if self.rank != 0:  # a follower, from follow(): only rank 0 decodes
            self._prompt = req.prompt

            def run():
                result = super(ParallelService, self).generate(req, image, should_stop=self._follower_stop,
                                                               output_type="latent", plan=plan)
                self.group.report_result({"steps_computed": result.steps_computed,
                                          "steps_skipped": result.steps_skipped})
                return result
            return self._job(run)
        if self._state != "ready":  # before any job: the followers are not waiting for one (a lost rank or a
            raise RuntimeError(f"service is {self._state}")  # broken group: _post says so)
        if req.seed is None:  # every rank draws the same noise
            req = req.model_copy(update={"seed": secrets.randbelow(MAX_SEED)})
        plan = plan or self.plan(req, image)
        self._post(("generate", req, image, plan))
        self._prompt = req.prompt
        stop = self._leader_stop(should_stop)
        result = self._job(lambda: super(ParallelService, self).generate(req, image, stop, output_type, plan, on_step))
        result.parallel = self.parallel_report(padding=self.parallel.last_padding)
        result.parallel["ranks"] = {"0": {"steps_computed": result.steps_computed,
                                          "steps_skipped": result.steps_skipped},
                                    **{str(r): s for r, s in sorted(self.group.results().items())}}
        return result

    def plan(self, req: InferenceRequest, image=None, new_shape_policy: bool = True):
        """FluxService's plan; with ring attention, a size whose tokens do not divide is a 422 here, before the
        queue (it would need padding, which ring attention cannot mask)."""
        decisions = super().plan(req, image, new_shape_policy)
        if self.config.cp_ring > 1 and self.pipe is not None:
            from kontext_server.parallel.adapter import ring_problem
            from kontext_server.service import StrictError

            width, height = self.output_size(req, image)
            per_token = self.pipe.vae_scale_factor * 2  # latent pixels x 2x2 packing
            tokens = (width // per_token) * (height // per_token) * (2 if image is not None else 1)
            problem = ring_problem(self.config.context_parallel, self.config.cp_ring, 512, tokens)
            if problem:
                raise StrictError([("width", problem)])
        return decisions

    def generate_alone(self, req: InferenceRequest, image=None, should_stop=None, output_type: str = "pil",
                       plan=None, on_step=None):
        """Rank 0 by itself, the sequence not split, the followers idle: today's one-GPU path on the same loaded
        model (the stage table's scaling column and tools/cp_overhead.py compare the two)."""
        saved, self.runner.parallel = self.runner.parallel, None
        try:
            return FluxService.generate(self, req, image, should_stop, output_type, plan, on_step)
        finally:
            self.runner.parallel = saved

    def _leader_stop(self, should_stop):
        injected = None if self._injection is None or self._injection[2] else self._injected_failure()
        if injected is None:
            return should_stop
        return lambda: injected or (should_stop() if should_stop else None)

    def _follower_stop(self):
        return None if self._injection is None or self._injection[2] else self._injected_failure()

    def _injected_failure(self) -> Exception | None:
        if self._injection is not None and self._injection[0] == self.rank and self._injection[1] in self._prompt:
            return RuntimeError(f"injected failure on rank {self.rank} (FLUX_CP_FAIL_AT)")
        return None

    def prepare(self, names: list[str]) -> None:
        self._post(("prepare", list(names)))
        self._job(lambda: super(ParallelService, self).prepare(names))

    def warm_up(self, width: int, height: int, edit: bool = False) -> float:
        self._post(("warm_up", width, height, edit))
        return self._job(lambda: super(ParallelService, self).warm_up(width, height, edit))

    def _save_compile_cache(self) -> None:
        if self.rank == 0:  # the ranks compile the same code: one writes it
            super()._save_compile_cache()

    def follow(self) -> None:
        """A follower's loop: run rank 0's jobs until it says stop or is gone."""
        while True:
            try:
                job = self.group.next_job()
            except Exception as exc:  # noqa: BLE001 - rank 0's store is gone: so is the server
                log.info("rank %d: rank 0 is gone (%s); exiting", self.rank, exc)
                return
            kind, args = job[0], job[1:]
            if kind == "stop":
                return
            try:
                if kind == "generate":
                    req, image, plan = args
                    self.generate(req, image, plan=plan)
                elif kind == "prepare":
                    self.prepare(*args)
                elif kind == "warm_up":
                    self.warm_up(*args)
                else:
                    log.error("rank %d: unknown job %r", self.rank, kind)
            except BaseException as exc:  # noqa: BLE001 - the job failed on every rank; the group goes on
                log.warning("rank %d: job %d (%s) failed: %s", self.rank, self.group.job_id, kind, exc)
                if self.group.broken:
                    log.error("rank %d: the group is broken; exiting", self.rank)
                    return

    def close(self) -> None:
        """Rank 0: stop the followers (launch.py)."""
        if self.rank == 0 and self.group is not None:
            import torch.distributed as dist

            from kontext_server.parallel import launch

            launch.stop_followers(self.group)
            if dist.is_initialized():
                dist.destroy_process_group()

    # ---- reports --------------------------------------------------------------------------------------------------
    def parallel_report(self, padding: dict | None = None) -> dict:
        group = self.group
        info = {"degree": self.config.context_parallel}
        if group is not None:
            info.update(ulysses=group.split.ulysses, ring=group.split.ring,
                        backend="nccl" if group.device_type == "cuda" else "gloo")
        if padding is not None:
            info["padded_tokens"] = dict(padding)
        return info

    def health(self) -> dict:
        info = super().health()
        report = self.parallel_report()
        if self.group is not None:
            report["ranks"] = {str(r): {"state": "lost" if r in self.group.dead else "alive",
                                        "pid": getattr(self.group.processes.get(r), "pid", None),
                                        **({"detail": self.group.dead[r]} if r in self.group.dead else {})}
                               for r in range(1, self.group.world)}
            if self.group.broken:
                report["broken"] = self.group.broken
        info["context_parallel"] = report
        return info
