"""The work the engine's worker runs, as typed jobs: each knows how to run itself on the service.

The engine (engine.py) knows nothing of FLUX: it queues payloads and calls `payload.run(service, should_stop)`
through the function the app gives it. `should_stop` is checked between denoising steps (cancel, timeout, drain).
"""
from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any, Callable

from kontext_server.request import InferenceRequest

ShouldStop = Callable[[], Exception | None]


@dataclass
class GenerateJob:
    """One generation: the validated request, its decoded reference image, the plan decided before queueing, and an
    optional per-step hook (kontext_server.service.steps.StepEvent; called on the worker thread after each step)."""
    request: InferenceRequest
    image: Any = None  # PIL image or None
    plan: dict | None = None
    on_step: Callable[[Any], None] | None = None
    # Steps whose event should carry a decoded preview (service/steps.preview_steps): what a remote replica needs to
    # replay `on_step`, which does not cross processes (serving/ray_serve relays step events to it).
    partial_images: int = 0

    def run(self, service, should_stop: ShouldStop):
        from kontext_server.engine import InvalidInput
        from kontext_server.lora.library import LoraError

        try:
            return service.generate(self.request, self.image, should_stop=should_stop, plan=self.plan,
                                    on_step=self.on_step)
        except LoraError as exc:  # found on the worker (a file read for the first time): a 422, the model unchanged
            raise InvalidInput(str(exc), lora_field(exc), exc.kind) from None


def lora_field(exc) -> str:
    """The request field a LoraError is about: `loras.N.name`."""
    return f"loras.{exc.index if exc.index is not None else 0}.name"


@dataclass
class BenchmarkJob:
    """GET /benchmark: the request benchmark on the loaded model (it takes the worker like a generation)."""
    params: dict = field(default_factory=dict)

    def run(self, service, should_stop: ShouldStop):
        from kontext_server.benchmark.requests import run_request_benchmark

        return run_request_benchmark(service, should_stop=should_stop, **self.params)
