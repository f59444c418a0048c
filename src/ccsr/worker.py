"""``ccsr worker``: one Celery worker process per GPU for the distributed backend.

Run one per device (``--device cuda:0``, ``cuda:1`` ...). The pool process loads the model once, runs one
warm-up upscale, and only then registers as ready (API replicas' ``/readyz`` turns 200 once one worker has).
One job at a time: prefetch 1, late acknowledgement, message given back if the process dies, soft/hard time
limits and a broker visibility timeout above the hard limit (see ``ccsr.jobs.distributed.celery_app``).
``python -m ccsr.worker ...`` runs the same thing.
"""

from __future__ import annotations

import argparse
import logging
import os
import socket
import sys

_runtime = None  # the pool process's WorkerRuntime (created after the fork, where the model lives)


def _env(name: str, default=None):
    v = os.environ.get(name)
    return v if v not in (None, "") else default


def add_arguments(parser: argparse.ArgumentParser) -> None:
    g = parser.add_argument_group("worker")
    g.add_argument(
        "--broker",
        default=_env("CCSR_BROKER_URL"),
        help="Redis URL: Celery broker and job state, shared with the API replicas [CCSR_BROKER_URL]",
    )
    g.add_argument(
        "--store",
        default=_env("CCSR_STORE"),
        help="image store shared with the API replicas: s3://bucket/prefix[?endpoint_url=...] or a shared"
        " directory [CCSR_STORE]",
    )
    g.add_argument("--name", default=_env("CCSR_WORKER_NAME"), help="worker name [host-pid]")
    g.add_argument("--queue", default=_env("CCSR_QUEUE", "ccsr"), help="Celery queue [CCSR_QUEUE, ccsr]")
    g.add_argument("--prefix", default=_env("CCSR_REDIS_PREFIX", "ccsr:"), help=argparse.SUPPRESS)
    g.add_argument(
        "--soft-time-limit",
        type=float,
        default=float(_env("CCSR_SOFT_TIME_LIMIT", 1800)),
        help="seconds before a job fails with a timeout [CCSR_SOFT_TIME_LIMIT, 1800]",
    )
    g.add_argument(
        "--time-limit",
        type=float,
        default=_env("CCSR_TIME_LIMIT"),
        help="seconds before the worker process is killed [CCSR_TIME_LIMIT, soft + 60]",
    )
    g.add_argument(
        "--visibility-timeout",
        type=float,
        default=_env("CCSR_VISIBILITY_TIMEOUT"),
        help="seconds before the broker re-delivers an unacknowledged message; above the hard limit"
        " [CCSR_VISIBILITY_TIMEOUT, hard + 300]",
    )
    g.add_argument(
        "--lease",
        type=float,
        default=float(_env("CCSR_LEASE", 30)),
        help="a running job's lease: a worker silent this long is taken for dead [CCSR_LEASE, 30]",
    )
    g.add_argument(
        "--max-attempts",
        type=int,
        default=int(_env("CCSR_MAX_ATTEMPTS", 2)),
        help="runs of a job cut off by dying workers before it fails [CCSR_MAX_ATTEMPTS, 2]",
    )
    g.add_argument(
        "--image-ttl",
        type=float,
        default=float(_env("CCSR_IMAGE_TTL", 86400)),
        help="seconds outputs are kept [CCSR_IMAGE_TTL, 86400]",
    )
    g.add_argument("--no-warmup", action="store_true", help="skip the warm-up upscale before ready")
    g.add_argument("--log-level", default=_env("CCSR_LOG_LEVEL", "info"), help="[CCSR_LOG_LEVEL, info]")
    m = parser.add_argument_group("model")
    m.add_argument("--weights", default=_env("CCSR_WEIGHTS"), help="checkpoint file or hub reference")
    m.add_argument("--config", default=_env("CCSR_CONFIG"), help="model YAML")
    m.add_argument("--device", default=_env("CCSR_DEVICE", "auto"), help="cpu, cuda:0, ... [auto]")
    m.add_argument("--dtype", default=_env("CCSR_DTYPE", "auto"), help="float32, float16, bfloat16 [auto]")
    m.add_argument("--quantize", default=_env("CCSR_QUANTIZE"), help=argparse.SUPPRESS)
    m.add_argument(
        "--max-input-bytes",
        type=int,
        default=int(_env("CCSR_MAX_INPUT_BYTES", 50 * 1024 * 1024)),
        help="largest accepted input file [CCSR_MAX_INPUT_BYTES, 50 MiB]",
    )


def _build_runtime(args: argparse.Namespace, name: str, celery):
    """Runs in the pool process: connect, load the model, warm up, announce readiness."""
    import redis

    from ccsr.jobs.distributed import Maintenance, RedisJobStore, image_store_from_url, send_job
    from ccsr.jobs.distributed.worker_runtime import WorkerRuntime
    from ccsr.jobs.runner import CCSRRunner

    store = RedisJobStore(
        redis.Redis.from_url(args.broker),
        prefix=args.prefix,
        job_ttl=args.image_ttl,
        max_attempts=args.max_attempts,
    )
    runner = CCSRRunner(
        weights=args.weights,
        config=args.config,
        device=args.device,
        dtype=args.dtype,
        quantize=args.quantize,
        max_input_bytes=args.max_input_bytes,
    )
    runtime = WorkerRuntime(
        store,
        image_store_from_url(args.store, default_ttl=args.image_ttl),
        runner,
        name=name,
        lease=args.lease,
        heartbeat=min(5.0, args.lease / 3),
        warmup=not args.no_warmup,
        maintenance=Maintenance(store, lambda job_id: send_job(celery, job_id, args.queue)),
    )
    runtime.start()
    return runtime


def run(args: argparse.Namespace) -> int:
    from celery.signals import worker_process_init, worker_process_shutdown

    from ccsr.jobs.distributed import make_celery

    if not args.broker or not args.store:
        print("ccsr worker: --broker and --store are required (or CCSR_BROKER_URL, CCSR_STORE)", file=sys.stderr)
        return 2
    name = args.name or f"{socket.gethostname()}-{os.getpid()}"

    def handle(job_id: str) -> None:
        if _runtime is None:
            raise RuntimeError("the worker's model is not loaded")
        _runtime.process(job_id)

    try:
        celery = make_celery(
            args.broker,
            queue=args.queue,
            soft_time_limit=args.soft_time_limit,
            time_limit=float(args.time_limit) if args.time_limit else None,
            visibility_timeout=float(args.visibility_timeout) if args.visibility_timeout else None,
            handler=handle,
        )
    except ValueError as e:
        print(f"ccsr worker: {e}", file=sys.stderr)
        return 2
    logging.basicConfig(level=args.log_level.upper(), format="%(asctime)s %(levelname)s %(name)s: %(message)s")

    @worker_process_init.connect(weak=False)
    def _init(**_kw) -> None:
        global _runtime
        _runtime = _build_runtime(args, name, celery)

    @worker_process_shutdown.connect(weak=False)
    def _shutdown(**_kw) -> None:
        if _runtime is not None:
            _runtime.stop()

    celery.worker_main(
        [
            "worker",
            "--pool=prefork",
            "--concurrency=1",
            f"--queues={args.queue}",
            f"--hostname={name}@%h",
            f"--loglevel={args.log_level.upper()}",
            "--without-gossip",
            "--without-mingle",
            "--without-heartbeat",
        ]
    )
    return 0


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="ccsr worker", description="A GPU worker of the distributed backend")
    add_arguments(parser)
    return run(parser.parse_args(argv))


if __name__ == "__main__":
    sys.exit(main())
