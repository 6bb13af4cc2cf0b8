"""What the routes share: the server's settings and the objects one app holds (service, engine, metrics, output
store).

Routes reach them through `server(request)` (the app's state), so several apps can live in one process (tests)."""
from __future__ import annotations

from dataclasses import dataclass, field

from pathlib import Path

from fastapi import Request

from kontext_server.api.auth import KeyStore
from kontext_server.api.output_store import OutputStore
from kontext_server.api.rate_limit import RateRule
from kontext_server.provenance import Provenance
from kontext_server.safe_http import FetchPolicy


@dataclass
class ServerSettings:
    max_queue: int = 16
    queue_timeout: float = 120.0
    request_timeout: float = 600.0
    shutdown_grace: float = 30.0
    drain_seconds: float = 0.0  # after SIGTERM, keep the listener open this long (see lifecycle.py)
    max_body_bytes: int = 32 * 1024 * 1024
    load_in_background: bool = True
    api_keys: KeyStore | None = None  # None: every route is open
    rate_limit: RateRule | None = None  # per key id ("anonymous" without keys)
    metrics_key_required: bool = False  # /metrics behind the keys too
    served_model_name: str | None = None  # the id /v1/models lists (default: the service's --model)
    # async jobs, outputs, URL inputs, webhooks (docs/operations.md)
    data_dir: Path | None = None  # None: a temporary directory, removed at shutdown (apps built in process)
    result_ttl: float = 3600.0
    on_restart: str = "run"  # run | error: pending jobs found at start-up
    max_jobs: int = 10000
    sweep_interval: float = 60.0
    output_store: str = "local"  # local | s3://bucket/prefix
    s3_endpoint_url: str | None = None
    public_url: str | None = None  # base of polling_url and /v1/files URLs (default: the request's own)
    allow_private_urls: bool = False
    url_fetch_timeout: float = 20.0
    webhook_retry_delays: tuple[float, ...] = (1.0, 5.0, 30.0)
    webhook_timeout: float = 10.0
    provenance_metadata: bool = True  # EXIF / PNG text saying what made each image (kontext_server/provenance.py)
    provenance_prompt: bool = False  # the prompt in that metadata too
    c2pa_cert: str | None = None  # PEM certificate chain: with c2pa_key, each image carries a signed C2PA manifest
    c2pa_key: str | None = None  # its PEM private key
    safety_checker: str | None = None  # module:callable checking prompts and images (kontext_server/safety.py)

    def fetch_policy(self) -> FetchPolicy:
        return FetchPolicy(allow_private=self.allow_private_urls, timeout=self.url_fetch_timeout)

    def base_url(self, request: Request) -> str:
        return (self.public_url or str(request.base_url)).rstrip("/")


@dataclass
class Server:
    service: object  # kontext_server.service.FluxService
    engine: object  # kontext_server.engine.Engine
    metrics: object  # kontext_server.api.metrics.Metrics
    settings: ServerSettings
    output_store: OutputStore | None = None  # where output images go (local files by default; S3)
    jobs: object = None  # kontext_server.jobstore.manager.JobManager: the asynchronous jobs
    provenance: Provenance = field(default_factory=Provenance)  # the encoder of every returned image
    safety: object = None  # kontext_server.safety.SafetyHook, or None: nothing is checked

    @property
    def model_id(self) -> str:
        """The model id of the /v1 routes: --served-model-name, else what --model named."""
        config = getattr(self.service, "config", None)
        return self.settings.served_model_name or str(getattr(config, "model", None) or "flux.1-kontext-dev")


def server(request: Request) -> Server:
    return request.app.state.server
