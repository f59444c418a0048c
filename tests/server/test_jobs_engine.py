"""The job engine on its own (in-process, a stand-in runner): idempotency, bounded queue, cancellation,
restart recovery, image TTL. The model-backed paths are covered against a real server in test_runware*.py
and test_restart*.py."""

from __future__ import annotations

import asyncio
import dataclasses
import threading
import time

import pytest

from ccsr.jobs import (
    CANCELLED,
    ERROR,
    PROCESSING,
    QUEUED,
    SUCCESS,
    ErrorCode,
    InProcessExecutor,
    JobCancelled,
    JobConflict,
    JobEngine,
    JobSpec,
    LocalImageStore,
    OutputOptions,
    QueueFull,
    QuotaFull,
    RunOutput,
    SQLiteJobStore,
)
from ccsr.params import UpscaleParams


class FakeRunner:
    """Waits on a gate per job so tests control timing; checks should_cancel like the real sampler does."""

    def __init__(self):
        self.gate = threading.Event()
        self.gate.set()
        self.loaded = 0
        self.ran: list[str] = []

    def load(self):
        self.loaded += 1

    def run(self, job, input_bytes, *, progress, should_cancel, log):
        for i in range(20):
            while not self.gate.wait(0.01):
                if should_cancel():
                    raise JobCancelled()
            if should_cancel():
                raise JobCancelled()
            progress((i + 1) / 20)
        self.ran.append(job.id)
        w, h = int(8 * job.params.scale), int(8 * job.params.scale)
        return RunOutput(b"out:" + input_bytes, "image/png", "png", w, h, job.params.seed)


def make_engine(tmp_path, runner=None, **kw):
    runner = runner or FakeRunner()
    eng = JobEngine(
        SQLiteJobStore(tmp_path / "jobs.db"),
        LocalImageStore(tmp_path / "images"),
        InProcessExecutor(runner, idle_poll=0.02),
        **kw,
    )
    return eng, runner


def spec(eng, key=None, h="h", **params):
    rec = eng.images.put(b"input", content_type="image/png", width=8, height=8, kind="input")
    return JobSpec(
        params=UpscaleParams(scale=2, steps=2, seed=5, **params),
        input_image_id=rec.id,
        output=OutputOptions(format="png"),
        protocol="test",
        meta={"k": 1},
        idempotency_key=key,
        payload_hash=h,
    )


def wait_until(pred, timeout=10.0):
    end = time.monotonic() + timeout
    while time.monotonic() < end:
        if pred():
            return True
        time.sleep(0.01)
    return False


def test_submit_runs_once_and_stores_output(tmp_path):
    eng, runner = make_engine(tmp_path)
    seen = []
    eng.add_listener(seen.append)
    eng.start()
    try:
        job, created = eng.submit(spec(eng, key="t:1"))
        assert created and job.status == QUEUED and job.output_image_id
        done = asyncio.run(eng.wait(job.id, 10))
        assert done.status == SUCCESS and done.progress == 100
        assert done.result.image_id == job.output_image_id
        assert (done.result.width, done.result.height) == (16, 16)
        assert eng.images.read(done.result.image_id) == b"out:input"
        assert [j.id for j in seen] == [job.id]
        assert runner.loaded == 1
        assert any("started" in line.message for line in done.logs)
        # identical retry: same job, not run again
        again, created2 = eng.submit(spec(eng, key="t:1"))
        assert not created2 and again.id == job.id
        with pytest.raises(JobConflict):
            eng.submit(spec(eng, key="t:1", h="other"))
        assert runner.ran == [job.id]
    finally:
        eng.stop()


def test_bounded_queue_and_cancel(tmp_path):
    eng, runner = make_engine(tmp_path, max_queue=2)
    runner.gate.clear()
    eng.start()
    try:
        a, _ = eng.submit(spec(eng))
        b, _ = eng.submit(spec(eng))
        with pytest.raises(QueueFull):
            eng.submit(spec(eng))
        assert wait_until(lambda: eng.get(a.id).status == PROCESSING)
        assert eng.queue_position(b.id) == 0
        # queued: cancelled at once; running: stops at the next step
        assert eng.cancel(b.id).status == CANCELLED
        eng.cancel(a.id)
        assert wait_until(lambda: eng.get(a.id).status == CANCELLED)
        assert eng.get(a.id).error.code == ErrorCode.CANCELLED
        c, _ = eng.submit(spec(eng))  # room again
        runner.gate.set()
        assert asyncio.run(eng.wait(c.id, 10)).status == SUCCESS
    finally:
        eng.stop()


