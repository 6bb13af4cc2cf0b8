"""FluxStatus: the deployment where model replicas report themselves and the ingress reads them.

What: each FluxModel replica sends `report(dict)` every heartbeat (its id, actor name, state, queue, health and
metrics text); `snapshot(stale_s)` returns the reports younger than `stale_s`, with their age. `forget(id)` drops
one at once (the ingress saw it die; a replica shutting down says goodbye).
Why a deployment: a DeploymentHandle reaches one replica of a deployment, never each of them, so the ingress cannot
ask every replica for its health; here the replicas come to it. Serve restarts it like any deployment if it dies,
and the next heartbeats fill it again.
Contract: ages are measured on this actor's own clock (no clocks are compared across hosts); a replica that stops
reporting (killed, hung, partitioned) drops out after `stale_s`. One replica of it (its state is in memory).
"""
from __future__ import annotations

import time

from ray import serve


@serve.deployment(name="FluxStatus")
class FluxStatus:
    def __init__(self):
        self._reports: dict[str, tuple[float, dict]] = {}

    async def report(self, report: dict) -> None:
        self._reports[report["id"]] = (time.monotonic(), report)

    async def forget(self, replica_id: str) -> None:
        self._reports.pop(replica_id, None)

    async def snapshot(self, stale_s: float) -> dict[str, dict]:
        now = time.monotonic()
        for rid, (t, _) in list(self._reports.items()):
            if now - t > stale_s:
                del self._reports[rid]
        return {rid: {**r, "age_s": round(now - t, 3)} for rid, (t, r) in self._reports.items()}
