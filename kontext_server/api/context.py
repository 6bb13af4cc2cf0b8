"""What the routes share: the server's settings and the objects one app holds (service, engine, metrics, output
store).

Routes reach them through `server(request)` (the app's state), so several apps can live in one process (tests)."""
from __future__ import annotations

from dataclasses import dataclass, field

from fastapi import Request

from kontext_server.api.auth import KeyStore
from kontext_server.api.output_store import OutputStore
from kontext_server.api.rate_limit import RateRule
from kontext_server.provenance import Provenance


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
    provenance_metadata: bool = True  # EXIF / PNG text saying what made each image (kontext_server/provenance.py)
    provenance_prompt: bool = False  # the prompt in that metadata too
    c2pa_cert: str | None = None  # PEM certificate chain: with c2pa_key, each image carries a signed C2PA manifest
    c2pa_key: str | None = None  # its PEM private key
    safety_checker: str | None = None  # module:callable checking prompts and images (kontext_server/safety.py)


@dataclass
class Server:
    service: object  # kontext_server.service.FluxService
    engine: object  # kontext_server.engine.Engine
    metrics: object  # kontext_server.api.metrics.Metrics
    settings: ServerSettings
    output_store: OutputStore | None = None  # response_format "url" needs one; none ships yet
    provenance: Provenance = field(default_factory=Provenance)  # the encoder of every returned image
    safety: object = None  # kontext_server.safety.SafetyHook, or None: nothing is checked

    @property
    def model_id(self) -> str:
        """The model id of the /v1 routes: --served-model-name, else what --model named."""
        config = getattr(self.service, "config", None)
        return self.settings.served_model_name or str(getattr(config, "model", None) or "flux.1-kontext-dev")


def server(request: Request) -> Server:
    return request.app.state.server
