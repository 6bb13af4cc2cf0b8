"""The service: one loaded model on one device, its optimisations, and running requests on it.

config.py (ServiceConfig) -> service.py (FluxService: load, prepare, plan, generate, warm_up, health), built from
components.py (what was loaded), planner.py (pure: flags -> decisions), runner.py (one request), steps.py (the per-step
hook and its previews) and health.py; under --memory-budget, memory_tiers.py (pure: budget and sizes -> what stays on
the GPU), memory_sizes.py (the sizes, measured) and offload.py (the placement, with diffusers' group offloading).
The names below load lazily: `kontext_server.service.config` stays importable without torch (the CLI's --help).
"""
from __future__ import annotations

import importlib

_EXPORTS = {"NEW_SHAPE_POLICIES": "config", "ServiceConfig": "config", "StrictError": "planner",
            "GenerationResult": "runner", "reference_image_tensor": "runner", "FluxService": "service",
            "StepEvent": "steps"}
__all__ = sorted(_EXPORTS) + ["Decision"]


def __getattr__(name: str):
    if name == "Decision":
        from optimizations.base import Decision

        return Decision
    if name in _EXPORTS:
        return getattr(importlib.import_module(f"kontext_server.service.{_EXPORTS[name]}"), name)
    raise AttributeError(f"module 'kontext_server.service' has no attribute {name!r}")
