"""What one GPU worker process does with a job id: claim it, hold a lease, run it, store the output, finish.

The model is loaded and warmed up once, before the worker says it is ready (a sorted-set entry in Redis that
the API replicas' ``/readyz`` reads). While a job runs, its lease is renewed; a worker that dies stops
renewing, the lease runs out, and :class:`~ccsr.jobs.distributed.engine.Maintenance` (or the redelivered
message) gives the job to another worker. Finishing requires still holding the job, so a job is finished
once, by one worker.
"""

from __future__ import annotations

import io
import logging
import threading
import time
import uuid

from celery.exceptions import SoftTimeLimitExceeded

from ccsr.params import UpscaleParams

from ..engine import Runner, attempt
from ..images import ImageStore
from ..types import PROCESSING, SUCCESS, Job, OutputOptions, now
from .engine import Maintenance
from .redis_store import RedisJobStore

log = logging.getLogger("ccsr.worker")


def warm_up(runner: Runner) -> float:
    """One tiny upscale, so the first real job does not pay for lazy initialisation; returns seconds."""
    from PIL import Image

    buf = io.BytesIO()
    Image.new("RGB", (64, 64), (128, 96, 64)).save(buf, "PNG")
    job = Job(
        id="warm-up",
        status=PROCESSING,
        params=UpscaleParams(scale=2, steps=1, seed=0, size_mode="pad"),
        input_image_id="",
        output=OutputOptions(format="png"),
        output_image_id="",
    )
    t0 = time.monotonic()
    runner.run(job, buf.getvalue(), progress=lambda _f: None, should_cancel=lambda: False, log=lambda _m: None)
    return time.monotonic() - t0


class WorkerRuntime:
    """One model, one job at a time. ``start()`` loads and warms up; ``process(job_id)`` runs one job."""

    def __init__(
        self,
        store: RedisJobStore,
        images: ImageStore,
        runner: Runner,
        *,
        name: str,
        lease: float = 30.0,
        heartbeat: float = 5.0,
        warmup: bool = True,
        maintenance: Maintenance | None = None,
    ):
        self.store = store
        self.images = images
        self.runner = runner
        self.name = name
        self.lease = lease
        self.heartbeat = heartbeat
        self.warmup = warmup
        self.maintenance = maintenance
        self._stop = threading.Event()
        self._thread: threading.Thread | None = None

    # ------------------------------------------------------------------ lifecycle
    def start(self) -> None:
        t0 = time.monotonic()
        self.runner.load()
        log.info("worker %s: model loaded in %.1fs", self.name, time.monotonic() - t0)
        if self.warmup:
            log.info("worker %s: warmed up in %.1fs", self.name, warm_up(self.runner))
        self._announce()
        self._thread = threading.Thread(target=self._beat, name="ccsr-worker-heartbeat", daemon=True)
        self._thread.start()
        log.info("worker %s ready", self.name)

    def stop(self) -> None:
        self._stop.set()
        self.store.redis.zrem(self.store.key("workers"), self.name)

    def _announce(self) -> None:
        r = self.store.redis
        key = self.store.key("workers")
        r.zadd(key, {self.name: now() + 3 * self.heartbeat})
        r.zremrangebyscore(key, 0, now())

    def _beat(self) -> None:
        while not self._stop.wait(self.heartbeat):
            try:
                self._announce()
                if self.maintenance is not None:
                    self.maintenance.tick()
            except Exception as e:  # Redis blips must not kill the heartbeat
                log.warning("worker heartbeat: %s", e)

    # ------------------------------------------------------------------ one job
    def process(self, job_id: str) -> str:
        """Claim and run one job for one message; returns the claim outcome (``claimed`` when a job ran).

        Every queued job has a message, but a message is a turn, not an assignment: the queue's order decides,
        so the oldest queued job runs first. A job requeued after its worker died is back at its old place in
        the queue and runs next (as its queue position says), not behind the messages sent since; the message
        naming it is spent by whichever job is last."""
        token = f"{self.name}:{uuid.uuid4().hex[:12]}"
        outcome = "missing"
        for candidate in dict.fromkeys([*self.store.queued_ids(limit=10), job_id]):
            outcome = self.store.claim(candidate, token, self.lease)
            if outcome == "claimed":
                job_id = candidate
                break
        else:
            log.info("job %s not run here: %s", job_id, outcome)
            return outcome
        job = self.store.get(job_id)
        lost = threading.Event()
        done = threading.Event()

        def keep_lease() -> None:
            while not done.wait(self.lease / 3):
                try:
                    if not self.store.renew(job_id, token, self.lease):
                        lost.set()
                        return
                except Exception as e:
                    log.warning("lease renewal of %s: %s", job_id, e)

        keeper = threading.Thread(target=keep_lease, name="ccsr-lease", daemon=True)
        keeper.start()
        try:
            if job is not None:
                self._run(job, token, lost)
        finally:
            done.set()
            keeper.join()
        return outcome

    def _run(self, job: Job, token: str, lost: threading.Event) -> None:
        store = self.store

        def cancel_requested() -> bool:
            return store.redis.hget(store.key("job", job.id), "cancel_requested") in (None, b"1")

        def finish(status: str, **kw) -> None:
            if status == SUCCESS:
                store.append_log(job.id, f"ran on {self.name}")
            if store.finish_claimed(job.id, token, status, **kw) is None:
                log.warning("job %s was taken from this worker; its result is dropped", job.id)

        attempt(job, store, self.images, self.runner, cancel_requested=cancel_requested, finish=finish,
                lost=lost.is_set, time_limits=(SoftTimeLimitExceeded,))


__all__ = ["WorkerRuntime", "warm_up"]
