"""The optimisation interface: every optimisation is a small object behind a request flag.

Two kinds:
- load-time: changes weights or compiled code (compile, QKV fusion, channels-last, fp8). `prepare` runs once at
  start-up, when the server is told to prepare it; a request can then select it (or not, where the service keeps
  the unoptimised variant too).
- per-request: selected per call (scheduler, step cache threshold). `prepare` may still build shared objects.

`activate` runs inside the single GPU worker for one request and returns a context manager; everything it
changes is undone when that context exits, so no request leaks into the next.
"""
from __future__ import annotations

import contextlib
from dataclasses import dataclass
from typing import Any, ContextManager


@dataclass
class DeviceInfo:
    type: str  # "cuda" or "cpu"
    name: str  # e.g. "NVIDIA H100 80GB HBM3" or "cpu"
    capability: tuple[int, int] | None  # CUDA compute capability, None on CPU

    @property
    def is_cuda(self) -> bool:
        return self.type == "cuda"

    @classmethod
    def detect(cls, device: str) -> "DeviceInfo":
        import torch

        if device.startswith("cuda"):
            idx = torch.device(device).index or 0
            return cls("cuda", torch.cuda.get_device_name(idx), torch.cuda.get_device_capability(idx))
        return cls("cpu", "cpu", None)


@dataclass
class RunContext:
    """What one request's generation carries through the optimisations (worker thread only)."""

    service: Any  # FluxService
    request: Any  # the validated request (schemas.InferenceRequest)
    call_kwargs: dict  # keyword arguments for the pipeline call; per-request optimisations may edit them
    precision: str = "bf16"  # which transformer variant this request runs ("bf16" or "fp8")


class Optimization:
    name: str = ""
    flag: str = ""  # request field that selects it, e.g. "use_compile"
    load_time: bool = True
    lossy: bool = False  # changes numerics beyond float reordering: fidelity must be reported
    toggle: bool = True  # once prepared, can a request turn it off? (False: in-place change, always on)

    def available(self, device: DeviceInfo) -> str | None:
        """None when this optimisation can run on `device`, else the reason it cannot."""
        return None

    def prepare(self, service) -> str:
        """Load-time work (runs once, at start-up). Returns a short detail for /health and responses."""
        return "prepared"

    def activate(self, run: RunContext) -> tuple[ContextManager, str]:
        """Per-request selection: a context that applies it for this call only, and the detail to report."""
        return contextlib.nullcontext(), "applied"


def bind_forward(module, fn) -> None:
    """Give one module instance its own forward: `module.forward = fn` bound to it.

    fn is renamed "forward": torch's guard serialiser (used when a compiled region is saved whole, aot_regions.py)
    finds a bound method again as getattr(owner, method.__func__.__name__), and fails on any other name.
    """
    import types

    fn.__name__ = "forward"
    module.forward = types.MethodType(fn, module)
