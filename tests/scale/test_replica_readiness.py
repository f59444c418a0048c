"""``/readyz`` of an API replica is per model: ready only when every model it serves (``--model``) has a live worker,
with each model's count of ready workers, as the workers announce themselves in Redis (:class:`WorkerRuntime`, the
code ``ccsr worker`` runs, with a runner that loads nothing)."""

from __future__ import annotations

import time

import pytest
from fastapi.testclient import TestClient

from ccsr.api.app import create_app
from ccsr.api.settings import Settings
from ccsr.jobs.distributed import RedisJobStore, SharedDirImageStore, build_distributed_engine
from ccsr.jobs.distributed.worker_runtime import WorkerRuntime

pytestmark = pytest.mark.timeout(60)


class NoModel:
    """A runner with nothing to load: what is tested is how the worker announces itself."""

    def load(self) -> None:
        pass

    def run(self, *a, **kw):  # pragma: no cover - no job is submitted here
        raise AssertionError("no job runs in these tests")


@pytest.fixture
def cluster(redis_url, rclient, prefix, tmp_path):
    """``replica(*models)``: a TestClient of an API replica serving ``models``; ``worker(name, *models)``: a
    started worker runtime announcing ``models`` (heartbeat 0.2 s). All stopped at teardown."""
    store = RedisJobStore(rclient, prefix=prefix)
    images = SharedDirImageStore(tmp_path / "images")
    clients: list[TestClient] = []
    workers: list[WorkerRuntime] = []

    def replica(*models: str) -> TestClient:
        engine = build_distributed_engine(redis_url, f"shared:{tmp_path}/images", prefix=prefix,
                                          send=lambda *_: None, tick=0.2)
        settings = Settings(data_dir=tmp_path / "unused", broker_url=redis_url, models=list(models))
        client = TestClient(create_app(settings, engine=engine))
        client.__enter__()
        clients.append(client)
        return client

    def worker(name: str, *models: str) -> WorkerRuntime:
        rt = WorkerRuntime(store, images, NoModel(), name=name, models={m: {} for m in models},
                           warmup=False, heartbeat=0.2)
        rt.start()
        workers.append(rt)
        return rt

    yield replica, worker
    for c in clients:
        c.__exit__(None, None, None)
    for rt in workers:
        rt.stop()


def readyz(client: TestClient) -> tuple[int, str, dict[str, tuple[str, int]]]:
    r = client.get("/readyz")
    body = r.json()
    assert ("queue" in body) and (r.status_code == 200 or "error" in body), body  # the shape before models came
    return r.status_code, body["status"], {k: (v["status"], v["workers"]) for k, v in body["models"].items()}


def test_ready_only_when_every_served_model_has_a_worker(cluster):
    replica, worker = cluster
    both, v1_only = replica("ccsr-v1", "ccsr-v2"), replica("ccsr-v1")
    assert readyz(both) == (503, "loading", {"ccsr-v1": ("loading", 0), "ccsr-v2": ("loading", 0)})

    worker("w-v2", "ccsr-v2")  # any worker used to be enough: not for a replica that also serves v1
    assert readyz(v1_only) == (503, "loading", {"ccsr-v1": ("loading", 0)})
    assert readyz(both) == (503, "loading", {"ccsr-v1": ("loading", 0), "ccsr-v2": ("ready", 1)})

    w_v1 = worker("w-v1", "ccsr-v1")
    assert readyz(v1_only) == (200, "ready", {"ccsr-v1": ("ready", 1)})
    assert readyz(both) == (200, "ready", {"ccsr-v1": ("ready", 1), "ccsr-v2": ("ready", 1)})

    worker("w-both", "ccsr-v1", "ccsr-v2")  # a worker of both counts for each
    assert readyz(both) == (200, "ready", {"ccsr-v1": ("ready", 2), "ccsr-v2": ("ready", 2)})

    w_v1.stop()  # a worker that shuts down leaves the counts at once
    assert readyz(both)[2] == {"ccsr-v1": ("ready", 1), "ccsr-v2": ("ready", 2)}


def test_a_silent_worker_stops_counting(cluster):
    replica, worker = cluster
    api = replica("ccsr-v1", "ccsr-v2")
    worker("w-v1", "ccsr-v1")
    silent = worker("w-v2", "ccsr-v2")
    assert readyz(api)[0] == 200
    silent._stop.set()  # its heartbeat stops, as a killed worker's does: no deregistration
    end = time.monotonic() + 10
    while readyz(api)[0] == 200 and time.monotonic() < end:
        time.sleep(0.1)
    assert readyz(api) == (503, "loading", {"ccsr-v1": ("ready", 1), "ccsr-v2": ("loading", 0)})
