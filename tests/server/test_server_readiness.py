"""``/readyz`` of one ``ccsr serve`` process, per model: each model it serves with its state (``loading`` while the
in-process workers load, ``ready`` with how many can run it, ``failed`` with the cause) and 200 only when all are
ready; the playground's model list says the same. Stand-in runners (one per device) control when loading ends."""

from __future__ import annotations

import threading
import time

import pytest
from fastapi.testclient import TestClient

from ccsr.api.app import create_app
from ccsr.api.settings import Settings
from ccsr.jobs import InProcessExecutor, JobEngine, LocalImageStore, SQLiteJobStore

pytestmark = pytest.mark.timeout(60)


class HeldLoad:
    """A runner whose ``load`` returns when ``release`` is set (raising ``error`` if given); ``models`` as
    :class:`~ccsr.jobs.runner.CCSRRunner` names the models it loads."""

    def __init__(self, models: dict[str, str | None], error: Exception | None = None):
        self.models = models
        self.error = error
        self.release = threading.Event()

    def load(self) -> None:
        self.release.wait(30)
        if self.error is not None:
            raise self.error

    def run(self, *a, **kw):  # pragma: no cover - no job runs here
        raise AssertionError("no job runs in these tests")


def serve(tmp_path, runners: list[HeldLoad], models: list[str]) -> TestClient:
    engine = JobEngine(SQLiteJobStore(tmp_path / "jobs.db"), LocalImageStore(tmp_path / "images"),
                       InProcessExecutor(runners, idle_poll=0.02))
    return TestClient(create_app(Settings(data_dir=tmp_path, models=models), engine=engine))


def readyz_once(client: TestClient, until) -> tuple[int, dict]:
    """``/readyz``'s (status code, body) once ``until(code, body)`` holds (within 10 s), else the last one."""
    for _ in range(500):
        r = client.get("/readyz")
        if until(r.status_code, r.json()):
            break
        time.sleep(0.02)
    return r.status_code, r.json()


def states(body: dict) -> dict[str, tuple[str, int]]:
    return {k: (v["status"], v["workers"]) for k, v in body["models"].items()}


def test_each_model_is_reported_while_loading_and_once_ready(tmp_path):
    both = {"ccsr-v1": None, "ccsr-v2": "/models/v2"}
    gpu0, gpu1 = HeldLoad(both), HeldLoad(both)
    with serve(tmp_path, [gpu0, gpu1], ["ccsr-v1", "ccsr-v2=/models/v2"]) as c:
        r = c.get("/readyz")
        body = r.json()
        assert (r.status_code, body["status"], body["error"], body["queue"]) == (503, "loading", None, 0)
        assert states(body) == {"ccsr-v1": ("loading", 0), "ccsr-v2": ("loading", 0)}
        assert [m["status"] for m in c.get("/playground/models").json()] == ["loading", "loading"]

        gpu0.release.set()  # one device's worker is ready: both models can run
        code, body = readyz_once(c, lambda code, _b: code == 200)
        assert (code, body["status"], body["queue"]) == (200, "ready", 0)
        assert states(body) == {"ccsr-v1": ("ready", 1), "ccsr-v2": ("ready", 1)}
        assert [m["status"] for m in c.get("/playground/models").json()] == ["ready", "ready"]

        gpu1.release.set()
        code, body = readyz_once(c, lambda _c, b: states(b)["ccsr-v1"][1] == 2)
        assert code == 200 and states(body) == {"ccsr-v1": ("ready", 2), "ccsr-v2": ("ready", 2)}


def test_a_model_no_worker_loads_keeps_the_server_not_ready(tmp_path):
    v1 = HeldLoad({"ccsr-v1": None})
    v1.release.set()
    with serve(tmp_path, [v1], ["ccsr-v1", "ccsr-v2=/models/v2"]) as c:
        code, body = readyz_once(c, lambda _c, b: states(b)["ccsr-v1"] == ("ready", 1))
        assert (code, body["status"]) == (503, "loading"), body
        assert states(body) == {"ccsr-v1": ("ready", 1), "ccsr-v2": ("loading", 0)}
        assert [m["status"] for m in c.get("/playground/models").json()] == ["ready", "loading"]


def test_a_failed_load_says_why(tmp_path):
    broken = HeldLoad({"ccsr-v1": None}, error=ValueError("model.safetensors: not a CCSR checkpoint"))
    broken.release.set()
    with serve(tmp_path, [broken], ["ccsr-v1"]) as c:
        code, body = readyz_once(c, lambda _c, b: b["status"] == "failed")
        assert (code, body["status"]) == (503, "failed"), body
        assert "not a CCSR checkpoint" in body["error"] and states(body) == {"ccsr-v1": ("failed", 0)}
        assert c.get("/playground/models").json()[0]["status"] == "failed"
