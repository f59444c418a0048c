"""The API-replica side of the distributed backend: :class:`DistributedEngine` and :class:`CeleryExecutor`.

Protocol adapters see the same :class:`~ccsr.jobs.engine.JobEngine`; what differs:

- ``submit`` stores the job in Redis (idempotency, queue bound) and sends a Celery message; a job whose
  message could not be sent (broker down, replica killed in between) is sent later by :class:`Maintenance`.
  A missing seed is drawn at submission, so a re-run after a lost worker gives the same pixels.
- Workers finish jobs in Redis; each replica hears every change on a pub/sub channel (waiters wake, progress
  is live everywhere) and the replicas share the terminal-event stream through a consumer group, so each
  finished job's listeners (webhooks, uploads) run on exactly one replica, and again elsewhere if it dies.
- No restart recovery: leases and :class:`Maintenance` bring back jobs whose worker died.
"""

from __future__ import annotations

import dataclasses
import logging
import os
import secrets
import socket
import threading
import time
import uuid
from collections.abc import Callable

import redis

from ..engine import Executor, JobEngine
from ..types import Job, JobNotFound, JobSpec, now
from .redis_store import RedisJobStore

log = logging.getLogger("ccsr.jobs.distributed")

GROUP = "api"


def consumer_name() -> str:
    return f"{socket.gethostname()}-{os.getpid()}-{uuid.uuid4().hex[:6]}"


class Maintenance:
    """Brings back jobs nobody runs: orphaned processing jobs (lease ran out) are requeued or failed, and
    queued jobs without a sent message are (re)sent, each on its model's queue (``send(job_id, model)``). A queued
    job whose model no live worker serves gets one warning line in its log (it waits: nothing else can run it).
    Safe to run in every replica and worker at once."""

    def __init__(self, store: RedisJobStore, send: Callable[[str, str], None], *, dispatch_grace: float = 5.0):
        self.store = store
        self.send = send
        self.dispatch_grace = dispatch_grace

    def dispatch(self, job_id: str) -> bool:
        model = self.store.model_of(job_id)
        if model is None:  # expired meanwhile: nothing to send
            self.store.mark_dispatched(job_id)
            return False
        try:
            self.send(job_id, model)
        except Exception as e:  # broker unreachable: the next tick tries again
            log.warning("could not send job %s to the broker: %s", job_id, e)
            return False
        self.store.mark_dispatched(job_id)
        return True

    def tick(self) -> None:
        for job_id in self.store.processing_ids():
            outcome = self.store.reap(job_id)
            if outcome in ("requeued", "failed"):
                log.warning("job %s lost its worker: %s", job_id, outcome)
        for job_id in self.store.undispatched(now() - self.dispatch_grace):
            lock = self.store.key("dispatching", job_id)
            if self.store.redis.set(lock, "1", nx=True, ex=max(1, int(self.dispatch_grace))):
                self.dispatch(job_id)
        self.warn_unserved()

    def warn_unserved(self) -> None:
        """One log line on each queued job of a model that no live worker serves."""
        for model in self.store.queued_models():
            if self.store.live_workers(model):
                continue
            for job_id in self.store.queued_ids(limit=1 << 20, model=model):
                self.store.note_once(job_id, "unserved", f"no worker serving {model} is ready: the job waits in "
                                     f"the queue until one is (ccsr worker --model {model}[=WEIGHTS])")


