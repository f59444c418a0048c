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


def submit(store, images, seed: int = 5, model: str = "ccsr-v1"):
    rec = images.put(b"in", content_type="image/png", width=1, height=1)
    return store.create(JobSpec(params=UpscaleParams(steps=2, seed=seed), input_image_id=rec.id, model=model))[0]


def runtime(store, images, behaviour=None, name: str = "w", **kw) -> WorkerRuntime:
    rt = WorkerRuntime(store, images, ScriptedRunner(behaviour), name=name, warmup=False, heartbeat=0.2, **kw)
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
    m = Maintenance(store, lambda job_id, model: sent.append(job_id), dispatch_grace=0.0)
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


def test_each_model_has_its_own_queue_and_turns(parts):
    """Jobs wait in their model's queue: positions count the jobs of the same model, a worker's message runs the
    oldest job of that message's model (a requeued one first) and never another model's; a message for a model the
    worker does not serve is handed back and sent again to its model's queue."""
    store, images = parts
    a = submit(store, images, seed=1)
    b = submit(store, images, seed=2, model="ccsr-v2")
    c = submit(store, images, seed=3)
    assert store.claim(a.id, "dead-worker", 0.05) == "claimed"
    time.sleep(0.2)
    assert store.reap(a.id) == "requeued"
    assert [store.queue_position(j.id) for j in (a, b, c)] == [0, 0, 1]
    assert store.queued_ids(10, "ccsr-v1") == [a.id, c.id] and store.queued_ids(10, "ccsr-v2") == [b.id]
    v1 = runtime(store, images, name="w1")
    assert v1.process(c.id) == "claimed"  # c's message: a's turn, a runs first
    assert store.get(a.id).status == "success" and store.get(c.id).status == "queued"
    assert store.get(b.id).status == "queued" and store.queue_position(b.id) == 0
    for j in (a, b, c):
        store.mark_dispatched(j.id)
    assert v1.process(b.id) == "misrouted" and store.get(b.id).status == "queued"
    sent: list[tuple[str, str]] = []
    Maintenance(store, lambda job_id, model: sent.append((job_id, model)), dispatch_grace=0.0).tick()
    assert sent == [(b.id, "ccsr-v2")]
    assert v1.process(c.id) == "claimed" and store.get(c.id).status == "success"
    v2 = runtime(store, images, name="w2", models={"ccsr-v2": {}})
    assert v2.process(b.id) == "claimed" and store.get(b.id).status == "success"
    for j, w in ((a, "w1"), (b, "w2"), (c, "w1")):
        assert any(ln.message == f"ran on {w}" for ln in store.get(j.id).logs), (j.id, w)
    v1.stop()
    v2.stop()


def test_workers_register_per_model_and_unserved_jobs_say_so(parts):
    store, images = parts
    v1 = runtime(store, images, name="w1")
    assert (store.live_workers(), store.live_workers("ccsr-v1"), store.live_workers("ccsr-v2")) == (1, 1, 0)
    job = submit(store, images, model="ccsr-v2")
    other = submit(store, images)
    m = Maintenance(store, lambda *_: None, dispatch_grace=0.0)
    m.tick()
    m.tick()
    waiting = [ln for ln in store.get(job.id).logs if "no worker serving ccsr-v2" in ln.message]
    assert len(waiting) == 1 and waiting[0].level == "WARNING", store.get(job.id).logs
    assert not any("no worker" in ln.message for ln in store.get(other.id).logs)
    v2 = runtime(store, images, name="w2", models={"ccsr-v2": {}})
    assert store.live_workers("ccsr-v2") == 1 and store.live_workers() == 2
    v2.stop()
    v1.stop()
    assert store.live_workers() == 0


def test_worker_options_come_from_the_settings_table(monkeypatch):
    """``ccsr worker``'s flags, variables and help are OPTIONS rows: shared ones mean the same for ``ccsr serve``
    (which does not take the worker's own); ``--model`` picks the models and so the queues; a ccsr-v2 worker
    needs its folder, a replica does not."""
    import argparse

    from ccsr import worker
    from ccsr.api import serve
    from ccsr.api.settings import Settings

    parser = argparse.ArgumentParser()
    worker.add_arguments(parser)
    text = parser.format_help()
    for flag, env in (("--broker", "CCSR_BROKER_URL"), ("--model", "CCSR_MODELS"), ("--queue", "CCSR_QUEUE"),
                      ("--lease", "CCSR_LEASE"), ("--no-warmup", "CCSR_NO_WARMUP"), ("--name", "CCSR_WORKER_NAME")):
        assert flag in text and env in text, flag
    monkeypatch.setenv("CCSR_LEASE", "7")
    monkeypatch.setenv("CCSR_NO_WARMUP", "yes")
    args = parser.parse_args(["--model", "ccsr-v1", "--model", "ccsr-v2=/m/v2", "--queue", "q", "--max-attempts", "3"])
    s = worker.settings_from_args(args)
    assert (s.lease, s.no_warmup, s.celery_queue, s.max_attempts) == (7.0, True, "q", 3)
    assert s.served_models(loading=True) == {"ccsr-v1": None, "ccsr-v2": "/m/v2"}
    with pytest.raises(ValueError, match="ccsr-v2=FOLDER"):
        Settings(broker_url="redis://x", models=["ccsr-v2"]).served_models(loading=True)
    assert Settings(broker_url="redis://x", models=["ccsr-v2"]).served_models() == {"ccsr-v2": None}
    sp = argparse.ArgumentParser()
    serve.add_arguments(sp)
    serve_help = sp.format_help()
    assert "--queue" in serve_help and "--max-attempts" in serve_help and "--lease" not in serve_help
    assert serve.settings_from_args(sp.parse_args(["--queue", "q"])).celery_queue == "q"
