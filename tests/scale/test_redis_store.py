"""RedisJobStore: the job state machine every replica and worker shares, against a real Redis."""

from __future__ import annotations

import time

import pytest

from ccsr.jobs import ErrorCode, JobConflict, JobResult, JobSpec, QueueFull, QuotaFull
from ccsr.jobs.distributed import RedisJobStore
from ccsr.params import UpscaleParams

pytestmark = pytest.mark.timeout(60)


def spec(key: str | None = None, h: str = "h1", **kw) -> JobSpec:
    return JobSpec(
        params=UpscaleParams(scale=2, steps=4, seed=1),
        input_image_id="00000000-0000-0000-0000-000000000001",
        protocol="runware",
        meta={"taskUUID": key},
        idempotency_key=key,
        payload_hash=h,
        **kw,
    )


@pytest.fixture
def two(rclient, redis_url, prefix) -> tuple[RedisJobStore, RedisJobStore]:
    """Two stores on the same Redis, each with its own connection: replica A and replica B."""
    return RedisJobStore(rclient, prefix=prefix), RedisJobStore(redis_url, prefix=prefix)


def test_idempotency_and_conflict_across_replicas(two):
    a, b = two
    job, created = a.create(spec("k1"))
    assert created and job.status == "queued"
    again, created = b.create(spec("k1"))
    assert not created and again.id == job.id
    with pytest.raises(JobConflict):
        b.create(spec("k1", h="other"))
    assert b.get_by_key("k1").id == job.id
    assert b.get(job.id).meta == {"taskUUID": "k1"}
    assert [line.message for line in b.get(job.id).logs] == ["queued"]


def test_queue_positions_bound_and_claim(two):
    a, b = two
    ids = [a.create(spec(f"k{i}"), max_active=3)[0].id for i in range(3)]
    with pytest.raises(QueueFull) as e:
        b.create(spec("k9"), max_active=3)
    assert e.value.depth == 3
    assert [b.queue_position(i) for i in ids] == [0, 1, 2]
    assert b.claim(ids[1], "w1:t", 30) == "claimed"
    assert b.claim(ids[1], "w2:t", 30) == "busy"
    assert [a.queue_position(i) for i in ids] == [0, None, 1]
    assert a.active_count() == 3
    job = a.get(ids[1])
    assert job.status == "processing" and job.attempts == 1
    result = JobResult("00000000-0000-0000-0000-000000000002", 96, 80, "image/png", "png", 10, 1, 0.5)
    assert a.finish_claimed(ids[1], "w2:t", "success", result=result) is None  # not the holder
    done = b.finish_claimed(ids[1], "w1:t", "success", result=result)
    assert done.status == "success" and done.progress == 100 and done.result == result
    assert b.claim(ids[1], "w3:t", 30) == "done"
    assert a.active_count() == 2
    entries = a.redis.xrange(a.terminal_stream)
    assert [e[1][b"job"].decode() for e in entries] == [ids[1]]


def test_cancel_queued_and_running(two):
    a, b = two
    q = a.create(spec("q"))[0]
    r = a.create(spec("r"))[0]
    assert a.claim(r.id, "w:t", 30) == "claimed"
    got = b.request_cancel(q.id)
    assert got.status == "cancelled" and got.error.code == ErrorCode.CANCELLED
    got = b.request_cancel(r.id)
    assert got.status == "processing" and got.cancel_requested
    assert b.request_cancel("nope") is None


def test_lost_worker_requeued_then_failed(rclient, prefix):
    store = RedisJobStore(rclient, prefix=prefix, max_attempts=2)
    job = store.create(spec("x"))[0]
    other = store.create(spec("y"))[0]
    assert store.claim(job.id, "w1:t", 0.05) == "claimed"
    time.sleep(0.1)  # the lease runs out: the worker is gone
    assert store.reap(job.id) == "requeued"
    assert store.queue_position(job.id) == 0 and store.queue_position(other.id) == 1  # its old place
    assert store.claim(job.id, "w2:t", 0.05) == "claimed"
    time.sleep(0.1)
    assert store.claim(job.id, "w3:t", 30) == "failed"  # a redelivered message finds it orphaned again
    failed = store.get(job.id)
    assert failed.status == "error" and failed.error.code == ErrorCode.INTERRUPTED and failed.attempts == 2
    assert "died 2 times" in failed.error.message


def test_lease_renewal_and_progress(rclient, prefix):
    store = RedisJobStore(rclient, prefix=prefix)
    job = store.create(spec("p"))[0]
    store.set_progress(job.id, 50)  # ignored while queued
    assert store.get(job.id).progress == 0
    store.claim(job.id, "w:t", 0.2)
    assert store.renew(job.id, "w:t", 30)
    assert not store.renew(job.id, "other:t", 30)
    store.set_progress(job.id, 40)
    assert store.get(job.id).progress == 40
    assert store.reap(job.id) == "alive"


def test_terminal_jobs_and_keys_expire(rclient, prefix):
    store = RedisJobStore(rclient, prefix=prefix, job_ttl=1)
    job = store.create(spec("ttl"))[0]
    store.request_cancel(job.id)
    assert store.get_by_key("ttl").id == job.id
    end = time.monotonic() + 10
    while store.get(job.id) is not None and time.monotonic() < end:
        time.sleep(0.2)
    assert store.get(job.id) is None and store.get_by_key("ttl") is None
    fresh, created = store.create(spec("ttl", h="new"))  # an expired key can be used again
    assert created and fresh.id != job.id


def test_owner_quota_holds_across_replicas(two):
    """Two replicas count one owner's queued+running jobs in the same Redis, in the create script itself."""
    a, b = two
    mine = dict(owner="alpha", owner_quota=2)
    first, _ = a.create(spec(**mine))
    b.create(spec(**mine))
    with pytest.raises(QuotaFull):
        a.create(spec(**mine))
    with pytest.raises(QuotaFull):
        b.create(spec(**mine))
    b.create(spec(owner="bravo", owner_quota=2))  # another owner is not affected
    a.finish(first.id, "cancelled")
    b.create(spec(**mine))  # an ended job frees its place, whichever replica sees the end
    with pytest.raises(QuotaFull):
        a.create(spec(**mine))


def test_a_job_keeps_its_model_across_replicas(two):
    a, b = two
    v2, _ = a.create(spec("m2", model="ccsr-v2"))
    v1, _ = a.create(spec("m1"))
    assert (b.get(v2.id).model, b.get(v1.id).model) == ("ccsr-v2", "ccsr-v1")
