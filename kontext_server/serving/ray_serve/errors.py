"""The errors the Ray Serve path adds to the engine's (kontext_server.engine): typed, with their HTTP status.

Pure (no ray import): the replicas raise them and the ingress unpickles them, and the routes answer them like any
EngineError (429 / 503 carry Retry-After).
"""
from __future__ import annotations

from kontext_server.engine import EngineError


class ReplicaLost(EngineError):
    """The replica running the request died after the generation had started (or on its one retry too)."""
    status, code = 503, "replica_lost"


class StrictRejected(EngineError):
    """A strict request planned again on a replica whose prepared set differs from the one the ingress planned with
    (replicas on unlike GPUs) could not get what it asked for."""
    status, code = 422, "validation_error"
