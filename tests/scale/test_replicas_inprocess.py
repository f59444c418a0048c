"""Two API replicas (in-process apps) over one Redis and a shared image directory, one worker runtime in a
thread: a job submitted on replica A is polled, cancelled and fetched on replica B; webhooks go out once;
queue positions and the queue bound hold across replicas. (Celery itself is exercised by test_cluster.py;
here a queue.Queue stands in for the broker.)"""

from __future__ import annotations

import base64
import io
import queue
import threading
import time
import uuid

import pytest
from fastapi.testclient import TestClient
from PIL import Image

from ccsr.api.app import create_app
from ccsr.api.settings import Settings
from ccsr.jobs.distributed import RedisJobStore, build_distributed_engine, image_store_from_url
from ccsr.jobs.distributed.worker_runtime import WorkerRuntime
from ccsr.jobs.runner import CCSRRunner

pytestmark = pytest.mark.timeout(120)


class Cluster:
    def __init__(self, redis_url: str, tmp, pipeline, sink) -> None:
        self.redis_url = redis_url
        self.tmp = tmp
        self.sink = sink
        self.store_url = f"shared:{tmp}/images"
        self.messages: queue.Queue[str] = queue.Queue()
        self.gate = threading.Event()
        self.gate.set()
        self.stop = threading.Event()
        store = RedisJobStore(redis_url)
        self.runtime = WorkerRuntime(
            store,
            image_store_from_url(self.store_url),
            CCSRRunner(pipeline=pipeline),
            name="w-inproc",
            lease=2.0,
            heartbeat=0.5,
            warmup=False,
        )
        self.runtime.start()
        self.thread = threading.Thread(target=self._work, daemon=True)
        self.thread.start()

    def _work(self) -> None:
        while not self.stop.is_set():
            try:
                job_id = self.messages.get(timeout=0.1)
            except queue.Empty:
                continue
            self.gate.wait()
            self.runtime.process(job_id)

    def app(self, max_queue: int = 64):
        allow = [f"127.0.0.1:{self.sink.port}"]
        engine = build_distributed_engine(
            self.redis_url,
            self.store_url,
            max_queue=max_queue,
            fetch_allow_hosts=allow,
            send=lambda job_id, _model: self.messages.put(job_id),
            tick=0.2,
        )
        settings = Settings(data_dir=self.tmp / "unused", size_mode="pad", fetch_allow_hosts=allow)
        return create_app(settings, engine=engine)

    def close(self) -> None:
        self.stop.set()
        self.gate.set()
        self.thread.join(10)
        self.runtime.stop()


@pytest.fixture
def cluster(redis_url, rclient, tmp_path, tiny_pipeline, sink):
    c = Cluster(redis_url, tmp_path, tiny_pipeline, sink)
    yield c
    c.close()


def png_b64(fixtures) -> str:
    return base64.b64encode((fixtures / "inputs" / "lq_48x40.png").read_bytes()).decode()


def wait_until(fn, timeout: float = 60.0, every: float = 0.1):
    end = time.monotonic() + timeout
    while time.monotonic() < end:
        value = fn()
        if value:
            return value
        time.sleep(every)
    raise AssertionError(f"condition not met within {timeout}s (last: {value!r})")


def test_runware_and_fal_across_replicas(cluster, fixtures, sink):
    with TestClient(cluster.app()) as a, TestClient(cluster.app()) as b:
        assert wait_until(lambda: b.get("/readyz").status_code == 200)
        tid = str(uuid.uuid4())
        task = {
            "taskType": "upscale",
            "taskUUID": tid,
            "inputs": {"image": png_b64(fixtures)},
            "upscaleFactor": 2,
            "outputFormat": "PNG",
            "deliveryMethod": "async",
            "webhookURL": f"{sink.base}/hook",
            "settings": {"steps": 10, "seed": 7},
        }
        assert a.post("/v1", json=[task]).json()["data"][0]["taskUUID"] == tid

        def done_on_b():
            item = b.post("/v1", json=[{"taskType": "getResponse", "taskUUID": tid}]).json()["data"][0]
            return item if item.get("status") == "success" else None

        item = wait_until(done_on_b)
        path = item["imageURL"].split("://", 1)[1].split("/", 1)[1]
        img = Image.open(io.BytesIO(b.get(f"/{path}").content))
        assert img.size == (96, 80)
        again = b.post("/v1", json=[task]).json()  # an idempotent retry on the other replica
        assert again["data"][0]["taskUUID"] == tid
        assert RedisJobStore(cluster.redis_url).active_count() == 0
        assert a.app.state.engine.shared_secret("x") == b.app.state.engine.shared_secret("x")

        sub = a.post(
            "/queue/fal-ai/ccsr",
            json={"image_url": f"data:image/png;base64,{png_b64(fixtures)}", "steps": 10, "seed": 3},
        )
        rid = sub.json()["request_id"]
        status = wait_until(
            lambda: (
                (s := b.get(f"/queue/fal-ai/ccsr/requests/{rid}/status?logs=1").json())["status"] == "COMPLETED" and s
            )
        )
        assert any("done in" in line["message"] for line in status["logs"])
        out = b.get(f"/queue/fal-ai/ccsr/requests/{rid}").json()
        assert out["seed"] == 3 and out["image"]["width"] == 96

        hooks = wait_until(lambda: [h for h in sink.json_posts() if h.get("data", [{}])[0].get("taskUUID") == tid])
        time.sleep(1.0)  # a duplicate would arrive now
        hooks = [h for h in sink.json_posts() if h.get("data", [{}])[0].get("taskUUID") == tid]
        assert len(hooks) == 1 and hooks[0]["data"][0]["status"] == "success"


def test_positions_cancel_and_backpressure_across_replicas(cluster, fixtures):
    cluster.gate.clear()  # the worker holds off: jobs stay queued
    with TestClient(cluster.app(max_queue=3)) as a, TestClient(cluster.app(max_queue=3)) as b:
        body = {"image_url": f"data:image/png;base64,{png_b64(fixtures)}", "steps": 10, "seed": 1}
        ids = [a.post("/queue/fal-ai/ccsr", json=body).json()["request_id"] for _ in range(3)]
        full = b.post("/queue/fal-ai/ccsr", json=body)
        assert full.status_code == 429 and full.json()["error_type"] == "rate_limited"
        assert b.get(f"/queue/fal-ai/ccsr/requests/{ids[2]}/status").json()["queue_position"] == 2
        assert b.put(f"/queue/fal-ai/ccsr/requests/{ids[1]}/cancel").status_code == 202
        assert a.get(f"/queue/fal-ai/ccsr/requests/{ids[2]}/status").json()["queue_position"] == 1
        assert a.get(f"/queue/fal-ai/ccsr/requests/{ids[1]}").status_code == 499
        assert b.post("/queue/fal-ai/ccsr", json=body).status_code == 200  # room again after the cancel
        cluster.gate.set()
        for rid in (ids[0], ids[2]):
            wait_until(lambda r=rid: b.get(f"/queue/fal-ai/ccsr/requests/{r}/status").json()["status"] == "COMPLETED")
            assert a.get(f"/queue/fal-ai/ccsr/requests/{rid}").status_code == 200
