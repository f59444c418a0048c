"""The worker side without a model: time limits, cancellation, lost leases, missing inputs; the Celery
settings; Maintenance re-sending and re-queueing; delivery markers. A scripted runner stands in for CCSR."""

from __future__ import annotations

import time

import pytest

from ccsr.jobs import ErrorCode, JobSpec, RunOutput
from ccsr.jobs.delivery import OnceDelivery
from ccsr.jobs.distributed import Maintenance, RedisJobStore, RedisMarkers, SharedDirImageStore, make_celery
from ccsr.jobs.distributed.worker_runtime import WorkerRuntime
from ccsr.params import UpscaleParams

pytestmark = pytest.mark.timeout(60)


class ScriptedRunner:
    """Reports progress, then does what ``behaviour(should_cancel)`` says (raise, wait, or return)."""

    def __init__(self, behaviour=None):
        self.behaviour = behaviour
        self.loaded = 0

    def load(self) -> None:
        self.loaded += 1

    def run(self, job, input_bytes, *, progress, should_cancel, log) -> RunOutput:
        progress(0.5)
        log("scripted")
        if self.behaviour is not None:
            self.behaviour(should_cancel)
        return RunOutput(b"out:" + input_bytes, "image/png", "png", 2, 2, job.params.seed)


@pytest.fixture
def parts(rclient, prefix, tmp_path):
    store = RedisJobStore(rclient, prefix=prefix)
    images = SharedDirImageStore(tmp_path / "img")
    return store, images


def submit(store, images, seed: int = 5):
    rec = images.put(b"in", content_type="image/png", width=1, height=1)
    return store.create(JobSpec(params=UpscaleParams(steps=2, seed=seed), input_image_id=rec.id))[0]


def runtime(store, images, behaviour=None, **kw) -> WorkerRuntime:
    rt = WorkerRuntime(store, images, ScriptedRunner(behaviour), name="w", warmup=False, heartbeat=0.2, **kw)
    rt.start()
    return rt


def test_success_and_readiness(parts):
    store, images = parts
    rt = runtime(store, images)
    assert store.redis.zscore(store.key("workers"), "w") > time.time()
    job = submit(store, images)
    assert rt.process(job.id) == "claimed"
    done = store.get(job.id)
    assert done.status == "success" and done.result.seed == 5 and images.read(done.result.image_id) == b"out:in"
    assert rt.process(job.id) == "done"  # a redelivered message does nothing
    assert rt.runner.loaded == 1
    rt.stop()
    assert store.redis.zscore(store.key("workers"), "w") is None


def test_soft_time_limit_fails_with_timeout(parts):
    from celery.exceptions import SoftTimeLimitExceeded

    store, images = parts

    def too_long(_should_cancel):
        raise SoftTimeLimitExceeded()

    rt = runtime(store, images, too_long)
    job = submit(store, images)
    rt.process(job.id)
    assert store.get(job.id).error.code == ErrorCode.TIMEOUT
    rt.stop()


def test_cancel_from_another_replica_while_running(parts, redis_url, prefix):
    store, images = parts
    other = RedisJobStore(redis_url, prefix=prefix)
    job = submit(store, images)

    def wait_for_cancel(should_cancel):
        other.request_cancel(job.id)
        end = time.monotonic() + 5
        while not should_cancel() and time.monotonic() < end:
            time.sleep(0.05)

    rt = runtime(store, images, wait_for_cancel)
    rt.process(job.id)
    got = store.get(job.id)
    assert got.status == "cancelled" and got.error.code == ErrorCode.CANCELLED
    rt.stop()


def test_lost_lease_drops_the_result(parts):
    store, images = parts
    job = submit(store, images)

    def lose_lease(should_cancel):
        store.redis.delete(store.key("lease", job.id))  # as if this worker had been silent too long
        assert store.reap(job.id) == "requeued"
        end = time.monotonic() + 5
        while not should_cancel() and time.monotonic() < end:
            time.sleep(0.05)

    rt = runtime(store, images, lose_lease, lease=0.3)
    rt.process(job.id)
    got = store.get(job.id)
    assert got.status == "queued" and got.result is None and got.attempts == 1
    assert images.get(got.output_image_id) is None
    rt.runner.behaviour = None
    assert rt.process(job.id) == "claimed" and store.get(job.id).status == "success"
    rt.stop()