def test_restart_recovery_retries_once_then_fails(tmp_path):
    # simulate "killed mid-run": jobs left in processing with 1 and 2 attempts, plus a queued one
    store = SQLiteJobStore(tmp_path / "jobs.db")
    eng0 = JobEngine(store, LocalImageStore(tmp_path / "images"), InProcessExecutor(FakeRunner()))
    j1, _ = store.create(spec(eng0))
    j2, _ = store.create(spec(eng0))
    j3, _ = store.create(spec(eng0))
    assert store.claim_next().id == j1.id
    assert store.claim_next().id == j2.id
    store.requeue(j2.id)
    assert store.claim_next().id == j2.id  # j2 now on its second attempt
    store.close()

    eng, _ = make_engine(tmp_path)
    eng.start()
    try:
        for j in (j1, j3):
            assert asyncio.run(eng.wait(j.id, 10)).status == SUCCESS
        failed = eng.get(j2.id)
        assert failed.status == ERROR and failed.error.code == ErrorCode.INTERRUPTED
        assert "giving up" in failed.error.message
        assert any("restart" in line.message for line in eng.get(j1.id).logs)
    finally:
        eng.stop()


def test_image_ttl_expiry(tmp_path):
    store = LocalImageStore(tmp_path / "img", default_ttl=3600)
    keep = store.put(b"a", content_type="image/png", width=1, height=1)
    gone = store.put(b"b", content_type="image/jpeg", width=1, height=1, ttl=0.05)
    forever = store.put(b"c", content_type="image/webp", width=1, height=1, ttl=0)
    assert gone.extension == "jpg" and forever.expires_at is None
    time.sleep(0.1)
    assert store.get(gone.id) is None and store.read(gone.id) is None
    assert store.read(keep.id) == b"a" and store.read(forever.id) == b"c"
    assert store.sweep() == 1
    assert store.get("../../etc/passwd") is None


def test_delivery_retries_with_backoff_and_stops_on_refusal():
    import json
    from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer

    from ccsr.jobs import Delivery

    seen: list[tuple[str, str, bytes]] = []

    class Handler(BaseHTTPRequestHandler):
        def do_POST(self):
            body = self.rfile.read(int(self.headers.get("content-length") or 0))
            seen.append((self.command, self.path, body))
            # /flaky fails twice (a busy receiver), /gone is a permanent refusal
            status = 404 if self.path == "/gone" else (503 if len(seen) <= 2 else 200)
            self.send_response(status)
            self.send_header("content-length", "0")
            self.end_headers()

        do_PUT = do_POST

        def log_message(self, *a):
            pass

    srv = ThreadingHTTPServer(("127.0.0.1", 0), Handler)
    threading.Thread(target=srv.serve_forever, daemon=True).start()
    base = f"http://127.0.0.1:{srv.server_address[1]}"
    d = Delivery(allow_hosts=[f"127.0.0.1:{srv.server_address[1]}"], base_delay=0.01)
    try:
        assert d.post_json(f"{base}/flaky", {"data": [1]}).result(10) is True
        assert [json.loads(b) for _, _, b in seen] == [{"data": [1]}] * 3
        assert d.history[-1]["attempts"] == 3
        assert d.put_bytes(f"{base}/gone", b"x", "image/png").result(10) is False
        assert d.history[-1]["attempts"] == 1 and len(seen) == 4  # a 404 is not retried
        # without the allow-list entry, loopback is refused before any connection is made
        assert Delivery(base_delay=0.01).post_json(f"{base}/flaky", {}).result(10) is False
        assert len(seen) == 4
    finally:
        d.close()
        srv.shutdown()


def durable_engine(tmp_path, sink, *, attempts=100, base_delay=0.05):
    """The embedded engine's pieces, with a listener that posts to /<dir>-ok/<job> and /<dir>-hook/<job>."""
    from ccsr.jobs import OnceDelivery

    store = SQLiteJobStore(tmp_path / "jobs.db")
    host = f"127.0.0.1:{sink.port}"
    delivery = OnceDelivery(store, allow_hosts=[host], attempts=attempts, base_delay=base_delay, max_delay=0.05)
    eng = JobEngine(store, LocalImageStore(tmp_path / "images"), InProcessExecutor(FakeRunner(), idle_poll=0.02),
                    delivery=delivery)
    for kind in ("ok", "hook"):
        url = f"{sink.base}/{tmp_path.name}-{kind}/"
        eng.add_listener(lambda job, url=url: eng.delivery.post_json(url + job.id, {}))
    return eng


def test_deliveries_cut_off_by_a_stop_are_sent_after_the_restart(tmp_path, sink):
    hook = f"/{tmp_path.name}-hook/"
    sink.refusing.add(hook)  # the receiver is down
    eng = durable_engine(tmp_path, sink)
    eng.start()
    job, _ = eng.submit(spec(eng))
    ok, hook = f"/{tmp_path.name}-ok/{job.id}", hook + job.id
    assert wait_until(lambda: sink.hits(hook) >= 2)  # being retried
    assert eng.store.announcements() == [job.id]
    eng.stop()  # the retrying delivery is cut off: still owed
    time.sleep(0.2)  # (the delivery thread notices the stop within its backoff)
    assert eng.delivery.history[-1]["ok"] is True  # /ok, the one delivery that ended
    assert SQLiteJobStore(tmp_path / "jobs.db").announcements() == [job.id]
    assert (sink.hits(ok, 200), sink.hits(hook, 200)) == (1, 0)

    sink.refusing.clear()
    again = durable_engine(tmp_path, sink)
    again.start()  # recovery runs the finished job's listeners again
    try:
        assert wait_until(lambda: sink.hits(hook, 200) == 1)
        assert wait_until(lambda: again.store.announcements() == [])
        assert sink.hits(ok) == 1  # confirmed before the stop: not sent a second time
    finally:
        again.stop()

    third = durable_engine(tmp_path, sink)
    third.start()  # nothing is owed any more: nothing is sent
    try:
        time.sleep(0.3)
        assert (sink.hits(ok), sink.hits(hook, 200)) == (1, 1)
    finally:
        third.stop()


