"""The Ray Serve application's arguments: one flat set for the CLI, `serve deploy` and KubeRay, and the deployment
options they give each deployment.

What: `AppArgs.parse(dict)` reads the flat `args:` of a Serve config file (the builder's argument) into the service's
config, the server's settings and `RayOptions`; `cli_args(namespace)` makes the same dict from `serve --engine ray`'s
options, so both paths go through one parser. `model_options` / `ingress_options` / `status_options` are the
keyword arguments of `Deployment.options()` for the three deployments.
Why: the model source, warm-up shapes and every other service setting are configured once, for all replicas.
Contract: pure (no ray import), so the CLI can validate its options before anything starts, and tests need no
cluster. A deployment section in a config file overrides what these options give (Serve's own precedence).
Limits: GPU replicas get 1 GPU each by default, N with context parallelism (`context_parallel` N: the replica's
process is rank 0 and starts the other ranks as its own child processes on the GPUs Ray gave it; one host).
"""
from __future__ import annotations

import math
from dataclasses import dataclass, field, fields
from typing import Any, Mapping

from kontext_server import settings
from kontext_server.api.context import ServerSettings
from kontext_server.request import parse_warmup_sizes
from kontext_server.service.config import ServiceConfig

APP_NAME = "flux"  # the Serve application's name (the CLI's; a config file names its own)
# The ingress only awaits: its replica takes this many requests at once, so that 429 is ours (the model's shared
# queue), never the proxy's own queueing in front of the ingress.
INGRESS_MAX_ONGOING = 2000


@dataclass
class RayOptions:
    replicas: int = field(default_factory=settings.REPLICAS.get_int)
    min_replicas: int | None = field(default_factory=lambda: _opt_int(settings.MIN_REPLICAS))
    max_replicas: int | None = field(default_factory=lambda: _opt_int(settings.MAX_REPLICAS))
    target_ongoing_requests: float = field(default_factory=settings.TARGET_ONGOING_REQUESTS.get_float)
    upscale_delay_s: float = field(default_factory=settings.UPSCALE_DELAY.get_float)
    downscale_delay_s: float = field(default_factory=settings.DOWNSCALE_DELAY.get_float)
    replica_queue: int = field(default_factory=settings.REPLICA_QUEUE.get_int)
    replica_cpus: float | None = field(default_factory=lambda: _opt_float(settings.REPLICA_CPUS))
    replica_gpus: float | None = field(default_factory=lambda: _opt_float(settings.REPLICA_GPUS))
    health_check_period_s: float = 2.0  # a replica that stops answering leaves the rotation within seconds
    health_check_timeout_s: float = 30.0
    heartbeat_s: float = 1.0  # how often each replica reports to FluxStatus (health, metrics)
    # FLUX_* variables for the replicas' processes (the code switches; settings.replica_env()); the CLI fills it
    env: dict[str, str] = field(default_factory=dict)

    def __post_init__(self):
        if self.replicas < 1:
            raise ValueError(f"replicas must be at least 1 (got {self.replicas})")
        if self.replica_queue < 0:
            raise ValueError(f"replica_queue must be 0 or more (got {self.replica_queue})")
        if self.min_replicas is not None and self.min_replicas < 1:
            # The ingress answers 503 not_ready while no replica is ready, so no request would ever queue to wake one
            raise ValueError("min_replicas must be at least 1: scaling to zero is not supported")
        if self.autoscaling and self.max_bound < (self.min_replicas or 0):
            raise ValueError(f"max_replicas ({self.max_replicas}) is below min_replicas ({self.min_replicas})")

    @property
    def autoscaling(self) -> bool:
        return self.min_replicas is not None or self.max_replicas is not None

    @property
    def max_bound(self) -> int:
        """The most replicas there can be."""
        if not self.autoscaling:
            return self.replicas
        return self.max_replicas if self.max_replicas is not None else max(self.replicas, self.min_replicas or 1)

    @property
    def max_ongoing_requests(self) -> int:
        """Per replica: the one its worker runs plus those it holds ready (the rest wait in the shared queue)."""
        return 1 + self.replica_queue

    def autoscaling_config(self) -> dict | None:
        if not self.autoscaling:
            return None
        lo = self.min_replicas if self.min_replicas is not None else 1
        hi = self.max_bound
        return {"min_replicas": lo, "max_replicas": hi, "initial_replicas": min(max(self.replicas, lo), hi),
                "target_ongoing_requests": self.target_ongoing_requests, "upscale_delay_s": self.upscale_delay_s,
                "downscale_delay_s": self.downscale_delay_s}

    def resources(self, cluster: Mapping[str, float], context_parallel: int = 1) -> dict:
        """ray_actor_options' resources for one model replica, given the cluster's (`ray.cluster_resources()`); with
        context parallelism a replica is N ranks, one GPU each (its own child processes: kontext_server/parallel)."""
        if self.replica_gpus is not None:
            gpus = self.replica_gpus
        else:
            gpus = context_parallel if cluster.get("GPU", 0) > 0 else 0
        if self.replica_cpus is not None:
            cpus = self.replica_cpus
        elif gpus:
            cpus = 1
        else:  # CPU-only: the cores shared out, so that torch's threads (OMP_NUM_THREADS = num_cpus) fill them
            cpus = max(1, math.floor(cluster.get("CPU", 1) / self.max_bound))
        return {"num_cpus": cpus, "num_gpus": gpus}


