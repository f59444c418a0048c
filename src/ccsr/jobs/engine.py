"""The job engine: submission, state, waiting, cancellation, recovery, listeners; and the in-process executor.

``JobEngine`` is the only object protocol adapters talk to. It owns a :class:`~ccsr.jobs.store.JobStore`
(state + queue), an :class:`~ccsr.jobs.images.ImageStore` and an :class:`Executor` (who runs jobs). The
embedded default is SQLite + local disk + :class:`InProcessExecutor` (a worker thread per device owning the
model); a Celery executor and a Redis store slot in behind the same interfaces.
"""

from __future__ import annotations

import abc
import asyncio
import contextlib
import logging
import threading
import time
import traceback
from collections.abc import Callable
from dataclasses import dataclass
from typing import Protocol

from ccsr.logs import task_id

from .delivery import OnceDelivery, owed
from .images import ImageStore
from .store import JobStore
from .types import (
    CANCELLED,
    ERROR,
    PROCESSING,
    QUEUED,
    SUCCESS,
    ErrorCode,
    Job,
    JobError,
    JobNotFound,
    JobResult,
    JobSpec,
)

log = logging.getLogger("ccsr.jobs")

Listener = Callable[[Job], None]


class JobCancelled(Exception):
    """Raised by a runner (through ``should_cancel``) to stop a running job."""


class JobFailed(Exception):
    """Raised by a runner for an expected failure with a neutral :class:`ErrorCode`."""

    def __init__(self, code: str, message: str):
        super().__init__(message)
        self.code = code
        self.message = message


@dataclass(frozen=True)
class RunOutput:
    """What a runner produced: encoded bytes and their description."""

    data: bytes
    content_type: str
    extension: str
    width: int
    height: int
    seed: int | None
    input_width: int | None = None
    input_height: int | None = None


class Runner(Protocol):
    """Turns one job into an encoded image. Owns the model; called from one worker thread only. A runner may name
    the models it runs in a ``models`` mapping (:class:`~ccsr.jobs.runner.CCSRRunner` does); one without runs
    every model's jobs."""

    def load(self) -> None:
        """Load the model (once, in the worker thread, before the first job)."""

    def run(
        self,
        job: Job,
        input_bytes: bytes,
        *,
        progress: Callable[[float], None],
        should_cancel: Callable[[], bool],
        log: Callable[[str], None],
    ) -> RunOutput: ...



def execute(
    job: Job,
    images: ImageStore,
    runner: Runner,
    *,
    progress: Callable[[float], None],
    should_cancel: Callable[[], bool],
    log: Callable[[str], None],
) -> JobResult:
    """Run one job with ``runner`` and store its output: the part every executor shares (in-process or Celery)."""
    t0 = time.monotonic()
    data = images.read(job.input_image_id)
    if data is None:
        raise JobFailed(ErrorCode.INPUT_MISSING, f"input image {job.input_image_id} expired or was deleted")
    out = runner.run(job, data, progress=progress, should_cancel=should_cancel, log=log)
    if should_cancel():
        raise JobCancelled()
    secs = time.monotonic() - t0
    try:
        rec = images.put(
            out.data,
            content_type=out.content_type,
            extension=out.extension,
            width=out.width,
            height=out.height,
            ttl=job.output.ttl,
            image_id=job.output_image_id,
            kind="output",
        )
    except OSError as e:  # e.g. a full disk: the server's fault, not the model's, and it must say so
        raise JobFailed(ErrorCode.INTERNAL, f"could not store the output image: {e.strerror or e}") from e
    log(f"done in {secs:.2f}s: {out.width}x{out.height} {out.content_type}")
    return JobResult(
        image_id=rec.id,
        width=out.width,
        height=out.height,
        content_type=out.content_type,
        extension=rec.extension,
        size=rec.size,
        seed=out.seed,
        inference_seconds=round(secs, 4),
        cost=round(secs * job.cost_per_second, 6),
        input_width=out.input_width,
        input_height=out.input_height,
    )

CANCEL_POLL_S = 0.2  # how often an attempt asks the store whether its job was cancelled
PROGRESS_LOG_S = 1.0  # and how often a progress line goes into the job's log


