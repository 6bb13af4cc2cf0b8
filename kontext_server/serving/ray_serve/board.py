"""ReplicaBoard: the ingress's view of the model replicas, refreshed from FluxStatus in the background.

What: a daemon thread fetches FluxStatus's snapshot every `refresh_s`; readers (the routes' `service.state`,
/health, /metrics, the RemoteEngine's Retry-After) read the last one without waiting. `forget(id)` drops a replica the
ingress saw die at once, so /health's count drops with the failure, not a heartbeat timeout later.
Why a thread: routes read the state synchronously on the event loop; a DeploymentHandle call may be awaited there
but never waited on, so the fetch runs beside the loop and the readers only read.
Contract: every fetch is bounded (`.result(timeout_s=...)`); a snapshot older than `stale_s` (FluxStatus down, the
thread stuck) counts as no replicas, so the ingress reports not ready rather than stale health. A replica's report
is whatever replica.FluxModel.report() sent.
"""
from __future__ import annotations

import logging
import threading
import time
from typing import Any

log = logging.getLogger("flux.ray")
STATES = ("ready", "loading", "failed", "draining")


class ReplicaBoard:
    def __init__(self, status_handle, refresh_s: float = 0.5, stale_s: float = 5.0):
        self._status = status_handle
        self.refresh_s, self.stale_s = refresh_s, stale_s
        self._reports: dict[str, dict] = {}
        self._fetched_at = 0.0
        self._forgotten: dict[str, float] = {}  # replica id -> until when it stays out (monotonic)
        self._lock = threading.Lock()
        self._stop = threading.Event()
        self._thread: threading.Thread | None = None

    def start(self) -> None:
        if self._thread is None:
            self._thread = threading.Thread(target=self._loop, name="flux-replica-board", daemon=True)
            self._thread.start()

    def stop(self) -> None:
        self._stop.set()

    def _loop(self) -> None:
        while not self._stop.is_set():
            self.refresh()
            self._stop.wait(self.refresh_s)

    def refresh(self) -> None:
        try:
            snap = self._status.snapshot.remote(self.stale_s).result(timeout_s=max(2.0, self.stale_s))
        except Exception as exc:  # noqa: BLE001 - FluxStatus restarting: keep the last view until it is stale
            log.warning("could not read FluxStatus: %s", exc)
            return
        now = time.monotonic()
        with self._lock:
            # A forgotten replica stays out while a report sent before its death could still arrive; one that was
            # only unreachable for a moment comes back with its next heartbeat after that.
            self._forgotten = {rid: t for rid, t in self._forgotten.items() if t > now}
            self._reports = {rid: r for rid, r in snap.items() if rid not in self._forgotten}
            self._fetched_at = now

    def forget(self, replica_id: str | None) -> None:
        """A replica the ingress saw die: out of the count now, and out of FluxStatus."""
        if not replica_id:
            return
        with self._lock:
            self._forgotten[replica_id] = time.monotonic() + self.stale_s
            self._reports.pop(replica_id, None)
        try:
            self._status.forget.remote(replica_id)  # fire and forget: the heartbeat has stopped anyway
        except Exception:  # noqa: BLE001
            pass

    # ---- readers ---------------------------------------------------------------------------------------------------
    def replicas(self) -> list[dict]:
        with self._lock:
            if time.monotonic() - self._fetched_at > self.stale_s:
                return []
            return sorted(self._reports.values(), key=lambda r: r["id"])

    @staticmethod
    def state_of(report: dict) -> str:
        if report["state"] == "ready" and not report.get("accepting", True):
            return "draining"
        return report["state"] if report["state"] in STATES else "loading"

    def ready(self) -> list[dict]:
        return [r for r in self.replicas() if self.state_of(r) == "ready"]

    def counts(self) -> dict[str, int]:
        reps = self.replicas()
        out = {s: sum(self.state_of(r) == s for r in reps) for s in STATES}
        out["total"] = len(reps)
        return out

    def state(self) -> str:
        """ready: at least one replica is; failed: every replica that reported failed to load; else loading."""
        reps = self.replicas()
        states = {self.state_of(r) for r in reps}
        if "ready" in states:
            return "ready"
        if reps and states == {"failed"}:
            return "failed"
        return "loading"

    def any_report(self) -> dict[str, Any] | None:
        """A ready replica's report (all replicas of one deployment share their configuration), else any."""
        ready = self.ready()
        if ready:
            return ready[0]
        reps = self.replicas()
        return reps[0] if reps else None
