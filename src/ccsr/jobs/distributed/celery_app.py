"""The Celery application: one task, ``ccsr.run_job(job_id)``, configured for minutes-long GPU jobs.

Celery's defaults suit millisecond tasks; for GPU work a worker must hold exactly the message it runs
(prefetch 1), acknowledge it only when the job is over (``acks_late``), give it back when its process dies
(``reject_on_worker_lost``), and the Redis transport must not hand an unacknowledged message to another
worker while the first one may still be running it (``visibility_timeout`` above the hard time limit).
The message carries only the job id: the job itself lives in the :class:`RedisJobStore`. Each model has its own
queue, ``<base>.<model>`` (:func:`queue_for`): a worker consumes the queues of the models it loads.
"""

from __future__ import annotations

from collections.abc import Callable

from celery import Celery

TASK_NAME = "ccsr.run_job"
DEFAULT_QUEUE = "ccsr"  # the base of the queue names
DEFAULT_SOFT_TIME_LIMIT = 1800.0  # a job running longer fails with ErrorCode.TIMEOUT
DEFAULT_HARD_MARGIN = 60.0  # then the worker process is killed
DEFAULT_VISIBILITY_MARGIN = 300.0


def make_celery(
    broker_url: str,
    *,
    queue: str = DEFAULT_QUEUE,
    soft_time_limit: float = DEFAULT_SOFT_TIME_LIMIT,
    time_limit: float | None = None,
    visibility_timeout: float | None = None,
    handler: Callable[[str], None] | None = None,
) -> Celery:
    """A configured app. API replicas only send (``handler`` None); workers pass the function running a job."""
    hard = time_limit if time_limit is not None else soft_time_limit + DEFAULT_HARD_MARGIN
    visibility = visibility_timeout if visibility_timeout is not None else hard + DEFAULT_VISIBILITY_MARGIN
    if visibility <= hard:
        raise ValueError(f"visibility_timeout ({visibility}s) must exceed the hard time limit ({hard}s)")
    app = Celery("ccsr", broker=broker_url, set_as_current=False)
    app.conf.update(
        task_default_queue=queue,
        task_acks_late=True,
        task_reject_on_worker_lost=True,
        task_acks_on_failure_or_timeout=True,
        task_ignore_result=True,  # state lives in the job store, not a result backend
        task_soft_time_limit=soft_time_limit,
        task_time_limit=hard,
        task_serializer="json",
        accept_content=["json"],
        worker_prefetch_multiplier=1,
        worker_concurrency=1,  # one process per GPU
        worker_proc_alive_timeout=600.0,  # the model loads in the pool process before it says hello
        worker_hijack_root_logger=False,
        broker_connection_retry_on_startup=True,
        broker_transport_options={
            "visibility_timeout": visibility,
            "unacked_restore_interval": 10,
            "unacked_restore_throttle": 1,
        },
    )
    if handler is not None:

        @app.task(name=TASK_NAME, acks_late=True, reject_on_worker_lost=True)
        def run_job(job_id: str) -> None:
            handler(job_id)

    return app


def queue_for(model: str, base: str = DEFAULT_QUEUE) -> str:
    """The Celery queue of ``model``'s jobs (``ccsr.ccsr-v2``)."""
    return f"{base}.{model}"


def send_job(app: Celery, job_id: str, queue: str) -> None:
    app.send_task(TASK_NAME, args=[job_id], queue=queue)


def sender(app: Celery, base: str = DEFAULT_QUEUE) -> Callable[[str, str], None]:
    """``send(job_id, model)``: a job's message, on its model's queue."""
    return lambda job_id, model: send_job(app, job_id, queue_for(model, base))
