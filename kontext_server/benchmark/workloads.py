"""The workloads every benchmark and profiler measures, and the command-line arguments the profiling tools share.

edit-1024 (1024x1024 with a 1024x1024 reference: 8,704 tokens), t2i-1024 (4,608), edit-512 (2,560). The reference
image is a deterministic structured test image (timing.test_image), never a flat colour."""
from __future__ import annotations

import argparse

from kontext_server.benchmark.floor import WORKLOADS
from kontext_server.benchmark.timing import test_image


def parse_flags(items: list[str]) -> dict:
    """["use_mxfp4=true", "cache_threshold=0.1"] -> {"use_mxfp4": True, "cache_threshold": "0.1"} (pydantic casts)."""
    out = {}
    for item in items:
        key, _, value = item.partition("=")
        out[key] = {"true": True, "false": False}.get(value.lower(), value)
    return out


def add_model_and_workload_args(p: argparse.ArgumentParser, workload: str) -> None:
    """The arguments the profiling tools share: which model, device, optimisations, and which request shape."""
    p.add_argument("--model", default="synthetic-full")
    p.add_argument("--device", default=None)
    p.add_argument("--workload", choices=sorted(WORKLOADS), default=workload)
    p.add_argument("--width", type=int, help="override the workload's size (e.g. 256 for tiny on CPU)")
    p.add_argument("--height", type=int)
    p.add_argument("--optimizations", default="none")


def workload_request(a) -> tuple:
    """(width, height, reference image or None) for the parsed arguments' workload and size overrides."""
    width, height, edit = WORKLOADS[a.workload]
    width, height = a.width or width, a.height or height
    return width, height, test_image(width, height) if edit else None
