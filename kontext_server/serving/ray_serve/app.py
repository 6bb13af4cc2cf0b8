"""The Ray Serve application: FluxIngress -> FluxModel replicas, both reporting through FluxStatus.

What: `build(args)` is the application builder a Serve config names (`import_path:
kontext_server.serving.ray_serve.app:build`, with the flat `args:` of options.AppArgs); `application(AppArgs)` is
what the CLI deploys. Both bind the same three deployments with the same options, so `serve --engine ray`,
`serve deploy deploy/ray-serve.yaml` and the KubeRay RayService run the same thing.
Contract: needs a connected Ray (the builder runs in the driver or in Serve's build task); it reads the cluster's
resources once, to give replicas GPUs where the cluster has them (a config file's `ray_actor_options` override it:
an autoscaling cluster with no GPU node up yet should say `num_gpus: 1` explicitly, as the files in deploy/ do).
"""
from __future__ import annotations

from typing import Any, Mapping

import ray
from ray.serve import Application

from kontext_server.serving.ray_serve.ingress import FluxIngress
from kontext_server.serving.ray_serve.options import (AppArgs, ingress_options, model_options,
                                                      status_options)
from kontext_server.serving.ray_serve.replica import FluxModel
from kontext_server.serving.ray_serve.status import FluxStatus


def application(a: AppArgs, cluster: Mapping[str, float] | None = None) -> Application:
    if cluster is None:  # `serve build` calls builders without a cluster: no GPUs assumed then
        cluster = dict(ray.cluster_resources()) if ray.is_initialized() else {}
    status = FluxStatus.options(**status_options()).bind()
    model = FluxModel.options(**model_options(a, cluster)).bind(a.service, a.server, status, a.ray.heartbeat_s)
    return FluxIngress.options(**ingress_options(a)).bind(model, status, a.service, a.server)


def build(args: dict[str, Any]) -> Application:
    """Serve's application builder: the flat `args:` of a config file (options.AppArgs.parse)."""
    return application(AppArgs.parse(args))
