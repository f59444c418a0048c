"""The distributed backend: API replicas and GPU workers on Celery + Redis, images in S3 or a shared directory.

Same interfaces as the embedded engine (``ccsr.jobs``), so nothing under ``ccsr.api`` changes::

    from ccsr.jobs.distributed import build_distributed_engine
    engine = build_distributed_engine("redis://redis:6379/0", "s3://bucket/ccsr", max_queue=256)
    app = create_app(settings, engine=engine)          # one of N stateless API replicas

    ccsr worker --broker redis://redis:6379/0 --store s3://bucket/ccsr --device cuda:0   # one per GPU
    ccsr worker ... --model ccsr-v2=/models/ccsr-v2       # a worker of another model (or of several)

Pieces: :class:`RedisJobStore` (state, queue positions, idempotency, TTL, leases, events),
:class:`DistributedEngine` + :class:`CeleryExecutor` (replica side), :class:`WorkerRuntime` (worker side),
:class:`S3ImageStore` / :class:`SharedDirImageStore` (``image_store_from_url``), :class:`RedisMarkers`
(confirmed webhook / upload deliveries, for :class:`~ccsr.jobs.delivery.OnceDelivery`).
Needs the ``scale`` extra (celery[redis], redis, boto3 for S3).
"""

from __future__ import annotations

from collections.abc import Callable
from pathlib import Path

import redis

from ..delivery import OnceDelivery
from .celery_app import DEFAULT_QUEUE, TASK_NAME, make_celery, queue_for, send_job, sender
from .delivery import RedisMarkers
from .engine import CeleryExecutor, DistributedEngine, Maintenance
from .images import S3ImageStore, SharedDirImageStore, image_store_from_url
from .redis_store import RedisJobStore


def build_distributed_engine(
    broker_url: str,
    store_url: str | Path,
    *,
    max_queue: int = 64,
    image_ttl: float | None = 24 * 3600,
    job_ttl: float | None = None,
    fetch_allow_hosts: list[str] | None = None,
    prefix: str = "ccsr:",
    queue: str = DEFAULT_QUEUE,
    max_attempts: int = 2,
    claim_idle: float = 60.0,
    tick: float = 1.0,
    sweep_interval: float = 60.0,
    send: Callable[[str, str], None] | None = None,
) -> DistributedEngine:
    """One API replica's engine: job state in the Redis at ``broker_url`` (also Celery's broker), images at
    ``store_url``. ``max_queue`` bounds queued+running jobs across all replicas (429 beyond). ``send(job_id,
    model)`` hands a job to the workers (default: a Celery message on the model's queue, ``<queue>.<model>``)."""
    client = redis.Redis.from_url(broker_url)
    store = RedisJobStore(client, prefix=prefix, job_ttl=job_ttl or image_ttl or 24 * 3600, max_attempts=max_attempts)
    if send is None:
        send = sender(make_celery(broker_url, queue=queue), queue)
    executor = CeleryExecutor(store, send, claim_idle=claim_idle, tick=tick)
    return DistributedEngine(
        store,
        image_store_from_url(store_url, default_ttl=image_ttl),
        executor,
        max_queue=max_queue,
        max_attempts=max_attempts,
        sweep_interval=sweep_interval,
        delivery=OnceDelivery(RedisMarkers(client, prefix=prefix), allow_hosts=fetch_allow_hosts),
    )


__all__ = [
    "TASK_NAME",
    "CeleryExecutor",
    "DistributedEngine",
    "Maintenance",
    "RedisJobStore",
    "RedisMarkers",
    "S3ImageStore",
    "SharedDirImageStore",
    "build_distributed_engine",
    "image_store_from_url",
    "make_celery",
    "queue_for",
    "send_job",
    "sender",
]
