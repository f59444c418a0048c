"""CCSR-v1 and CCSR-v2 on the Celery scale-out: real ``ccsr worker`` processes (one per model, tiny fixtures), a
private Redis, images in a shared directory, and an API replica (the app over ``build_distributed_engine``, which
sends real Celery messages) that serves both models without loading either.

A v2 job submitted while only the v1 worker runs waits in its model's queue and says so in its log (and the replica's
``/readyz`` is 503, one ready worker for v1, none for v2); once a v2 worker starts it runs there (and ``/readyz`` is
200), while the v1 job ran on the v1 worker. Both outputs equal, pixel for pixel, what the embedded backend (one
process loading both models) answers for the same requests. A replica not configured for a model refuses it in the
protocol's shape.
"""

from __future__ import annotations

import base64
import io
import os
import sys
import time
import uuid
from pathlib import Path

import numpy as np
import pytest
import torch
from fastapi.testclient import TestClient
from PIL import Image
from test_cluster import Proc

from ccsr.api.app import create_app
from ccsr.api.settings import Settings
from ccsr.jobs import build_embedded_engine
from ccsr.jobs.distributed import RedisJobStore
from ccsr.jobs.runner import CCSRRunner

pytestmark = pytest.mark.timeout(400)

REPO = Path(__file__).resolve().parents[2]
V1 = REPO / "tests" / "fixtures" / "ccsr_v1_tiny"
V2_MODEL = REPO / "tests" / "fixtures" / "ccsr_v2_tiny" / "model"
V1_INPUT = base64.b64encode((V1 / "inputs" / "lq_48x40.png").read_bytes()).decode()
V2_INPUT = base64.b64encode(
    (REPO / "tests" / "fixtures" / "ccsr_v2_tiny" / "inputs" / "lq_32x32.png").read_bytes()).decode()


def v1_task(tid: str, delivery: str = "async") -> dict:
    return {"taskType": "upscale", "taskUUID": tid, "inputs": {"image": V1_INPUT}, "upscaleFactor": 2,
            "outputFormat": "PNG", "outputType": "base64Data", "deliveryMethod": delivery,
            "settings": {"steps": 4, "seed": 11}}


def v2_task(tid: str, delivery: str = "async") -> dict:
    return {"taskType": "upscale", "taskUUID": tid, "model": "ccsr:2@1", "inputs": {"image": V2_INPUT},
            "upscaleFactor": 4, "outputFormat": "PNG", "outputType": "base64Data", "deliveryMethod": delivery,
            "settings": {"seed": 233, "processSize": 128, "preset": "two-step"}}


FAL_V2 = {"image_url": f"data:image/png;base64,{V2_INPUT}", "scale": 4, "process_size": 128, "seed": 7}


def pixels(png: bytes) -> np.ndarray:
    return np.asarray(Image.open(io.BytesIO(png)).convert("RGB"))


def wait_until(fn, timeout: float, what: str, procs: list[Proc] = ()):  # type: ignore[no-untyped-def]
    end = time.monotonic() + timeout
    while time.monotonic() < end:
        for p in procs:
            if p.proc.poll() is not None:
                raise AssertionError(f"{p.name} exited:\n{p.tail()}")
        value = fn()
        if value:
            return value
        time.sleep(0.2)
    raise AssertionError(f"{what} not within {timeout}s\n" + "\n".join(p.tail() for p in procs))