def attempt(
    job: Job,
    store: JobStore,
    images: ImageStore,
    runner: Runner,
    *,
    cancel_requested: Callable[[], bool],
    finish: Callable[..., object],
    lost: Callable[[], bool] = lambda: False,
    time_limits: tuple[type[BaseException], ...] = (),
) -> str:
    """One attempt at a claimed job, the same for every executor (in-process or Celery): progress into the store
    (a log line at most every :data:`PROGRESS_LOG_S`), cancellation polled through ``cancel_requested``, the
    outcome handed to ``finish(status, result=|error=)``. ``lost``: the job is no longer this worker's (its lease
    ran out), so nothing is finished; ``time_limits``: exceptions that mean the worker's time limit. Returns the
    terminal status given (or ``lost``)."""
    last = [-1, 0.0]

    def progress(frac: float) -> None:
        p = min(99, int(max(0.0, min(1.0, frac)) * 100))  # 100 means stored
        if p != last[0]:
            last[0] = p
            store.set_progress(job.id, p)
            if time.monotonic() - last[1] > PROGRESS_LOG_S:
                last[1] = time.monotonic()
                store.append_log(job.id, f"progress {p}%")

    checked = [0.0, False]

    def should_cancel() -> bool:
        if lost():
            return True
        if time.monotonic() - checked[0] > CANCEL_POLL_S:
            checked[0] = time.monotonic()
            checked[1] = cancel_requested()
        return checked[1]

    def outcome(status: str, level: str, line: str, **kw) -> str:
        store.append_log(job.id, line, level)
        finish(status, **kw)
        return status

    try:
        result = execute(job, images, runner, progress=progress, should_cancel=should_cancel,
                         log=lambda m: store.append_log(job.id, m))
    except JobCancelled:
        if lost():
            log.warning("job %s: lease lost, stopped", job.id)
            return "lost"
        error = JobError(ErrorCode.CANCELLED, "cancelled while running")
        return outcome(CANCELLED, "WARNING", "cancelled", error=error)
    except time_limits:
        return outcome(ERROR, "ERROR", "time limit exceeded",
                       error=JobError(ErrorCode.TIMEOUT, "the job ran past the worker's time limit"))
    except JobFailed as e:
        return outcome(ERROR, "ERROR", f"failed: {e.message}", error=JobError(e.code, e.message))
    except Exception as e:
        log.error("job %s failed:\n%s", job.id, traceback.format_exc())
        code = ErrorCode.INVALID_PARAMS if isinstance(e, ValueError) else ErrorCode.INFERENCE_FAILED
        text = f"{type(e).__name__}: {e}"
        return outcome(ERROR, "ERROR", f"failed: {text}", error=JobError(code, text))
    finish(SUCCESS, result=result)
    return SUCCESS


class Executor(abc.ABC):
    """Who runs queued jobs. Started by :meth:`JobEngine.start` with the engine as its context."""

    @abc.abstractmethod
    def start(self, engine: JobEngine) -> None: ...

    @abc.abstractmethod
    def stop(self, timeout: float = 5.0) -> None: ...

    @abc.abstractmethod
    def ready_workers(self, model: str) -> int:
        """How many workers can run ``model``'s jobs now (loaded, warmed up where they warm up, alive)."""

    def wake(self) -> None:  # noqa: B027 - optional hook
        """A job was queued (hint)."""

    @property
    def load_error(self) -> str | None:
        return None


