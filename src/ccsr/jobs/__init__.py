"""The protocol-neutral job engine shared by every API surface (Runware, fal, the playground).

Stable API (protocol adapters use only this)
============================================

Building one (``ccsr.api.app.create_app`` does this for you; ``app.state.engine`` holds it)::

    from ccsr.jobs import build_embedded_engine, CCSRRunner
    engine = build_embedded_engine(data_dir, runner=CCSRRunner(weights, config, device="cpu"),
                                   max_queue=64, image_ttl=86400, fetch_allow_hosts=[...])
    engine.start()            # recovers jobs cut off by a restart, starts the worker thread(s)
    engine.stop()

Images (``engine.images``: :class:`ImageStore`; local disk by default, S3 later)::

    rec = engine.images.put(data, content_type="image/png", width=w, height=h, ttl=None, kind="input")
    rec.id, rec.extension, rec.filename, rec.content_type, rec.width, rec.height, rec.size, rec.expires_at
    engine.images.get(id) -> StoredImage | None          # None once expired (TTL)
    engine.images.read(id) -> bytes | None
    engine.images.path_of(id) -> Path | None             # for FileResponse

Jobs::

    spec = JobSpec(params=UpscaleParams(scale=2, steps=4, seed=1), input_image_id=rec.id,
                   output=OutputOptions(format="png"|"jpeg"|"webp", quality=None, ttl=None),
                   max_output=(4096, 4096) or None, protocol="fal", meta={...json...},
                   idempotency_key="fal:<id>" or None, payload_hash=payload_hash(body), cost_per_second=0.0)
    job, created = engine.submit(spec)    # raises QueueFull / QuotaFull (-> 429), JobConflict, ParamError
    engine.get(job.id) / engine.get_by_key("fal:<id>") -> Job | None
    engine.queue_position(job.id) -> int | None          # 0 = next; None when not queued
    engine.cancel(job.id) -> Job                          # queued: cancelled now; running: stops at a step
    job = await engine.wait(job.id, timeout=30)           # latest snapshot, terminal or not (None if unknown)
    engine.add_listener(fn)                               # fn(job) on every terminal transition (a thread)
    engine.delivery.post_json(url, body) / .put_bytes(url, data, content_type)   # retried, safe fetcher
    engine.ready_workers("ccsr-v1"), engine.load_error    # workers ready for a model; why loading failed

:class:`Job` fields: ``id, status`` (``queued|processing|success|error|cancelled``), ``params``
(:class:`~ccsr.params.UpscaleParams`), ``input_image_id, output`` (:class:`OutputOptions`),
``output_image_id`` (pre-allocated UUID the output will be stored under), ``max_output, protocol, meta,
idempotency_key, payload_hash, progress`` (0-100 over tiles x steps), ``result`` (:class:`JobResult`:
``image_id, width, height, content_type, extension, size, seed, inference_seconds, cost, input_width,
input_height``), ``error`` (:class:`JobError`: neutral ``code`` from :class:`ErrorCode` + ``message``),
``attempts, cancel_requested, created_at, started_at, finished_at, updated_at, logs`` (tuple of
:class:`LogLine`: ``timestamp, message, level``), and ``done`` / ``active``.

Durability: the SQLite store is the queue. On start, queued jobs run; jobs that were processing when the
process died are queued once more and fail with ``ErrorCode.INTERRUPTED`` if cut off again. Every terminal
status is written with an announcement that stays until the job's webhooks and uploads have ended (delivered,
or given up after their retries); on start, the listeners of announced jobs run again, and deliveries already
confirmed are skipped (:class:`OnceDelivery` with the store as its markers).

Swapping backends: implement :class:`JobStore` (e.g. Redis), :class:`ImageStore` (e.g. S3) and
:class:`Executor` (e.g. Celery workers calling the same :class:`Runner`), and build ``JobEngine(store,
images, executor)``; nothing under ``ccsr.api`` changes.
"""

from __future__ import annotations

from pathlib import Path

from .delivery import Delivery, OnceDelivery
from .engine import (
    Executor,
    InProcessExecutor,
    JobCancelled,
    JobEngine,
    JobFailed,
    Runner,
    RunOutput,
)
from .images import ImageStore, LocalImageStore, StoredImage
from .store import JobStore, SQLiteJobStore
from .types import (
    CANCELLED,
    DEFAULT_MODEL,
    ERROR,
    PROCESSING,
    QUEUED,
    SUCCESS,
    TERMINAL,
    ErrorCode,
    Job,
    JobConflict,
    JobError,
    JobNotFound,
    JobResult,
    JobsError,
    JobSpec,
    JobStatus,
    LogLine,
    OutputOptions,
    QueueFull,
    QuotaFull,
    payload_hash,
)


def build_embedded_engine(
    data_dir: str | Path,
    *,
    runner: Runner,
    max_queue: int = 64,
    image_ttl: float | None = 24 * 3600,
    fetch_allow_hosts: list[str] | None = None,
    sweep_interval: float = 60.0,
) -> JobEngine:
    """The no-services default: ``<data_dir>/jobs.db`` + ``<data_dir>/images/`` + one in-process worker."""
    data_dir = Path(data_dir)
    data_dir.mkdir(parents=True, exist_ok=True)
    store = SQLiteJobStore(data_dir / "jobs.db")
    return JobEngine(
        store,
        LocalImageStore(data_dir / "images", default_ttl=image_ttl),
        InProcessExecutor(runner),
        max_queue=max_queue,
        sweep_interval=sweep_interval,
        delivery=OnceDelivery(store, allow_hosts=fetch_allow_hosts),
    )


def __getattr__(name: str):
    # The model-backed runner imports torch lazily: only pay for it when a server really runs.
    if name == "CCSRRunner":
        from .runner import CCSRRunner

        return CCSRRunner
    raise AttributeError(name)


__all__ = [
    "CANCELLED",
    "DEFAULT_MODEL",
    "ERROR",
    "PROCESSING",
    "QUEUED",
    "SUCCESS",
    "TERMINAL",
    "CCSRRunner",
    "Delivery",
    "ErrorCode",
    "Executor",
    "ImageStore",
    "InProcessExecutor",
    "Job",
    "JobCancelled",
    "JobConflict",
    "JobEngine",
    "JobError",
    "JobFailed",
    "JobNotFound",
    "JobResult",
    "JobSpec",
    "JobStatus",
    "JobStore",
    "JobsError",
    "LocalImageStore",
    "LogLine",
    "OnceDelivery",
    "OutputOptions",
    "QueueFull",
    "QuotaFull",
    "RunOutput",
    "Runner",
    "SQLiteJobStore",
    "StoredImage",
    "build_embedded_engine",
    "payload_hash",
]
