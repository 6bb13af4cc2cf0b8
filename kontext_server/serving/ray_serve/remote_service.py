"""RemoteService: what the routes call "the service" on the Ray Serve ingress, where no model is loaded.

What: the members the routes and the lifespan use (`state`, `error`, `model`, `plan`, `health`, `load`), answered
from the replicas' reports (board.py) instead of a local model.
Where requests are planned, and why on the ingress: the local server plans before the queue, so a `strict` request
that cannot get what it asked for is a 422 at once, even when the queue is full; planning here keeps that order (a
429 never hides a 422). The planner is pure: it needs the registry (built here from the same ServiceConfig as the
replicas', which fixes every optimisation's rules), the prepared set and the device, which each replica reports, and,
under --new-shapes eager only, the replica's compiled shapes (the warm-up shapes: under that policy nothing else is
ever compiled, so every replica reports the same). The replica checks that the plan was made with its own prepared
set and device (replica.plan_key) and plans again itself when not (replicas on unlike GPUs).
Contract: never blocks a route: everything reads the board's last snapshot. `load()` only waits (bounded) for a
first ready replica, for the lifespan's log line; the replicas load themselves.
"""
from __future__ import annotations

import logging
import time
from types import SimpleNamespace

from kontext_server.lora.library import selectable
from kontext_server.request import DEFAULT_DPM_STEPS, InferenceRequest
from kontext_server.service.config import ServiceConfig
from kontext_server.service.service import plan_request
from kontext_server.serving.ray_serve.board import ReplicaBoard
from optimizations.registry import build_registry

log = logging.getLogger("flux.ray")
LOAD_WAIT_S = 6 * 3600.0  # the lifespan's wait for a first ready replica (a full-size first compile takes minutes)


class NotReady(RuntimeError):
    """No ready replica has reported (the routes check `state` first, so this is a race: answered 500)."""


class RemoteService:
    def __init__(self, config: ServiceConfig, board: ReplicaBoard):
        self.config = config
        self.board = board
        self.registry = build_registry(config.compile_mode, config.compile_vae, config.compile_scope,
                                       config.inductor_flags, dpm_default_steps=DEFAULT_DPM_STEPS)

    # ---- what the routes read --------------------------------------------------------------------------------------
    @property
    def state(self) -> str:
        return self.board.state()

    @property
    def error(self) -> str | None:
        report = self.board.any_report()
        return report.get("error") if report else None

    @property
    def model(self):
        report = self.board.any_report()
        model = (report or {}).get("health", {}).get("model")
        if model is None:
            return None
        return SimpleNamespace(source=model["source"], synthetic=model["synthetic"],
                               description=model["description"])

    def plan_key(self) -> tuple | None:
        """The plan key of the replica the next plan is made with (replica.plan_key)."""
        report = self.board.any_report()
        return report["plan_key"] if report else None

    def plan(self, req: InferenceRequest, image=None):
        report = self.board.any_report()
        if report is None:
            raise NotReady("no model replica has reported yet")
        warm_keys = report["warm_keys"]
        return plan_request(req, image, self.registry, report["prepared"], report["device_info"],
                            warm_keys=(lambda: warm_keys) if report["new_shapes"] == "eager" else None,
                            offloaded=report.get("offloaded"))

    def lora_names(self) -> list[str]:
        """The adapters a request may select by name alone, from a replica's report of its library (every replica
        reads the same --lora-dir)."""
        report = self.board.any_report()
        library = ((report or {}).get("health", {}).get("lora") or {}).get("library", {})
        return selectable(library)

    def check_loras(self, req: InferenceRequest) -> None:
        """Nothing to check here: the ingress holds no adapters. Each replica checks a request's `loras` on its
        worker (FluxService.generate), and a bad adapter comes back as the same 422 naming it."""

    def health(self) -> dict:
        """A ready replica's own health (every replica of the deployment is configured alike), the state of the
        whole, and each replica's: /health's body at the ingress (docs/api.md)."""
        report = self.board.any_report()
        info = dict(report["health"]) if report else {"status": "loading"}
        info["status"] = self.state
        info["engine"] = "ray"
        info["replicas"] = self.board.counts()
        info["replica_states"] = {
            r["id"]: {"status": self.board.state_of(r), "queue_depth": r["queue_depth"], "in_flight": r["in_flight"],
                      "host": r["host"], "pid": r["pid"], "actor": r["actor"], "error": r["error"],
                      "report_age_s": r["age_s"],
                      "torch_threads": r["torch_threads"]}
            for r in self.board.replicas()}
        if self.state != "failed":
            info.pop("error", None)
        return info

    # ---- what the lifespan calls -------------------------------------------------------------------------------------
    def load(self) -> None:
        """The replicas load themselves: wait (bounded) for the first one to be ready, for the log."""
        deadline = time.monotonic() + LOAD_WAIT_S
        while self.state != "ready" and time.monotonic() < deadline:
            time.sleep(0.5)
        if self.state != "ready":
            raise TimeoutError(f"no model replica was ready after {LOAD_WAIT_S:.0f} s")
