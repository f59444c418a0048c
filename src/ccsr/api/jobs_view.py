"""Submitted jobs as both protocol adapters see them, after :func:`ccsr.api.intake.submit`: found again for the
request that names them (:func:`find`), placed in the queue (:func:`queue_position`), followed to their end under
the request's time bounds (:func:`follow`), and their end announced to the URLs the request gave
(:func:`announce_ends`). Protocol-neutral: refusals are :class:`~ccsr.api.intake.IntakeError`\\ s, bodies are
made by the caller.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
from collections.abc import AsyncGenerator, Awaitable, Callable
from typing import Any

from ccsr.jobs import QUEUED, SUCCESS, Job

from .intake import IntakeError

log = logging.getLogger("ccsr.api.jobs")

POLL_S = 0.5  # a follower looks at its job this often (at once when it ends)
WEBHOOK, UPLOAD = "webhook", "upload"  # job.meta: where the end is POSTed, where the output is PUT


def find(engine, job_id: str, protocol: str, **meta: Any) -> Job | None:
    """The job ``job_id`` if it was submitted through ``protocol`` with these ``meta`` values (a fal request
    belongs to its app id), else None: an id from another protocol or app is not found."""
    job = engine.get(job_id)
    if job is None or job.protocol != protocol or any(job.meta.get(k) != v for k, v in meta.items()):
        return None
    return job


def queue_position(engine, job: Job) -> int | None:
    """Jobs ahead of ``job`` in the queue (0: next), or None once it has left the queue."""
    return engine.queue_position(job.id) if job.status == QUEUED else None


async def follow(
    engine,
    job_id: str,
    *,
    timeout: float,
    start_timeout: float | None = None,
    gone: Callable[[], Awaitable[bool]] | None = None,
    cancel: bool = True,
) -> AsyncGenerator[Job, None]:
    """The job's snapshot now, then every :data:`POLL_S` (at once when it ends), the last one terminal.

    Bounds, each an :class:`IntakeError`: ``timeout`` (seconds in all), ``start_timeout`` (seconds still
    queued), ``client_gone`` (``gone()`` says the client went away); ``job_missing`` if the store lost it.
    With ``cancel``, a job left before its end (a bound, or the consumer stopping: a closed or cancelled
    stream) is cancelled: nobody is left to receive its result. Without it, it runs on (to be polled).
    """
    loop = asyncio.get_running_loop()
    end = loop.time() + timeout
    start_end = None if start_timeout is None else loop.time() + start_timeout
    ended = False
    try:
        job = engine.get(job_id)
        while True:
            if job is None:
                raise IntakeError("job_missing", "the job vanished from the store")
            ended = job.done
            yield job
            if ended:
                return
            if gone is not None and await gone():
                raise IntakeError("client_gone", "the client went away")
            if start_end is not None and job.status == QUEUED and loop.time() > start_end:
                raise IntakeError("start_timeout", "Request timed out before processing started")
            if loop.time() > end:
                raise IntakeError("timeout", f"request timed out after {timeout:g}s")
            job = await engine.wait(job_id, timeout=POLL_S)
    finally:
        if cancel and not ended:
            log.info("job %s: no longer followed before its end; cancelled", job_id)
            # shielded: the consumer may be being cancelled itself (a stream whose client went away)
            with contextlib.suppress(Exception):
                await asyncio.shield(asyncio.to_thread(engine.cancel, job_id))


async def last(snapshots: AsyncGenerator[Job, None]) -> Job:
    """The final snapshot of :func:`follow` (its terminal job), the stream closed on every path."""
    async with contextlib.aclosing(snapshots):
        async for job in snapshots:
            if job.done:
                return job
    raise AssertionError("follow() ends with a terminal job or raises")


def announce_ends(engine, protocol: str, body: Callable[[Job], dict]) -> None:
    """When a job of ``protocol`` ends: POST ``body(job)`` to its ``meta["webhook"]`` and, when it succeeded,
    PUT its output to its ``meta["upload"]``, both through the engine's delivery (retried, owed across
    restarts). URLs were checked at submit (:func:`ccsr.api.intake.check_outbound`)."""

    def listener(job: Job) -> None:
        delivery = engine.delivery
        if job.protocol != protocol or delivery is None:
            return
        if url := job.meta.get(WEBHOOK):
            delivery.post_json(url, body(job))
        if (url := job.meta.get(UPLOAD)) and job.status == SUCCESS and job.result is not None:
            data = engine.images.read(job.result.image_id)
            if data is not None:
                delivery.put_bytes(url, data, job.result.content_type)

    engine.add_listener(listener)
