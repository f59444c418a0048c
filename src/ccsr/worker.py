"""``ccsr worker``: one Celery worker process per GPU for the distributed backend.

Run one per device (``--device cuda:0``, ``cuda:1`` ...). ``--model`` chooses what it serves, as for ``ccsr
serve`` (default CCSR-v1 alone, from ``--weights``; ``--model ccsr-v2=FOLDER``; repeat it for a worker of both):
it consumes the Celery queue of each of those models (``ccsr.ccsr-v1``, ``ccsr.ccsr-v2``), where the API replicas
send each job by its model. The pool process loads the models once, runs one warm-up upscale per model, and only
then registers as ready, for each (a replica's ``/readyz`` turns 200 once each model it serves has a ready worker).
One job at a time: prefetch 1,
late acknowledgement, message given back if the process dies, soft/hard time limits and a broker visibility
timeout above the hard limit (see ``ccsr.jobs.distributed.celery_app``). Every option has a ``CCSR_*`` variable;
both come from :data:`ccsr.api.settings.OPTIONS`. ``python -m ccsr.worker ...`` runs the same thing.
"""

from __future__ import annotations

import argparse
import logging
import multiprocessing
import os
import signal
import socket
import sys

from ccsr.api import settings as settings_table
from ccsr.api.settings import Settings, settings_from_args

_runtime = None  # the pool process's WorkerRuntime (created after the fork, where the models live)
log = logging.getLogger("ccsr.worker")


def add_arguments(parser: argparse.ArgumentParser) -> None:
    """One flag per :data:`~ccsr.api.settings.OPTIONS` row that ``ccsr worker`` takes."""
    settings_table.add_arguments(parser, "worker")


def _build_runtime(s: Settings, models: dict[str, str | None], name: str, celery):
    """Runs in the pool process: connect, load the models, warm up, announce readiness."""
    import redis

    from ccsr.api.intake import MODELS_BY_NAME
    from ccsr.jobs.distributed import Maintenance, RedisJobStore, image_store_from_url, sender
    from ccsr.jobs.distributed.worker_runtime import WorkerRuntime
    from ccsr.jobs.runner import CCSRRunner

    store = RedisJobStore(
        redis.Redis.from_url(s.broker_url),
        prefix=s.redis_prefix,
        job_ttl=s.image_ttl,
        max_attempts=s.max_attempts,
    )
    runner = CCSRRunner(
        models=models,
        config=s.config,
        device=s.device,
        dtype=s.dtype,
        quantize=s.quantize,
        max_input_bytes=s.max_input_bytes,
    )
    runtime = WorkerRuntime(
        store,
        image_store_from_url(s.store_url, default_ttl=s.image_ttl),
        runner,
        name=name,
        models={m: MODELS_BY_NAME[m].defaults for m in models},
        lease=s.lease,
        heartbeat=min(5.0, s.lease / 3),
        warmup=not s.no_warmup,
        maintenance=Maintenance(store, sender(celery, s.celery_queue)),
    )
    runtime.start()
    return runtime


def run(args: argparse.Namespace) -> int:
    from celery.signals import worker_process_init, worker_process_shutdown

    from ccsr.jobs.distributed import make_celery, queue_for
    from ccsr.logs import configure

    s = settings_from_args(args)
    if not s.broker_url or not s.store_url:
        print("ccsr worker: --broker and --store are required (or CCSR_BROKER_URL, CCSR_STORE)", file=sys.stderr)
        return 2
    try:
        models = s.served_models(loading=True)
    except ValueError as e:
        print(f"ccsr worker: {e}", file=sys.stderr)
        return 2
    queues = [queue_for(m, s.celery_queue) for m in models]
    name = s.worker_name or f"{socket.gethostname()}-{os.getpid()}"

    def handle(job_id: str) -> None:
        if _runtime is None:  # the load failed and the worker is stopping: the message goes back to the queue
            from celery.exceptions import Reject

            raise Reject("the worker's models are not loaded", requeue=True)
        _runtime.process(job_id)

    try:
        celery = make_celery(
            s.broker_url,
            queue=queues[0],
            soft_time_limit=s.soft_time_limit,
            time_limit=s.time_limit,
            visibility_timeout=s.visibility_timeout,
            handler=handle,
        )
    except ValueError as e:
        print(f"ccsr worker: {e}", file=sys.stderr)
        return 2
    configure(s.log_level, s.log_format)
    log.info("worker %s serves %s from queues %s", name, ", ".join(models), ", ".join(queues))

    failed = multiprocessing.RawValue("b", 0)  # shared with the forked pool process

    @worker_process_init.connect(weak=False)
    def _init(**_kw) -> None:
        global _runtime
        try:
            _runtime = _build_runtime(s, models, name, celery)
        except Exception:  # a worker that cannot run its models must not take their jobs' messages
            log.exception("worker %s could not load or warm up %s: stopping", name, ", ".join(models))
            failed.value = 1
            os.kill(os.getppid(), signal.SIGTERM)

    @worker_process_shutdown.connect(weak=False)
    def _shutdown(**_kw) -> None:
        if _runtime is not None:
            _runtime.stop()

    celery.worker_main(
        [
            "worker",
            "--pool=prefork",
            "--concurrency=1",
            f"--queues={','.join(queues)}",
            f"--hostname={name}@%h",
            f"--loglevel={s.log_level.upper()}",
            "--without-gossip",
            "--without-mingle",
            "--without-heartbeat",
        ]
    )
    return 1 if failed.value else 0


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="ccsr worker", description="A GPU worker of the distributed backend")
    add_arguments(parser)
    return run(parser.parse_args(argv))


if __name__ == "__main__":
    sys.exit(main())
