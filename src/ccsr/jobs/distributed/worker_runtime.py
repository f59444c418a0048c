"""What one GPU worker process does with a job id: claim it, hold a lease, run it, store the output, finish.

The models are loaded and warmed up once, before the worker says it is ready (sorted-set entries in Redis, one
for any model and one per model it serves, read by the API replicas' ``/readyz`` and by :class:`Maintenance`).
While a job runs, its lease is renewed; a worker that dies stops renewing, the lease runs out, and
:class:`~ccsr.jobs.distributed.engine.Maintenance` (or the redelivered message) gives the job to another worker.
Finishing requires still holding the job, so a job is finished once, by one worker.
"""

from __future__ import annotations

import io
import logging
import threading
import time
import uuid
from collections.abc import Mapping

from celery.exceptions import SoftTimeLimitExceeded

from ccsr.params import UpscaleParams

from ..engine import Runner, attempt
from ..images import ImageStore
from ..types import DEFAULT_MODEL, PROCESSING, SUCCESS, Job, OutputOptions, now
from .engine import Maintenance
from .redis_store import RedisJobStore

log = logging.getLogger("ccsr.worker")


def warm_up(runner: Runner, model: str = DEFAULT_MODEL, defaults: Mapping[str, object] | None = None) -> float:
    """One tiny upscale with ``model`` (its parameter ``defaults``, one step, x2 of 64x64), so the first real job
    does not pay for lazy initialisation; returns seconds."""
    from PIL import Image

    buf = io.BytesIO()
    Image.new("RGB", (64, 64), (128, 96, 64)).save(buf, "PNG")
    tiny = {"scale": 2, "steps": 1, "seed": 0, "process_size": 128}
    job = Job(
        id="warm-up",
        status=PROCESSING,
        params=UpscaleParams(**{"size_mode": "pad", **(defaults or {}), **tiny}),  # type: ignore[arg-type]
        input_image_id="",
        output=OutputOptions(format="png"),
        output_image_id="",
        model=model,
    )
    t0 = time.monotonic()
    runner.run(job, buf.getvalue(), progress=lambda _f: None, should_cancel=lambda: False, log=lambda _m: None)
    return time.monotonic() - t0


class WorkerRuntime:
    """One job at a time, of the models the runner loads. ``start()`` loads and warms up; ``process(job_id)``
    runs one job. ``models``: the model names this worker serves, each with its parameter defaults (its warm-up
    runs with them); default CCSR-v1 alone."""

    def __init__(
        self,
        store: RedisJobStore,
        images: ImageStore,
        runner: Runner,
        *,
        name: str,
        models: Mapping[str, Mapping[str, object]] | None = None,
        lease: float = 30.0,
        heartbeat: float = 5.0,
        warmup: bool = True,
        maintenance: Maintenance | None = None,
    ):
        self.store = store
        self.images = images
        self.runner = runner
        self.name = name
        self.models = dict(models) if models is not None else {DEFAULT_MODEL: {}}
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
        log.info("worker %s: %s loaded in %.1fs", self.name, ", ".join(self.models), time.monotonic() - t0)
        if self.warmup:
            for model, defaults in self.models.items():
                log.info("worker %s: %s warmed up in %.1fs", self.name, model, warm_up(self.runner, model, defaults))
        self._announce()
        self._thread = threading.Thread(target=self._beat, name="ccsr-worker-heartbeat", daemon=True)
        self._thread.start()
        log.info("worker %s ready", self.name)

    def _registries(self) -> list[str]:
        return [self.store.key("workers"), *(self.store.key("workers", m) for m in self.models)]

    def stop(self) -> None:
        self._stop.set()
        for key in self._registries():
            self.store.redis.zrem(key, self.name)

    def _announce(self) -> None:
        pipe = self.store.redis.pipeline(transaction=False)
        for key in self._registries():
            pipe.zadd(key, {self.name: now() + 3 * self.heartbeat})
            pipe.zremrangebyscore(key, 0, now())
        pipe.execute()

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

        Every queued job has a message on its model's queue, but a message is a turn, not an assignment: the
        model's queue order decides, so its oldest queued job runs first. A job requeued after its worker died is
        back at its old place in the queue and runs next (as its queue position says), not behind the messages
        sent since; the message naming it is spent by whichever job of that model is last. A message for a model
        this worker does not serve (a queue consumed by mistake) is sent again, to its model's queue, by the next
        :class:`Maintenance` tick (``misrouted``), so the job keeps its turn."""
        model = self.store.model_of(job_id)
        if model is None:
            log.info("job %s not run here: missing", job_id)
            return "missing"
        if model not in self.models:
            log.warning("job %s is for %s, which this worker does not serve (%s): sent back to its queue",
                        job_id, model, ", ".join(self.models))
            self.store.mark_undispatched(job_id)  # Maintenance, here or in a replica, sends it again
            return "misrouted"
        token = f"{self.name}:{uuid.uuid4().hex[:12]}"
        outcome = "missing"
        for candidate in dict.fromkeys([*self.store.queued_ids(limit=10, model=model), job_id]):
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
