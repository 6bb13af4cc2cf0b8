"""Prometheus metrics, one registry per app (so tests can run several apps in one process)."""
from __future__ import annotations

from prometheus_client import CollectorRegistry, Counter, Gauge, Histogram, generate_latest

STAGE_BUCKETS = (0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1, 2.5, 5, 10, 30, 60, 120, 300)


def http_metrics(registry: CollectorRegistry) -> tuple[Counter, Counter, Histogram]:
    """The HTTP layer's own families (the middleware counts and times every request, the key guard counts per key),
    in `registry`: the local server's Metrics and the Ray Serve ingress's (kontext_server/serving/ray_serve/metrics.py)
    both have them. Returns (requests, requests_by_key, latency)."""
    requests = Counter("flux_requests_total", "HTTP requests by endpoint and status", ["endpoint", "status"],
                       registry=registry)
    # Only with API keys or a rate limit. key_id: a key's id (8 hex characters of its SHA-256), never the key;
    # "none" / "invalid" for requests refused for a missing / unknown key; "anonymous" without keys.
    requests_by_key = Counter("flux_requests_by_key_total", "Requests to keyed routes by key id and status",
                              ["key_id", "status"], registry=registry)
    latency = Histogram("flux_request_seconds", "End-to-end request latency", ["endpoint"], buckets=STAGE_BUCKETS,
                        registry=registry)
    return requests, requests_by_key, latency


class Metrics:
    def __init__(self):
        self.registry = CollectorRegistry()
        r = self.registry
        self.requests, self.requests_by_key, self.latency = http_metrics(r)
        self.stage = Histogram("flux_stage_seconds", "Generation time per stage", ["stage"],
                               buckets=STAGE_BUCKETS, registry=r)
        self.queue_wait = Histogram("flux_queue_wait_seconds", "Time a job waited for the GPU worker",
                                    buckets=STAGE_BUCKETS, registry=r)
        self.queue_depth = Gauge("flux_queue_depth", "Jobs waiting for the GPU worker", registry=r)
        self.in_flight = Gauge("flux_in_flight", "Jobs running on the GPU worker", registry=r)
        self.steps = Counter("flux_transformer_steps_total", "Transformer evaluations", ["kind"], registry=r)
        self.gpu_memory = Gauge("flux_gpu_memory_bytes", "GPU memory", ["kind"], registry=r)
        self.ready = Gauge("flux_ready", "1 when the service is ready to serve", registry=r)
        self.job_metrics = JobMetrics(r)

    def observe_result(self, timings_ms: dict, computed: int, skipped: int) -> None:
        for stage in ("text_encode", "image_encode", "transformer", "vae_decode", "glue", "total"):
            if stage in timings_ms:
                self.stage.labels(stage).observe(timings_ms[stage] / 1000)
        self.steps.labels("computed").inc(computed)
        self.steps.labels("skipped").inc(skipped)

    def render(self, engine=None, ready: bool = False, job_counts: dict | None = None) -> bytes:
        self.job_metrics.set_counts(job_counts)
        if engine is not None:
            self.queue_depth.set(engine.queue_depth)
            self.in_flight.set(engine.in_flight)
        self.ready.set(1 if ready else 0)
        try:
            import torch

            if torch.cuda.is_available():
                self.gpu_memory.labels("allocated").set(torch.cuda.memory_allocated())
                self.gpu_memory.labels("reserved").set(torch.cuda.memory_reserved())
                self.gpu_memory.labels("peak_allocated").set(torch.cuda.max_memory_allocated())
        except Exception:  # pragma: no cover
            pass
        return generate_latest(self.registry)


class JobMetrics:
    """The asynchronous jobs' families (kontext_server.jobstore), in `registry`: the local server's Metrics and the
    Ray Serve ingress's (which holds the job store there) both have them."""

    FAMILIES = ("flux_jobs", "flux_job_queue_depth", "flux_jobs_submitted", "flux_jobs_finished",
                "flux_job_age_seconds", "flux_webhook_deliveries")

    def __init__(self, r: CollectorRegistry):
        self.jobs = Gauge("flux_jobs", "Jobs in the job store by status (pending, running, ready, error)",
                          ["status"], registry=r)
        self.job_queue_depth = Gauge("flux_job_queue_depth", "Async jobs waiting to run (pending)", registry=r)
        self.jobs_submitted = Counter("flux_jobs_submitted_total", "Async job submissions by outcome "
                                      "(accepted, rejected: 429)", ["outcome"], registry=r)
        self.jobs_finished = Counter("flux_jobs_finished_total", "Async jobs finished, by final status",
                                     ["status"], registry=r)
        self.job_age = Histogram("flux_job_age_seconds", "A job's age when it finished (submit to answer)",
                                 buckets=STAGE_BUCKETS + (600, 1800, 3600), registry=r)
        self.webhook_deliveries = Counter("flux_webhook_deliveries_total", "Webhook delivery attempts by outcome "
                                          "(delivered, retry: failed and retried later, failed: given up)",
                                          ["outcome"], registry=r)

    def on_job_event(self, name: str, **info) -> None:
        """The job manager's events (kontext_server.jobstore.manager)."""
        if name == "accepted":
            self.jobs_submitted.labels("accepted").inc()
        elif name == "finished":
            self.jobs_finished.labels(info["status"]).inc()
            self.job_age.observe(info["age_s"])

    def set_counts(self, job_counts: dict | None) -> None:
        if job_counts is not None:
            for status in ("pending", "running", "ready", "error"):
                self.jobs.labels(status).set(job_counts.get(status, 0))
            self.job_queue_depth.set(job_counts.get("pending", 0))