class CeleryExecutor(Executor):
    """Hands jobs to Celery workers and keeps this replica in step with them."""

    def __init__(
        self,
        store: RedisJobStore,
        send: Callable[[str, str], None],
        *,
        claim_idle: float = 60.0,
        tick: float = 1.0,
        dispatch_grace: float = 5.0,
    ):
        self.store = store
        self.maintenance = Maintenance(store, send, dispatch_grace=dispatch_grace)
        self.claim_idle = claim_idle
        self.tick_interval = tick
        self.name = consumer_name()
        self.engine: JobEngine | None = None
        self._stop = threading.Event()
        self._threads: list[threading.Thread] = []
        self._inflight: set[str] = set()  # stream entries whose deliveries are still running here
        self._lock = threading.Lock()

    # ------------------------------------------------------------------ Executor
    def ready_workers(self, model: str) -> int:
        """Live workers that announced ``model`` ready (:class:`~.worker_runtime.WorkerRuntime`); raises
        ``redis.RedisError`` in an outage."""
        return self.store.live_workers(model)

    def start(self, engine: JobEngine) -> None:
        self.engine = engine
        try:
            self.store.redis.xgroup_create(self.store.terminal_stream, GROUP, id="0", mkstream=True)
        except redis.ResponseError as e:
            if "BUSYGROUP" not in str(e):
                raise
        for target, name in (
            (self._listen, "ccsr-events"),
            (self._consume, "ccsr-terminal"),
            (self._maintain, "ccsr-maintenance"),
        ):
            t = threading.Thread(target=self._forever, args=(target,), name=name, daemon=True)
            t.start()
            self._threads.append(t)

    def stop(self, timeout: float = 5.0) -> None:
        self._stop.set()
        for t in self._threads:
            t.join(timeout)

    def dispatch(self, job_id: str) -> None:
        self.maintenance.dispatch(job_id)

    # ------------------------------------------------------------------ threads
    def _forever(self, target: Callable[[], None]) -> None:
        while not self._stop.is_set():
            try:
                target()
            except redis.RedisError as e:
                log.warning("redis: %s; retrying", e)
                self._stop.wait(1.0)
            except Exception:
                log.exception("distributed executor thread failed; restarting it")
                self._stop.wait(1.0)

    def _listen(self) -> None:
        """Every change anywhere wakes this replica's waiters (sync requests, WebSocket, fal status)."""
        ps = self.store.redis.pubsub(ignore_subscribe_messages=True)
        ps.subscribe(self.store.events_channel)
        try:
            while not self._stop.is_set():
                msg = ps.get_message(timeout=1.0)
                if msg and self.engine is not None:
                    self.engine._notify(msg["data"].decode())
        finally:
            ps.close()

    def _consume(self) -> None:
        r = self.store.redis
        while not self._stop.is_set():
            got = r.xreadgroup(GROUP, self.name, {self.store.terminal_stream: ">"}, count=16, block=1000)
            for _stream, entries in got or ():
                for entry_id, fields in entries:
                    self._handle(entry_id.decode(), fields[b"job"].decode())

    def _handle(self, entry_id: str, job_id: str) -> None:
        """Run the listeners of one finished job here; acknowledge once its deliveries have ended (an entry
        whose deliveries were cut off by shutdown stays pending, and another replica claims it)."""
        engine = self.engine
        job = self.store.get(job_id)
        if engine is None or job is None:
            self._ack(entry_id)
            return
        with self._lock:
            self._inflight.add(entry_id)

        def settle(forget: bool) -> None:
            with self._lock:
                self._inflight.discard(entry_id)
            if forget:
                self._ack(entry_id)

        engine._announce(job, settle)

    def _ack(self, entry_id: str) -> None:
        self.store.redis.xack(self.store.terminal_stream, GROUP, entry_id)

    def _maintain(self) -> None:
        r = self.store.redis
        stream = self.store.terminal_stream
        last_claim = 0.0
        while not self._stop.wait(self.tick_interval):
            self.maintenance.tick()
            with self._lock:
                mine = list(self._inflight)
            if mine:  # still delivering: reset the idle time so no other replica takes them over
                r.xclaim(stream, GROUP, self.name, 0, mine, justid=True)
            if time.monotonic() - last_claim >= min(self.claim_idle / 3, 10.0):
                last_claim = time.monotonic()
                _next, claimed, *_ = r.xautoclaim(
                    stream, GROUP, self.name, int(self.claim_idle * 1000), "0-0", count=16
                )
                for entry_id, fields in claimed:
                    if fields and entry_id.decode() not in mine:
                        log.info("taking over the delivery of %s from a lost replica", fields[b"job"].decode())
                        self._handle(entry_id.decode(), fields[b"job"].decode())


class DistributedEngine(JobEngine):
    """A :class:`JobEngine` over :class:`RedisJobStore` + :class:`CeleryExecutor` (see the module doc)."""

    executor: CeleryExecutor
    store: RedisJobStore
    outages = (redis.exceptions.ConnectionError, redis.exceptions.TimeoutError)

    def recover(self) -> list[Job]:
        return []  # workers' leases and Maintenance recover jobs; a replica restart changes nothing

    def submit(self, spec: JobSpec) -> tuple[Job, bool]:
        if spec.params.seed is None:
            spec = dataclasses.replace(spec, params=spec.params.replace(seed=secrets.randbelow(2**32)))
        spec.params.validate()
        job, created = self.store.create(spec, max_active=self.max_queue)
        if created:
            self.executor.dispatch(job.id)
        return job, created

    def shared_secret(self, name: str) -> bytes:
        """A random key every replica agrees on (created by the first to ask), e.g. for signed upload tokens."""
        key = self.store.key("secret", name)
        self.store.redis.set(key, secrets.token_hex(32), nx=True)
        return bytes.fromhex(self.store.redis.get(key).decode())

    def cancel(self, job_id: str) -> Job:
        """Queued: cancelled now (announced on the stream like any end); running: the worker stops."""
        job = self.store.request_cancel(job_id)
        if job is None:
            raise JobNotFound(job_id)
        return job
