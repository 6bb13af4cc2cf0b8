"""Context parallelism: one request split over N ranks of one host (para-attn's Ulysses / ring attention).

launch.py (rank 0 starts the followers) -> group.py (joining, jobs, agreement, liveness) -> adapter.py (one
transformer call split over the ranks) -> service.py (ParallelService: FluxService on one rank).
`build_service(config)` is what the CLI, the uvicorn app and the Ray Serve replica call: a FluxService in one process,
a ParallelService (rank 0) when `config.context_parallel` is above 1. Light to import: torch loads on first use.
"""
from __future__ import annotations


def build_service(config):
    """The service a server runs for `config`: FluxService, or rank 0 of a context-parallel group."""
    if getattr(config, "context_parallel", 1) > 1:
        from kontext_server.parallel.service import ParallelService

        return ParallelService(config)
    from kontext_server.service import FluxService

    return FluxService(config)