def test_missing_input_is_a_clear_error(parts):
    store, images = parts
    job = submit(store, images)
    images.delete(job.input_image_id)
    rt = runtime(store, images)
    rt.process(job.id)
    assert store.get(job.id).error.code == ErrorCode.INPUT_MISSING
    rt.stop()


def test_maintenance_sends_unsent_and_requeues_orphans(parts):
    store, images = parts
    sent: list[str] = []
    m = Maintenance(store, sent.append, dispatch_grace=0.0)
    a = submit(store, images)
    b = submit(store, images)
    store.mark_dispatched(b.id)
    m.tick()
    assert sent == [a.id]  # b's message went out at submission
    m.tick()
    assert sent == [a.id]  # sent once
    store.claim(b.id, "dead:t", 0.05)
    time.sleep(0.1)
    store.redis.delete(store.key("dispatching", b.id))
    m.tick()
    assert store.get(b.id).status == "queued" and sent == [a.id, b.id]


def test_celery_settings_for_long_gpu_jobs():
    app = make_celery("redis://127.0.0.1:1/0", soft_time_limit=100, handler=lambda _id: None)
    c = app.conf
    assert c.task_acks_late and c.task_reject_on_worker_lost and c.worker_prefetch_multiplier == 1
    assert (c.task_soft_time_limit, c.task_time_limit) == (100, 160)
    assert c.broker_transport_options["visibility_timeout"] > c.task_time_limit
    assert "ccsr.run_job" in app.tasks
    with pytest.raises(ValueError, match="visibility_timeout"):
        make_celery("redis://127.0.0.1:1/0", time_limit=100, visibility_timeout=50)


def test_delivery_marker_prevents_a_second_send(rclient, prefix, sink):
    d = OnceDelivery(RedisMarkers(rclient, prefix=prefix), allow_hosts=[f"127.0.0.1:{sink.port}"], attempts=1)
    url = f"{sink.base}/once-{prefix}"
    try:
        for _ in range(2):  # the second time: a replica that took over an unacknowledged announcement
            with d.scope("job-1") as futures:
                d.post_json(url, {"n": 1})
            for f in futures:
                assert f.result(10)
        assert sum(1 for _m, path, _b in sink.requests if path == f"/once-{prefix}") == 1
    finally:
        d.close()


def test_worker_cli_needs_broker_and_store(monkeypatch, capsys):
    import argparse

    from ccsr import worker

    monkeypatch.delenv("CCSR_BROKER_URL", raising=False)
    monkeypatch.delenv("CCSR_STORE", raising=False)
    parser = argparse.ArgumentParser()
    worker.add_arguments(parser)
    args = parser.parse_args(["--store", "/tmp/x"])
    assert worker.run(args) == 2 and "--broker" in capsys.readouterr().err
    args = parser.parse_args(
        ["--broker", "redis://127.0.0.1:1/0", "--store", "/tmp/x", "--time-limit", "10", "--visibility-timeout", "5"]
    )
    assert worker.run(args) == 2 and "visibility_timeout" in capsys.readouterr().err


def test_requeued_job_keeps_its_place(parts):
    """A job whose worker died goes back to its old place: the next message, whichever job it names, runs it."""
    store, images = parts
    first, second = submit(store, images, seed=1), submit(store, images, seed=2)
    assert store.claim(first.id, "dead-worker", 0.05) == "claimed"  # a worker takes it, then dies
    time.sleep(0.2)
    assert store.reap(first.id) == "requeued"
    assert store.queue_position(first.id) == 0 and store.queue_position(second.id) == 1
    rt = runtime(store, images)
    assert rt.process(second.id) == "claimed"  # the message sent for the second job
    assert store.get(first.id).status == "success" and store.get(second.id).status == "queued"
    assert store.queue_position(second.id) == 0
    assert rt.process(first.id) == "claimed"  # the requeue's own message runs what is left
    assert store.get(second.id).status == "success"
    rt.stop()