@dataclass
class AppArgs:
    service: ServiceConfig
    server: ServerSettings
    ray: RayOptions

    @classmethod
    def parse(cls, args: Mapping[str, Any] | None) -> "AppArgs":
        """The flat `args:` of a config file: any field of ServiceConfig, ServerSettings or RayOptions, and `warmup`
        (the CLI's spelling: "1024x1024,edit:1024x1024"). An unknown key is an error, not ignored."""
        args = dict(args or {})
        if "warmup" in args:
            spec = args.pop("warmup")
            args["warmup_sizes"] = parse_warmup_sizes(spec) if isinstance(spec, str) else spec
        groups = {}
        for name, klass in (("service", ServiceConfig), ("server", ServerSettings), ("ray", RayOptions)):
            names = {f.name for f in fields(klass)}
            groups[name] = klass(**{k: args.pop(k) for k in list(args) if k in names})
        if args:
            raise ValueError(f"unknown argument(s) {sorted(args)} for the Ray Serve application")
        svc = groups["service"]
        svc.warmup_sizes = [tuple(s) for s in svc.warmup_sizes]
        if svc.device and svc.device.startswith("cuda:"):
            raise ValueError(f"device {svc.device!r}: Ray gives each replica its own GPU; use cuda or leave it unset")
        groups["server"].load_in_background = True  # the ingress loads nothing: it waits for replicas
        return cls(**groups)

    def as_dict(self) -> dict:
        """The flat form again (what `parse` takes): what a config file's `args:` would hold."""
        out: dict[str, Any] = {}
        for part in (self.service, self.server, self.ray):
            for f in fields(part):
                value = getattr(part, f.name)
                out[f.name] = str(value) if f.name == "cache_dir" and value is not None else value
        out["warmup_sizes"] = [list(s) for s in self.service.warmup_sizes]
        return out


def model_options(a: AppArgs, cluster: Mapping[str, float]) -> dict:
    """FluxModel.options(...): replicas or autoscaling, capacity, back-pressure, resources, health checks."""
    actor: dict[str, Any] = dict(a.ray.resources(cluster, a.service.context_parallel))
    if a.ray.env:
        actor["runtime_env"] = {"env_vars": dict(a.ray.env)}
    opts: dict[str, Any] = {
        "max_ongoing_requests": a.ray.max_ongoing_requests,
        # The shared queue: requests no replica has room for wait at the ingress's handle, at most this many;
        # one more gets BackPressureError, answered 429 with Retry-After.
        "max_queued_requests": a.server.max_queue,
        "health_check_period_s": a.ray.health_check_period_s,
        "health_check_timeout_s": a.ray.health_check_timeout_s,
        "graceful_shutdown_timeout_s": a.server.shutdown_grace,
        "ray_actor_options": actor,
    }
    autoscaling = a.ray.autoscaling_config()
    if autoscaling is not None:
        opts["autoscaling_config"] = autoscaling
    else:
        opts["num_replicas"] = a.ray.replicas
    return opts


def ingress_options(a: AppArgs) -> dict:
    return {"num_replicas": 1, "max_ongoing_requests": INGRESS_MAX_ONGOING, "ray_actor_options": {"num_cpus": 0},
            "graceful_shutdown_timeout_s": a.server.shutdown_grace + 5}


def status_options() -> dict:
    """One small replica; no access log (every replica reports every heartbeat)."""
    return {"num_replicas": 1, "max_ongoing_requests": 1000, "ray_actor_options": {"num_cpus": 0},
            "logging_config": {"enable_access_log": False}}


def cli_args(ns) -> dict:
    """The flat args from `serve --engine ray`'s parsed options (kontext_server.cli)."""
    out = {"model": ns.model, "device": ns.device, "optimizations": ns.optimizations, "compile_mode": ns.compile_mode,
           "compile_scope": ns.compile_scope, "inductor_flags": ns.inductor_flags, "cache_dir": ns.cache_dir,
           "warmup_sizes": ns.warmup or [], "new_shapes": ns.new_shapes, "max_queue": ns.max_queue,
           "queue_timeout": ns.queue_timeout, "request_timeout": ns.request_timeout,
           "shutdown_grace": ns.shutdown_grace, "replicas": ns.replicas, "min_replicas": ns.min_replicas,
           "max_replicas": ns.max_replicas, "target_ongoing_requests": ns.target_ongoing_requests,
           "upscale_delay_s": ns.upscale_delay, "downscale_delay_s": ns.downscale_delay,
           "replica_queue": ns.replica_queue, "replica_cpus": ns.replica_cpus, "replica_gpus": ns.replica_gpus,
           "context_parallel": ns.context_parallel, "cp_ring": ns.cp_ring_degree, "cp_timeout": ns.cp_timeout,
           "memory_budget": ns.memory_budget,
           "provenance_metadata": ns.provenance_metadata, "provenance_prompt": ns.provenance_prompt,
           "c2pa_cert": ns.c2pa_cert, "c2pa_key": ns.c2pa_key, "safety_checker": ns.safety_checker,
           "env": settings.replica_env()}
    if out["cache_dir"] is None:  # one directory for every replica of this host (the compile cache is shared)
        out["cache_dir"] = str(settings.default_cache_dir())
    return out


def _opt_int(var: settings.EnvVar) -> int | None:
    return None if var.get() in (None, "") else int(var.get())


def _opt_float(var: settings.EnvVar) -> float | None:
    return None if var.get() in (None, "") else float(var.get())


__all__ = ["APP_NAME", "AppArgs", "RayOptions", "cli_args", "ingress_options", "model_options", "status_options"]