@pytest.fixture(scope="module")
def embedded(tmp_path_factory) -> dict[str, np.ndarray]:
    """The embedded backend's answers (one process, both models, one thread like the workers)."""
    tmp = tmp_path_factory.mktemp("embedded_models")
    runner = CCSRRunner(models={"ccsr-v1": str(V1 / "model.safetensors"), "ccsr-v2": str(V2_MODEL)},
                        config=str(V1 / "model.yaml"), device="cpu", dtype="float32")
    settings = Settings(data_dir=tmp, models=["ccsr-v1", f"ccsr-v2={V2_MODEL}"])
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        with TestClient(create_app(settings, engine=build_embedded_engine(tmp, runner=runner))) as c:
            out = {}
            for key, task in (("v1", v1_task(str(uuid.uuid4()), "sync")), ("v2", v2_task(str(uuid.uuid4()), "sync"))):
                body = c.post("/v1", json=[task]).json()
                out[key] = pixels(base64.b64decode(body["data"][0]["imageBase64Data"]))
            r = c.post("/fal-ai/ccsr-v2", json=FAL_V2).json()
            out["fal-v2"] = pixels(c.get("/" + r["image"]["url"].split("://", 1)[1].split("/", 1)[1]).content)
    finally:
        torch.set_num_threads(threads)
    return out


def worker(tmp: Path, redis_url: str, store: Path, name: str, *model_args: str) -> Proc:
    env = {**os.environ, "PYTHONPATH": str(REPO / "src"), "OMP_NUM_THREADS": "1", "HF_HUB_OFFLINE": "1"}
    argv = [sys.executable, "-m", "ccsr.worker", "--broker", redis_url, "--store", str(store), "--name", name,
            "--device", "cpu", "--dtype", "float32", "--lease", "3", "--soft-time-limit", "120", *model_args]
    return Proc(name, argv, tmp / f"{name}.log", env).start()


def test_v1_and_v2_jobs_run_on_their_models_workers(tmp_path, redis_url, rclient, embedded):
    store_dir = tmp_path / "images"
    settings = Settings(data_dir=tmp_path / "unused", broker_url=redis_url, store_url=str(store_dir),
                        models=["ccsr-v1", "ccsr-v2"])  # a replica names the models; its workers load them
    store = RedisJobStore(redis_url)
    workers = [worker(tmp_path, redis_url, store_dir, "w-v1", "--model", "ccsr-v1",
                      "--weights", str(V1 / "model.safetensors"), "--config", str(V1 / "model.yaml"))]
    try:
        with TestClient(create_app(settings)) as api:
            def ready_workers() -> tuple[int, dict[str, int]]:
                r = api.get("/readyz")
                return r.status_code, {m: v["workers"] for m, v in r.json()["models"].items()}

            wait_until(lambda: ready_workers()[1]["ccsr-v1"] == 1, 180, "the v1 worker ready", workers)
            assert ready_workers() == (503, {"ccsr-v1": 1, "ccsr-v2": 0})  # not ready while v2 has no worker
            v1_id, v2_id = str(uuid.uuid4()), str(uuid.uuid4())
            assert api.post("/v1", json=[v1_task(v1_id)]).status_code == 200
            assert api.post("/v1", json=[v2_task(v2_id)]).status_code == 200
            fal_id = api.post("/queue/fal-ai/ccsr-v2", json=FAL_V2).json()["request_id"]

            def result(tid: str) -> dict | None:
                item = api.post("/v1", json=[{"taskType": "getResponse", "taskUUID": tid}]).json()["data"][0]
                return item if item.get("status") == "success" else None

            v1_item = wait_until(lambda: result(v1_id), 120, "the v1 job", workers)
            v2_job = store.get_by_key(f"runware:{v2_id}")
            waiting = lambda: [ln.message for ln in store.get(v2_job.id).logs  # noqa: E731
                               if "no worker serving ccsr-v2" in ln.message]
            assert wait_until(waiting, 30, "the v2 job's waiting line", workers)
            assert store.get(v2_job.id).status == "queued" and store.get(fal_id).status == "queued"
            assert store.queue_position(v2_job.id) == 0 and store.queue_position(fal_id) == 1

            workers.append(worker(tmp_path, redis_url, store_dir, "w-v2", "--model", f"ccsr-v2={V2_MODEL}"))
            wait_until(lambda: ready_workers()[0] == 200, 180, "the replica ready", workers)
            assert ready_workers() == (200, {"ccsr-v1": 1, "ccsr-v2": 1})
            v2_item = wait_until(lambda: result(v2_id), 180, "the v2 job", workers)
            status = wait_until(lambda: (s := api.get(f"/queue/fal-ai/ccsr-v2/requests/{fal_id}/status").json())
                                ["status"] == "COMPLETED" and s, 60, "the fal v2 job", workers)
            out = api.get(f"/queue/fal-ai/ccsr-v2/requests/{fal_id}").json()
            fal_png = api.get("/" + out["image"]["url"].split("://", 1)[1].split("/", 1)[1]).content
            assert status["status"] == "COMPLETED"
    finally:
        for p in workers:
            p.stop()
    ran_on = {key: [ln.message for ln in store.get(job_id).logs if ln.message.startswith("ran on ")]
              for key, job_id in (("v1", store.get_by_key(f"runware:{v1_id}").id), ("v2", v2_job.id),
                                  ("fal-v2", fal_id))}
    assert ran_on == {"v1": ["ran on w-v1"], "v2": ["ran on w-v2"], "fal-v2": ["ran on w-v2"]}
    assert "with ccsr-v2 (" in " ".join(ln.message for ln in store.get(v2_job.id).logs)
    assert np.array_equal(pixels(base64.b64decode(v1_item["imageBase64Data"])), embedded["v1"])
    assert np.array_equal(pixels(base64.b64decode(v2_item["imageBase64Data"])), embedded["v2"])
    assert np.array_equal(pixels(fal_png), embedded["fal-v2"])
    log = (tmp_path / "w-v2.log").read_text()
    assert "serves ccsr-v2 from queues ccsr.ccsr-v2" in log, log[-3000:]


