"""Prometheus metrics at ``GET /metrics``: queue depth, job durations, errors by code, model step time.

One registry per app (tests build many apps in one process). Job metrics come from the engine's terminal
listener; HTTP error counts from a small ASGI wrapper that sees every response status.
"""

from __future__ import annotations

from prometheus_client import CollectorRegistry, Counter, Gauge, Histogram, generate_latest
from prometheus_client.exposition import CONTENT_TYPE_LATEST

from ccsr.jobs import SUCCESS, Job, JobEngine

from .limits import is_runware

DURATION_BUCKETS = (0.1, 0.25, 0.5, 1, 2.5, 5, 10, 30, 60, 120, 300, 600, 1800)
STEP_BUCKETS = (0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1, 2.5, 5, 10)


class Metrics:
    def __init__(self, engine: JobEngine):
        self.registry = CollectorRegistry()
        r = self.registry
        self.queue = Gauge("ccsr_queue_depth", "queued + running jobs", registry=r)
        self.queue.set_function(engine.store.active_count)
        self.jobs = Counter(
            "ccsr_jobs_total", "jobs that reached a terminal status", ["protocol", "status"], registry=r
        )
        self.duration = Histogram(
            "ccsr_job_duration_seconds",
            "submission to terminal status",
            ["protocol", "status"],
            buckets=DURATION_BUCKETS,
            registry=r,
        )
        self.run_time = Histogram(
            "ccsr_job_run_seconds", "start of processing to terminal status", buckets=DURATION_BUCKETS, registry=r
        )
        self.job_errors = Counter(
            "ccsr_job_errors_total", "failed or cancelled jobs by error code", ["code"], registry=r
        )
        self.step = Histogram(
            "ccsr_model_step_seconds",
            "inference seconds per sampling step (all tiles of the step) of successful jobs",
            buckets=STEP_BUCKETS,
            registry=r,
        )
        self.http_errors = Counter(
            "ccsr_http_errors_total", "HTTP responses with status >= 400", ["protocol", "status"], registry=r
        )
        engine.add_listener(self.on_job)

    def on_job(self, job: Job) -> None:
        proto = job.protocol or "unknown"
        self.jobs.labels(proto, job.status).inc()
        if job.finished_at and job.created_at:
            self.duration.labels(proto, job.status).observe(max(0.0, job.finished_at - job.created_at))
        if job.finished_at and job.started_at:
            self.run_time.observe(max(0.0, job.finished_at - job.started_at))
        if job.status == SUCCESS and job.result is not None:
            steps = getattr(job.params, "steps", None) or 0
            if steps > 0:
                self.step.observe(job.result.inference_seconds / steps)
        elif job.error is not None:
            self.job_errors.labels(job.error.code).inc()

    def exposition(self) -> tuple[bytes, str]:
        return generate_latest(self.registry), CONTENT_TYPE_LATEST


class HTTPErrorCounter:
    """ASGI wrapper: counts responses with status >= 400 by protocol (runware / other) and status."""

    def __init__(self, app, metrics: Metrics):
        self.app = app
        self.metrics = metrics

    async def __call__(self, scope, receive, send) -> None:
        if scope["type"] != "http":
            await self.app(scope, receive, send)
            return
        proto = "runware" if is_runware(scope.get("path", "")) else "other"

        async def counting_send(msg: dict) -> None:
            if msg["type"] == "http.response.start" and msg["status"] >= 400:
                self.metrics.http_errors.labels(proto, str(msg["status"])).inc()
            await send(msg)

        await self.app(scope, receive, counting_send)