def test_a_delivery_that_gives_up_is_not_owed(tmp_path, sink):
    hook = f"/{tmp_path.name}-hook/"
    sink.refusing.add(hook)
    try:
        eng = durable_engine(tmp_path, sink, attempts=2, base_delay=0.01)
        eng.start()
        try:
            job, _ = eng.submit(spec(eng))
            hook += job.id
            assert wait_until(lambda: sink.hits(hook) == 2)
            assert wait_until(lambda: eng.store.announcements() == [])  # ended: given up after its retries
        finally:
            eng.stop()
    finally:
        sink.refusing.clear()
    again = durable_engine(tmp_path, sink)
    again.start()
    try:
        time.sleep(0.3)
        assert sink.hits(hook) == 2
    finally:
        again.stop()


def test_cancel_announces_once(tmp_path):
    eng, runner = make_engine(tmp_path)
    runner.gate.clear()
    seen = []
    eng.add_listener(seen.append)
    eng.start()
    try:
        a, _ = eng.submit(spec(eng))
        assert wait_until(lambda: eng.get(a.id).status == PROCESSING)
        b, _ = eng.submit(spec(eng))
        assert eng.cancel(b.id).status == CANCELLED
        assert eng.cancel(b.id).status == CANCELLED  # cancelling again changes nothing and announces nothing
        assert [j.id for j in seen] == [b.id]
        runner.gate.set()
        assert asyncio.run(eng.wait(a.id, 10)).status == SUCCESS
        assert wait_until(lambda: [j.id for j in seen] == [b.id, a.id])
        assert wait_until(lambda: eng.store.announcements() == [])  # no deliveries: forgotten at once
    finally:
        eng.stop()


def test_the_log_names_how_a_job_ended(tmp_path, caplog):
    eng, runner = make_engine(tmp_path)
    runner.gate.clear()
    eng.start()
    try:
        with caplog.at_level("INFO", logger="ccsr.jobs"):
            job, _ = eng.submit(spec(eng))
            assert wait_until(lambda: eng.get(job.id).status == PROCESSING)
            eng.cancel(job.id)
            assert wait_until(lambda: f"job {job.id} ended: cancelled" in caplog.text)
            done, _ = eng.submit(spec(eng))
            runner.gate.set()
            assert wait_until(lambda: f"job {done.id} ended: success" in caplog.text)
        assert f"job {job.id} ended: success" not in caplog.text
    finally:
        eng.stop()


def test_owner_quota_is_counted_by_the_store(tmp_path):
    eng, runner = make_engine(tmp_path)
    runner.gate.clear()
    eng.start()
    try:
        mine = dict(owner="alpha", owner_quota=1)
        a, _ = eng.submit(dataclasses.replace(spec(eng), **mine))
        with pytest.raises(QuotaFull):
            eng.submit(dataclasses.replace(spec(eng), **mine))
        eng.submit(dataclasses.replace(spec(eng), owner="bravo", owner_quota=1))
        eng.cancel(a.id)
        assert wait_until(lambda: eng.get(a.id).done)
        eng.submit(dataclasses.replace(spec(eng), **mine))  # the ended job freed the place
    finally:
        runner.gate.set()
        eng.stop()
    # the count lives in the database: a restarted engine over it still sees alpha's queued job
    again, _ = make_engine(tmp_path)
    with pytest.raises(QuotaFull):
        again.submit(dataclasses.replace(spec(again), **mine))


def test_the_store_records_each_jobs_model_and_reads_older_databases(tmp_path):
    """A job keeps the model it was submitted for across a reopen; a database from before models (no ``model``
    column) is migrated, its jobs read as CCSR-v1's."""
    import sqlite3

    path = tmp_path / "jobs.db"
    store = SQLiteJobStore(path)
    eng = JobEngine(store, LocalImageStore(tmp_path / "images"), InProcessExecutor(FakeRunner()))
    v2, _ = store.create(dataclasses.replace(spec(eng), model="ccsr-v2"))
    store.close()
    db = sqlite3.connect(path)
    db.execute("ALTER TABLE jobs DROP COLUMN model")  # as the schema was before CCSR-v2
    db.commit()
    db.close()
    store = SQLiteJobStore(path)
    assert store.get(v2.id).model == "ccsr-v1"
    again, _ = store.create(dataclasses.replace(spec(eng), model="ccsr-v2"))
    store.close()
    assert SQLiteJobStore(path).get(again.id).model == "ccsr-v2"