def test_a_replica_refuses_a_model_it_is_not_configured_for(tmp_path, redis_url, rclient):
    settings = Settings(data_dir=tmp_path / "unused", broker_url=redis_url, store_url=str(tmp_path / "images"))
    with TestClient(create_app(settings)) as api:
        r = api.post("/v1", json=[v2_task(str(uuid.uuid4()))])
        assert r.status_code == 400, r.text
        e = r.json()["errors"][0]
        assert e["code"] == "unsupportedModel" and "not loaded" in e["message"] and "runware:501@1" in e["message"]
        r = api.post("/queue/fal-ai/ccsr-v2", json=FAL_V2)
        assert r.status_code == 404 and r.json()["error_type"] == "model_not_loaded"
    assert RedisJobStore(redis_url).active_count() == 0


def test_a_worker_that_cannot_load_its_model_stops_without_taking_messages(tmp_path, redis_url, rclient):
    """A v2 folder without its SD-2.1 part (offline): the worker logs why, exits 1, and the queued job's message is
    still on the model's queue for a worker that can run it."""
    from ccsr.jobs import JobSpec
    from ccsr.jobs.distributed import make_celery, sender
    from ccsr.params import UpscaleParams

    broken = tmp_path / "broken_v2"
    for part in ("controlnet", "vae"):
        (broken / part).mkdir(parents=True)
        (broken / part / "config.json").write_text("{}")
    store = RedisJobStore(redis_url)
    job, _ = store.create(JobSpec(params=UpscaleParams(seed=1), input_image_id="x", model="ccsr-v2"))
    sender(make_celery(redis_url), "ccsr")(job.id, "ccsr-v2")
    assert rclient.llen("ccsr.ccsr-v2") == 1
    w = worker(tmp_path, redis_url, tmp_path / "images", "w-broken", "--model", f"ccsr-v2={broken}")
    try:
        assert w.proc.wait(120) == 1, w.tail()
    finally:
        w.kill()
    log = w.log_path.read_text(errors="replace")
    assert "could not load or warm up ccsr-v2: stopping" in log and "stable-diffusion-2-1-base" in log, log[-3000:]
    assert rclient.llen("ccsr.ccsr-v2") == 1, "the worker took the message with it"
    assert store.get(job.id).status == "queued"
