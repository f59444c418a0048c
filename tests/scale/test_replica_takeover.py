"""A replica that dies after taking a finished job's announcement (before its webhooks went out) leaves it
pending; another replica claims it once idle and runs the listeners exactly once, and acknowledges it."""

from __future__ import annotations

import threading
import time

import pytest

from ccsr.jobs import JobSpec
from ccsr.jobs.distributed import build_distributed_engine
from ccsr.jobs.distributed.engine import GROUP
from ccsr.params import UpscaleParams

pytestmark = pytest.mark.timeout(60)


def test_pending_announcement_of_a_dead_replica_is_taken_over(redis_url, rclient, tmp_path):
    engine = build_distributed_engine(
        redis_url, tmp_path / "img", send=lambda *_: None, claim_idle=0.5, tick=0.1, sweep_interval=3600
    )
    store = engine.store
    seen: list[str] = []
    got = threading.Event()

    def listener(job) -> None:
        seen.append(job.id)
        got.set()

    engine.add_listener(listener)
    rclient.xgroup_create(store.terminal_stream, GROUP, id="0", mkstream=True)
    job = store.create(JobSpec(params=UpscaleParams(steps=2, seed=1), input_image_id="x"))[0]
    store.finish(job.id, "error")
    # the dead replica read the announcement and never acknowledged it
    taken = rclient.xreadgroup(GROUP, "dead-replica", {store.terminal_stream: ">"}, count=10)
    assert len(taken[0][1]) == 1
    engine.start()
    try:
        assert got.wait(10), "nobody took the pending announcement over"
        time.sleep(1.0)  # a second run of the listeners would show now
        assert seen == [job.id]
        assert rclient.xpending(store.terminal_stream, GROUP)["pending"] == 0
    finally:
        engine.stop()
