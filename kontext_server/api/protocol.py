"""The /inference route's wire format: its request is kontext_server.request.InferenceRequest; its response and
error bodies are declared here."""
from __future__ import annotations

from pydantic import BaseModel

from kontext_server.request import InferenceRequest

__all__ = ["InferenceRequest", "InferenceResponse", "LoraReport", "ModelInfo", "OptimizationReport"]


class OptimizationReport(BaseModel):
    requested: bool
    applied: bool
    detail: str


class LoraReport(BaseModel):
    """An adapter that ran: its name, the scale it ran at, its rank."""
    name: str
    scale: float
    rank: int


class ModelInfo(BaseModel):
    source: str
    synthetic: bool
    description: str


class InferenceResponse(BaseModel):
    request_id: str
    images: list[str]
    output_format: str
    seed: int
    width: int
    height: int
    steps: int
    steps_computed: int
    steps_skipped: int
    timings_ms: dict[str, float]
    optimizations: dict[str, OptimizationReport]
    model: ModelInfo
    loras: list[LoraReport] = []
    warnings: list[str] = []
    replica: str | None = None  # the Ray Serve replica that ran it (as X-Replica); null on the local server
    # context parallelism: degree, attention split (ulysses x ring), tokens padded, each rank's step counts; null in
    # one process
    context_parallel: dict | None = None
    size_reason: str | None = None  # why the output has its size (kontext_server/service/sizes.py)
    references: int = 0  # reference images the model saw (0: text-to-image)
    # under --memory-budget: the transformer variant that ran, whether it (and T5) ran offloaded, whether the VAE
    # decoded in tiles; null without a budget
    memory_tier: dict | None = None
