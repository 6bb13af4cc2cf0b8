"""One app's asynchronous-jobs machinery, built from its ServerSettings: the data directory, the job store, the
output store, the webhook sender and the job manager (kontext_server/jobstore), wired to the app's metrics.

Contract: `build_jobs(server, output_store)` sets `server.jobs` and `server.output_store` and returns the manager.
Without a data directory (apps built in process, tests) it uses a new temporary directory, removed when the manager
closes. It raises DataDirInUse when another process holds the data directory."""
from __future__ import annotations

import shutil
import tempfile
from pathlib import Path

from kontext_server.api.bfl import serving as bfl_serving
from kontext_server.api.context import Server
from kontext_server.jobstore.manager import JobManager, ManagerSettings
from kontext_server.jobstore.store import JobStore
from kontext_server.jobstore.webhooks import WebhookSender
from kontext_server.safe_http import FetchPolicy
from kontext_server.storage import open_output_store
from utils import decode_image_bytes


class _TempDirManager(JobManager):
    """A manager on a temporary data directory: the directory goes when the manager closes."""
    temp_dir: Path

    def close(self) -> None:
        super().close()
        shutil.rmtree(self.temp_dir, ignore_errors=True)


def build_jobs(server: Server, output_store=None) -> JobManager:
    s = server.settings
    temp = s.data_dir is None
    data_dir = Path(tempfile.mkdtemp(prefix="flux-data-")) if temp else Path(s.data_dir)
    data_dir.mkdir(parents=True, exist_ok=True)
    store = JobStore.open(data_dir)
    if output_store is None:
        output_store = open_output_store(s.output_store, data_dir, s.s3_endpoint_url)
    server.output_store = output_store
    jm = server.metrics.job_metrics
    webhooks = WebhookSender(store, FetchPolicy(allow_private=s.allow_private_urls, timeout=s.webhook_timeout),
                             retry_delays=s.webhook_retry_delays,
                             on_outcome=lambda outcome: jm.webhook_deliveries.labels(outcome).inc())
    cls = _TempDirManager if temp else JobManager
    manager = cls(store, server.engine, server.service, output_store,
                  ManagerSettings(result_ttl=s.result_ttl, on_restart=s.on_restart, max_jobs=s.max_jobs,
                                  sweep_interval=s.sweep_interval),
                  describe=lambda row: bfl_serving.describe(server, row, row.meta.get("base_url", "")),
                  decode_input=decode_image_bytes, on_event=jm.on_job_event, webhooks=webhooks,
                  encode=lambda image, fmt, prompt: server.provenance.encode(image, fmt, prompt=prompt))
    if temp:
        manager.temp_dir = data_dir
    server.jobs = manager
    return manager