class JobEngine:
    """Protocol-neutral façade over a store, an image store and an executor. Thread-safe.

    ``outages``: the exceptions by which the store says it cannot be reached now (answered "retry later",
    never as an internal error); none for the local SQLite store."""

    outages: tuple[type[BaseException], ...] = ()

    def __init__(
        self,
        store: JobStore,
        images: ImageStore,
        executor: Executor,
        *,
        max_queue: int = 64,
        max_attempts: int = 2,
        sweep_interval: float = 60.0,
        delivery=None,
    ):
        self.store = store
        self.images = images
        self.executor = executor
        self.max_queue = max_queue
        self.max_attempts = max_attempts
        self.sweep_interval = sweep_interval
        self.delivery = delivery
        self._listeners: list[Listener] = []
        self._waiters: dict[str, list[tuple[asyncio.AbstractEventLoop, asyncio.Event]]] = {}
        self._wlock = threading.Lock()
        self._stop = threading.Event()
        self._sweeper: threading.Thread | None = None
        self._started = False

    # ------------------------------------------------------------------ lifecycle
    def start(self) -> None:
        if self._started:
            return
        self._started = True
        self.recover()
        self.executor.start(self)
        self._sweeper = threading.Thread(target=self._sweep_loop, name="ccsr-image-sweeper", daemon=True)
        self._sweeper.start()

    def stop(self, timeout: float = 5.0) -> None:
        """Stop taking jobs; wait up to ``timeout`` s for running ones to finish (graceful shutdown drains)."""
        self._stop.set()
        self.executor.stop(timeout)
        if self.delivery is not None:
            self.delivery.close()

    def recover(self) -> list[Job]:
        """After a restart: jobs cut off mid-run are queued again once, then failed with a clear error."""
        changed = []
        for job in self.store.list_status(PROCESSING):
            if job.attempts >= self.max_attempts:
                done = self.store.finish(
                    job.id,
                    ERROR,
                    error=JobError(
                        ErrorCode.INTERRUPTED,
                        f"the server stopped while running this job {job.attempts} times; giving up",
                    ),
                )
                if done is not None:
                    self.store.append_log(job.id, "interrupted again by a restart; failed", "ERROR")
                    changed.append(done)
            else:
                self.store.requeue(job.id)
                self.store.append_log(
                    job.id,
                    f"interrupted by a server restart; queued again (attempt {job.attempts + 1})",
                    "WARNING",
                )
                changed.append(self.store.get(job.id))
        for job_id in self.store.announcements():  # finished, but their deliveries never ended (incl. the above)
            if (job := self.store.get(job_id)) is not None:
                self._announced(job)
            else:
                self.store.acknowledge(job_id)
        return changed

    def _sweep_loop(self) -> None:
        while not self._stop.wait(self.sweep_interval):
            try:
                self.images.sweep()
            except Exception:  # pragma: no cover
                log.exception("image sweep failed")

    # ------------------------------------------------------------------ readiness
    def ready_workers(self, model: str) -> int:
        """Workers ready for ``model`` (``/readyz`` reports each served model's); may raise one of ``outages``."""
        return self.executor.ready_workers(model)

    @property
    def load_error(self) -> str | None:
        return self.executor.load_error

    # ------------------------------------------------------------------ jobs
    def submit(self, spec: JobSpec) -> tuple[Job, bool]:
        """Queue a job. Returns ``(job, created)``; raises ``QueueFull`` / ``JobConflict``."""
        spec.params.validate()
        job, created = self.store.create(spec, max_active=self.max_queue)
        if created:
            self.store.append_log(job.id, "queued")
            self.executor.wake()
        return job, created

    def get(self, job_id: str) -> Job | None:
        return self.store.get(job_id)

    def get_by_key(self, key: str) -> Job | None:
        return self.store.get_by_key(key)

    def queue_position(self, job_id: str) -> int | None:
        return self.store.queue_position(job_id)

    def cancel(self, job_id: str) -> Job:
        """Queued: cancelled at once. Processing: flagged, the runner stops between steps. Terminal: as is."""
        before = self.store.get(job_id)
        job = self.store.request_cancel(job_id)
        if job is None or before is None:
            raise JobNotFound(job_id)
        if before.status == QUEUED and job.status == CANCELLED:  # it ended here, not earlier
            self._announced(job)
        return job

    def add_listener(self, fn: Listener) -> None:
        """``fn(job)`` is called (from a worker thread) whenever a job reaches a terminal status.

        Filter on ``job.protocol``; never block for long (hand slow work to :attr:`delivery`).
        """
        self._listeners.append(fn)

    def _announce(self, job: Job, settle: Callable[[bool], None]) -> None:
        """Run a finished job's listeners, then ``settle(forget)`` once every delivery they started has ended:
        ``forget`` is False when one was cut off by shutdown, so the announcement stays owed and the listeners
        run again after a restart (the delivery markers skip what was already confirmed)."""
        if isinstance(self.delivery, OnceDelivery):
            with self.delivery.scope(job.id) as futures:
                self._emit(job)
        else:
            self._emit(job)
            futures = []
        if not futures:
            settle(True)
            return
        lock, left = threading.Lock(), [len(futures)]

        def one_ended(_f: object) -> None:
            with lock:
                left[0] -= 1
                last = left[0] == 0
            if last:
                settle(not owed(futures))

        for f in futures:
            f.add_done_callback(one_ended)

    def _announced(self, job: Job) -> None:
        """The embedded path: the store keeps the announcement (written with the terminal status) until then."""

        def settle(forget: bool) -> None:
            if forget:
                self.store.acknowledge(job.id)

        self._announce(job, settle)

    def _emit(self, job: Job) -> None:
        for fn in list(self._listeners):
            try:
                fn(job)
            except Exception:
                log.exception("job listener failed")
        self._notify(job.id)

    def _notify(self, job_id: str) -> None:
        with self._wlock:
            waiters = list(self._waiters.get(job_id, ()))
        for loop, ev in waiters:
            with contextlib.suppress(RuntimeError):
                loop.call_soon_threadsafe(ev.set)

    async def wait(self, job_id: str, timeout: float | None = None, *, poll: float = 0.5) -> Job | None:
        """Wait until the job is terminal or ``timeout`` passes; the latest snapshot (None if unknown)."""
        loop = asyncio.get_running_loop()
        ev = asyncio.Event()
        entry = (loop, ev)
        with self._wlock:
            self._waiters.setdefault(job_id, []).append(entry)
        deadline = None if timeout is None else time.monotonic() + timeout
        try:
            while True:
                job = self.store.get(job_id)
                if job is None or job.done:
                    return job
                remaining = None if deadline is None else deadline - time.monotonic()
                if remaining is not None and remaining <= 0:
                    return job
                ev.clear()
                with contextlib.suppress(TimeoutError):
                    await asyncio.wait_for(ev.wait(), poll if remaining is None else min(poll, remaining))
        finally:
            with self._wlock:
                lst = self._waiters.get(job_id)
                if lst is not None:
                    with contextlib.suppress(ValueError):
                        lst.remove(entry)
                    if not lst:
                        self._waiters.pop(job_id, None)

    # ------------------------------------------------------------------ executor callbacks
    def _finish(self, job_id: str, status: str, *, result=None, error=None) -> Job | None:
        job = self.store.finish(job_id, status, result=result, error=error)
        if job is not None:
            self._announced(job)
        return job


