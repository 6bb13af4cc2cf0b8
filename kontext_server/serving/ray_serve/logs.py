"""The server's loggers (flux.*) in Ray's worker processes: the replicas and the ingress write the same lines as the
local server (one per request, load and warm-up messages) to their stderr, which Ray keeps in its logs directory and,
with `log_to_driver` (Ray's default), prints on the console of the command that started the cluster.

Ray configures its own loggers (ray.serve: access lines), not the root logger, so without this the flux.* INFO lines
would go nowhere. FLUX_LOG_LEVEL reaches remote workers through the replicas' runtime environment
(settings.replica_env)."""
from __future__ import annotations

import logging

from kontext_server import settings


def configure_logging() -> None:
    """flux.* at FLUX_LOG_LEVEL to stderr, unless this process has a root handler already."""
    logging.basicConfig(level=settings.LOG_LEVEL.get(), format="%(asctime)s %(name)s %(message)s")
