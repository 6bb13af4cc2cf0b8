"""The ingress's /metrics: its own HTTP families, plus every replica's families labelled `replica`.

What: `IngressMetrics` has the members the app uses (`requests`, `latency` for the middleware; `observe_result`,
`render` for the routes). It renders one Prometheus text: the HTTP families counted here (flux_requests_total,
flux_requests_by_key_total, flux_request_seconds: one ingress sees every request), flux_replicas{state} and this
ingress's own queue (flux_ingress_queue_depth, flux_ingress_in_flight), and the generation families each replica
reports with its heartbeat (flux_stage_seconds, flux_queue_wait_seconds, flux_queue_depth, flux_in_flight,
flux_transformer_steps_total, flux_gpu_memory_bytes, flux_ready), one family each, with a `replica` label.
Why: Prometheus scrapes one target; the replicas have no HTTP of their own. Each family appears once, as the text
format requires (`merge_replica_families` is pure and tested without Ray).
Contract: replica samples are those of the replica's last report (at most a heartbeat old); a replica that is gone
drops out with its report. `observe_result` does nothing here: the replica that ran a generation observed it.
Ray's own metrics (ray_serve_*: per-deployment request counts, latencies, queue lengths, replica health) are
exported by each Ray node on its metrics port, not here (docs/operations.md).
"""
from __future__ import annotations

from typing import Iterable, Mapping

from prometheus_client import CollectorRegistry, Gauge, generate_latest
from prometheus_client.metrics_core import Metric
from prometheus_client.parser import text_string_to_metric_families

from kontext_server.api.metrics import JobMetrics, http_metrics

# counted at the ingress; empty on replicas
_COUNTED_HERE = ("flux_requests", "flux_requests_by_key", "flux_request_seconds", *JobMetrics.FAMILIES)
INGRESS_FAMILIES = {*_COUNTED_HERE, *(f"{name}_created" for name in _COUNTED_HERE)}  # the parser's _created too


def merge_replica_families(texts: Mapping[str, str], skip: Iterable[str] = INGRESS_FAMILIES) -> list[Metric]:
    """Replica id -> its Prometheus text, into one family per name whose samples carry `replica="<id>"`."""
    skip = set(skip)
    merged: dict[str, Metric] = {}
    for replica, text in sorted(texts.items()):
        for fam in text_string_to_metric_families(text):
            if fam.name in skip:
                continue
            out = merged.get(fam.name)
            if out is None:
                out = merged[fam.name] = Metric(fam.name, fam.documentation, fam.type, fam.unit)
            for s in fam.samples:
                out.samples.append(s._replace(labels={**s.labels, "replica": replica}))
    return list(merged.values())


class _ReplicaCollector:
    def __init__(self, board):
        self._board = board

    def collect(self):
        yield from merge_replica_families({r["id"]: r["metrics"] for r in self._board.replicas() if r.get("metrics")})


class IngressMetrics:
    def __init__(self, board):
        self.registry = CollectorRegistry()
        self.requests, self.requests_by_key, self.latency = http_metrics(self.registry)
        self.replicas = Gauge("flux_replicas", "Model replicas by state (Ray Serve)", ["state"], registry=self.registry)
        self.queue_depth = Gauge("flux_ingress_queue_depth", "Jobs of this ingress no replica has started yet",
                                 registry=self.registry)
        self.in_flight = Gauge("flux_ingress_in_flight", "Jobs of this ingress a replica is running",
                               registry=self.registry)
        self.job_metrics = JobMetrics(self.registry)  # the job store lives on the ingress
        self._board = board
        self.registry.register(_ReplicaCollector(board))

    def observe_result(self, timings_ms: dict, computed: int, skipped: int) -> None:
        """Observed by the replica that ran it (with its label), not again here."""

    def render(self, engine=None, ready: bool = False, job_counts: dict | None = None) -> bytes:
        self.job_metrics.set_counts(job_counts)
        for state, n in self._board.counts().items():
            if state != "total":
                self.replicas.labels(state).set(n)
        if engine is not None:
            self.queue_depth.set(engine.queue_depth)
            self.in_flight.set(engine.in_flight)
        return generate_latest(self.registry)