class InProcessExecutor(Executor):
    """One worker thread per runner (one per device): loads the model once, runs one job at a time."""

    def __init__(self, runners: list[Runner] | Runner, *, idle_poll: float = 0.5):
        self.runners = runners if isinstance(runners, list) else [runners]
        self.idle_poll = idle_poll
        self._threads: list[threading.Thread] = []
        self._wake = threading.Event()
        self._stop = threading.Event()
        self._ready = [False] * len(self.runners)
        self._load_error: str | None = None
        self.engine: JobEngine | None = None

    def ready_workers(self, model: str) -> int:
        """Loaded runners that run ``model`` (a runner without ``models`` runs every model's jobs)."""
        ready = (r for ok, r in zip(self._ready, self.runners, strict=True) if ok)
        return sum(model in getattr(r, "models", (model,)) for r in ready)

    @property
    def load_error(self) -> str | None:
        return self._load_error

    def start(self, engine: JobEngine) -> None:
        self.engine = engine
        for i, r in enumerate(self.runners):
            t = threading.Thread(target=self._loop, args=(i, r), name=f"ccsr-worker-{i}", daemon=True)
            t.start()
            self._threads.append(t)

    def stop(self, timeout: float = 5.0) -> None:
        self._stop.set()
        self._wake.set()
        for t in self._threads:
            t.join(timeout)

    def wake(self) -> None:
        self._wake.set()

    def _loop(self, index: int, runner: Runner) -> None:
        engine = self.engine
        assert engine is not None
        try:
            runner.load()
        except (ValueError, OSError) as e:  # weights/config problems: the message already says what to do
            self._load_error = f"{type(e).__name__}: {e}"
            log.error("model load failed: %s", e)
            return
        except Exception as e:
            self._load_error = f"{type(e).__name__}: {e}"
            log.exception("model load failed")
            return
        self._ready[index] = True
        log.info("worker %d ready", index)
        while not self._stop.is_set():
            job = engine.store.claim_next()
            if job is None:
                self._wake.wait(self.idle_poll)
                self._wake.clear()
                continue
            tid = job.meta.get("taskUUID") or job.id
            token = task_id.set(tid)  # every log line of this job, the model's included, carries it
            try:
                log.info("job %s started (attempt %d)", job.id, job.attempts, extra={"task_id": tid})
                status = self._run_one(engine, runner, job)
                log.info("job %s ended: %s", job.id, status, extra={"task_id": tid})
            finally:
                task_id.reset(token)

    def _run_one(self, engine: JobEngine, runner: Runner, job: Job) -> str:
        """Run one claimed job to its end; returns the terminal status it was given."""
        store = engine.store
        store.append_log(job.id, f"started (attempt {job.attempts})")
        engine._notify(job.id)

        def cancel_requested() -> bool:
            cur = store.get(job.id)
            return bool(cur is None or cur.cancel_requested)

        return attempt(job, store, engine.images, runner, cancel_requested=cancel_requested,
                       finish=lambda status, **kw: engine._finish(job.id, status, **kw))
