"""The real thing on loopback: 2 API replicas + 2 Celery workers (subprocesses, tiny model), a private Redis,
images in S3 (moto's server mode).

- A batch of 40 mixed Runware / fal jobs, submitted to one replica and polled on the other: every job
  completes exactly once (one run, one terminal event, one webhook) with the pixels the embedded backend
  gives for the same request.
- Chaos: workers SIGKILLed mid-job and API replicas SIGKILLed with work in flight, twice each: every
  accepted job completes (re-run) or fails with a clear error; none is lost or finished twice; counts printed.
"""

from __future__ import annotations

import base64
import contextlib
import io
import os
import signal
import socket
import subprocess
import sys
import time
import uuid
from collections import Counter
from pathlib import Path

import httpx
import numpy as np
import pytest
from fastapi.testclient import TestClient
from PIL import Image

from ccsr.api.app import create_app
from ccsr.api.settings import Settings
from ccsr.jobs import build_embedded_engine
from ccsr.jobs.distributed import RedisJobStore
from ccsr.jobs.runner import CCSRRunner

pytestmark = pytest.mark.timeout(400)

REPO = Path(__file__).resolve().parents[2]
STEPS = 10
LEASE = 3.0


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


class Proc:
    """A subprocess in its own process group (a SIGKILL takes its children too, like a container dying)."""

    def __init__(self, name: str, argv: list[str], log: Path, env: dict):
        self.name, self.argv, self.log_path, self.env = name, argv, log, env
        self.proc: subprocess.Popen | None = None

    def start(self) -> Proc:
        with open(self.log_path, "ab") as log:
            self.proc = subprocess.Popen(
                self.argv, stdout=log, stderr=subprocess.STDOUT, env=self.env, cwd=REPO, start_new_session=True
            )
        return self

    def kill(self) -> None:
        if self.proc and self.proc.poll() is None:
            os.killpg(self.proc.pid, signal.SIGKILL)
            self.proc.wait(10)

    def stop(self) -> None:
        if self.proc and self.proc.poll() is None:
            os.killpg(self.proc.pid, signal.SIGTERM)
            try:
                self.proc.wait(15)
            except subprocess.TimeoutExpired:
                self.kill()

    def tail(self) -> str:
        try:
            return self.log_path.read_text(errors="replace")[-3000:]
        except OSError:
            return ""


class Cluster:
    def __init__(self, tmp: Path, redis_url: str, s3_endpoint: str, sink, fixtures: Path):
        self.tmp, self.redis_url, self.sink = tmp, redis_url, sink
        self.store_url = f"s3://ccsr/cluster-{uuid.uuid4().hex[:6]}?endpoint_url={s3_endpoint}"
        self.env = dict(os.environ)
        self.env.update(
            PYTHONPATH=str(REPO / "src"),
            OMP_NUM_THREADS="1",
            AWS_ACCESS_KEY_ID="testing",
            AWS_SECRET_ACCESS_KEY="testing",
            AWS_DEFAULT_REGION="us-east-1",
            HF_HUB_OFFLINE="1",
        )
        self.fixtures = fixtures
        self.replicas: list[Proc] = []
        self.workers: list[Proc] = []
        self.store = RedisJobStore(redis_url)
        self.ports: list[int] = []
        self.worker_count = 0

    def replica(self, port: int) -> Proc:
        argv = [
            sys.executable,
            str(REPO / "tests" / "scale" / "replica.py"),
            "--host", "127.0.0.1", "--port", str(port),
            "--broker", self.redis_url, "--store", self.store_url,
            "--size-mode", "pad", "--max-queue", "200", "--claim-idle", "3",
            "--allow-fetch-host", f"127.0.0.1:{self.sink.port}",
        ]  # fmt: skip
        return Proc(f"api-{port}", argv, self.tmp / f"api-{port}.log", self.env).start()

    def worker(self) -> Proc:
        self.worker_count += 1
        name = f"w{self.worker_count}"
        argv = [
            sys.executable, "-m", "ccsr.worker",
            "--broker", self.redis_url, "--store", self.store_url, "--name", name,
            "--weights", str(self.fixtures / "model.safetensors"), "--config", str(self.fixtures / "model.yaml"),
            "--device", "cpu", "--dtype", "float32", "--lease", str(LEASE), "--soft-time-limit", "60",
            "--log-level", "info",
        ]  # fmt: skip
        return Proc(name, argv, self.tmp / f"{name}.log", self.env).start()

    def start(self) -> None:
        self.ports = [free_port(), free_port()]
        self.replicas = [self.replica(p) for p in self.ports]
        self.workers = [self.worker(), self.worker()]
        self.wait_ready(workers=2)

    def url(self, i: int) -> str:
        return f"http://127.0.0.1:{self.ports[i % 2]}"

    def ready_workers(self) -> int:
        return self.store.redis.zcount(self.store.key("workers"), time.time(), "+inf")

    def wait_ready(self, workers: int, timeout: float = 180) -> None:
        end = time.monotonic() + timeout
        while time.monotonic() < end:
            for p in self.replicas + self.workers:
                if p.proc.poll() is not None:
                    raise AssertionError(f"{p.name} exited:\n{p.tail()}")
            ok = 0
            for i in range(2):
                with contextlib.suppress(httpx.HTTPError):
                    ok += httpx.get(f"{self.url(i)}/readyz", timeout=2).status_code == 200
            if ok == 2 and self.ready_workers() >= workers:
                return
            time.sleep(0.3)
        raise AssertionError("cluster not ready:\n" + "\n".join(p.tail() for p in self.replicas + self.workers))

    def stop(self) -> None:
        for p in self.replicas + self.workers:
            p.stop()


@pytest.fixture(scope="module")
def cluster(tmp_path_factory, redis_url, s3_endpoint, sink, fixtures):
    redis_client = RedisJobStore(redis_url).redis
    redis_client.flushdb()
    c = Cluster(tmp_path_factory.mktemp("cluster"), redis_url, s3_endpoint, sink, fixtures)
    c.start()
    yield c
    c.stop()


# ------------------------------------------------------------------------------------------ clients


def input_b64(fixtures: Path) -> str:
    return base64.b64encode((fixtures / "inputs" / "lq_48x40.png").read_bytes()).decode()


def runware_task(fixtures: Path, seed: int, hook: str | None, tid: str | None = None) -> dict:
    task = {
        "taskType": "upscale",
        "taskUUID": tid or str(uuid.uuid4()),
        "inputs": {"image": input_b64(fixtures)},
        "upscaleFactor": 2,
        "outputFormat": "PNG",
        "outputType": "base64Data",
        "deliveryMethod": "async",
        "settings": {"steps": STEPS, "seed": seed},
    }
    if hook:
        task["webhookURL"] = hook
    return task


def fal_body(fixtures: Path, seed: int) -> dict:
    return {"image_url": f"data:image/png;base64,{input_b64(fixtures)}", "steps": STEPS, "seed": seed}


class Client:
    """Submits and polls like a client behind a load balancer: any live replica, retried on the other."""

    def __init__(self, cluster: Cluster):
        self.c = cluster
        self.http = httpx.Client(timeout=30)

    def call(self, i: int, method: str, path: str, **kw) -> httpx.Response:
        last: Exception | None = None
        for k in range(40):
            try:
                return self.http.request(method, f"{self.c.url(i + k)}{path}", **kw)
            except httpx.TransportError as e:  # that replica is down: the other one, then again
                last = e
                time.sleep(0.25)
        raise AssertionError(f"no replica answered {path}: {last}")

    def submit_runware(self, i: int, task: dict) -> str:
        r = self.call(i, "POST", "/v1", json=[task])
        assert r.status_code == 200, r.text
        return "rw:" + task["taskUUID"]

    def submit_fal(self, i: int, body: dict, hook: str) -> str:
        r = self.call(i, "POST", f"/queue/fal-ai/ccsr?fal_webhook={hook}", json=body)
        assert r.status_code == 200, r.text
        return "fal:" + r.json()["request_id"]

    def result(self, i: int, ref: str) -> tuple[str, bytes | None, str]:
        """("pending" | "success" | "error", png bytes, detail) from replica ``i``."""
        kind, ident = ref.split(":", 1)
        if kind == "rw":
            body = self.call(i, "POST", "/v1", json=[{"taskType": "getResponse", "taskUUID": ident}]).json()
            if "errors" in body:
                return "error", None, body["errors"][0]["code"] + ": " + body["errors"][0]["message"]
            item = body["data"][0]
            if item.get("status") != "success":
                return "pending", None, ""
            return "success", base64.b64decode(item["imageBase64Data"]), ""
        r = self.call(i, "GET", f"/queue/fal-ai/ccsr/requests/{ident}/status")
        if r.json()["status"] != "COMPLETED":
            return "pending", None, ""
        r = self.call(i, "GET", f"/queue/fal-ai/ccsr/requests/{ident}")
        if r.status_code != 200:
            return "error", None, f"{r.status_code} {r.json().get('error_type')}: {r.json().get('detail')}"
        url = r.json()["image"]["url"]
        path = "/" + url.split("://", 1)[1].split("/", 1)[1]
        return "success", self.call(i + 1, "GET", path).content, ""

    def wait_all(self, refs: list[str], timeout: float) -> dict[str, tuple[str, bytes | None, str]]:
        out: dict[str, tuple[str, bytes | None, str]] = {}
        end = time.monotonic() + timeout
        k = 0
        while len(out) < len(refs) and time.monotonic() < end:
            for ref in refs:
                if ref not in out:
                    k += 1
                    got = self.result(k, ref)
                    if got[0] != "pending":
                        out[ref] = got
            time.sleep(0.3)
        return out


def pixels(png: bytes) -> np.ndarray:
    return np.asarray(Image.open(io.BytesIO(png)).convert("RGB"))


@pytest.fixture(scope="module")
def embedded_outputs(tmp_path_factory, tiny_pipeline, fixtures) -> dict[tuple[str, int], np.ndarray]:
    """What the embedded backend answers for each (protocol, seed) used below: the parity reference."""
    tmp = tmp_path_factory.mktemp("embedded")
    engine = build_embedded_engine(tmp, runner=CCSRRunner(pipeline=tiny_pipeline))
    app = create_app(Settings(data_dir=tmp, size_mode="pad"), engine=engine)
    out = {}
    with TestClient(app) as c:
        for seed in (11, 12):
            body = c.post("/v1", json=[{**runware_task(fixtures, seed, None), "deliveryMethod": "sync"}]).json()
            out[("rw", seed)] = pixels(base64.b64decode(body["data"][0]["imageBase64Data"]))
        for seed in (21, 22):
            r = c.post("/fal-ai/ccsr", json=fal_body(fixtures, seed)).json()
            path = "/" + r["image"]["url"].split("://", 1)[1].split("/", 1)[1]
            out[("fal", seed)] = pixels(c.get(path).content)
    return out


def job_of(store: RedisJobStore, ref: str):
    kind, ident = ref.split(":", 1)
    return store.get_by_key(f"runware:{ident}") if kind == "rw" else store.get(ident)


def terminal_events(store: RedisJobStore) -> Counter:
    return Counter(f[b"job"].decode() for _id, f in store.redis.xrange(store.terminal_stream))


def webhooks(sink) -> Counter:
    ids = []
    for body in sink.json_posts():
        if "request_id" in body:
            ids.append("fal:" + body["request_id"])
        elif body.get("data"):
            ids.append("rw:" + body["data"][0]["taskUUID"])
        elif body.get("errors"):
            ids.append("rw:" + body["errors"][0]["taskUUID"])
    return Counter(ids)


# ------------------------------------------------------------------------------------------ tests


def test_batch_of_40_mixed_jobs_exactly_once(cluster, embedded_outputs, fixtures, sink):
    client = Client(cluster)
    hook = f"{sink.base}/hook"
    refs: dict[str, tuple[str, int]] = {}
    for i in range(40):
        if i % 2 == 0:
            seed = 11 + (i // 2) % 2
            refs[client.submit_runware(i, runware_task(fixtures, seed, hook))] = ("rw", seed)
        else:
            seed = 21 + (i // 2) % 2
            refs[client.submit_fal(i, fal_body(fixtures, seed), hook)] = ("fal", seed)
    results = client.wait_all(list(refs), timeout=240)
    deadline = time.monotonic() + 30
    while sum(webhooks(sink)[r] > 0 for r in refs) < len(refs) and time.monotonic() < deadline:
        time.sleep(0.2)
    time.sleep(1.0)  # room for a duplicate to show up
    hooks = webhooks(sink)
    events = terminal_events(cluster.store)
    jobs = {ref: job_of(cluster.store, ref) for ref in refs}
    workers = Counter(
        line.message.removeprefix("ran on ")
        for j in jobs.values()
        for line in j.logs
        if line.message.startswith("ran on ")
    )
    print(
        f"\nbatch: {len(refs)} jobs, {sum(r[0] == 'success' for r in results.values())} succeeded,"
        f" runs per worker {dict(workers)}, terminal events {sum(events[j.id] for j in jobs.values())},"
        f" webhooks {sum(hooks[r] for r in refs)}"
    )
    assert len(results) == len(refs), f"{len(refs) - len(results)} jobs never finished"
    for ref, (status, png, detail) in results.items():
        assert status == "success", f"{ref}: {detail}"
        assert np.array_equal(pixels(png), embedded_outputs[refs[ref]]), f"{ref} differs from the embedded backend"
        job = jobs[ref]
        assert job.attempts == 1 and events[job.id] == 1, f"{ref} ran {job.attempts}x, {events[job.id]} ends"
        assert hooks[ref] == 1, f"{ref}: {hooks[ref]} webhooks"
    assert len(workers) == 2, f"one worker did everything: {workers}"


def test_chaos_workers_and_replicas_killed(cluster, fixtures, sink):
    client = Client(cluster)
    hook = f"{sink.base}/chaos"
    refs = []
    for i in range(20):
        if i % 2 == 0:
            refs.append(client.submit_runware(i, runware_task(fixtures, 100 + i, hook)))
        else:
            refs.append(client.submit_fal(i, fal_body(fixtures, 100 + i), hook))
    kills = Counter()

    def kill_worker_mid_job(pool_process_only: bool = False) -> None:
        """SIGKILL the worker running a job: the whole worker (a machine dying; a new one is started), or
        only its pool process (Celery gives the message back and forks a new one, which reloads the model)."""
        end = time.monotonic() + 60
        while time.monotonic() < end:
            for job_id in cluster.store.processing_ids():
                job = cluster.store.get(job_id)
                token = cluster.store.redis.get(cluster.store.key("lease", job_id))
                if job is None or job.progress == 0 or not token:
                    continue
                name = token.decode().split(":")[0]
                victim = next((w for w in cluster.workers if w.name == name and w.proc.poll() is None), None)
                if victim is None:
                    continue
                if pool_process_only:
                    children = Path(f"/proc/{victim.proc.pid}/task/{victim.proc.pid}/children").read_text().split()
                    for pid in children:
                        os.kill(int(pid), signal.SIGKILL)
                    kills["worker pool process"] += 1
                else:
                    victim.kill()
                    cluster.workers.remove(victim)
                    cluster.workers.append(cluster.worker())
                    kills["worker"] += 1
                return
            time.sleep(0.02)
        raise AssertionError("no job was seen running")

    def kill_replica(i: int) -> None:
        rep = cluster.replicas[i]
        rep.kill()
        kills["api"] += 1
        time.sleep(1.0)  # jobs finish meanwhile: their webhooks are this replica's or the other's
        cluster.replicas[i] = cluster.replica(cluster.ports[i])

    kill_worker_mid_job()
    kill_replica(0)
    kill_worker_mid_job()
    kill_replica(1)
    kill_worker_mid_job(pool_process_only=True)
    results = client.wait_all(refs, timeout=240)
    deadline = time.monotonic() + 30
    while sum(webhooks(sink)[r] > 0 for r in refs) < len(results) and time.monotonic() < deadline:
        time.sleep(0.2)
    hooks = webhooks(sink)
    events = terminal_events(cluster.store)
    jobs = [job_of(cluster.store, r) for r in refs]
    counts = Counter(status for status, _png, _d in results.values())
    reruns = sum(j.attempts > 1 for j in jobs if j is not None)
    errors = sorted({d for status, _png, d in results.values() if status == "error"})
    duplicate_hooks = sum(max(0, hooks[r] - 1) for r in refs)
    print(
        f"\nchaos: kills {dict(kills)}; {len(refs)} accepted, {counts['success']} completed"
        f" ({reruns} re-run after a lost worker), {counts['error']} failed {errors},"
        f" {len(refs) - len(results)} lost, {sum(max(0, events[j.id] - 1) for j in jobs if j)} finished twice,"
        f" webhooks {sum(hooks[r] for r in refs)} ({duplicate_hooks} duplicates,"
        f" {sum(hooks[r] == 0 for r in refs)} missing)"
    )
    assert kills == {"worker": 2, "api": 2, "worker pool process": 1}
    assert len(results) == len(refs), "jobs lost: " + ", ".join(r for r in refs if r not in results)
    assert all(j is not None and events[j.id] == 1 for j in jobs), "a job ended twice (or never)"
    for status, _png, detail in results.values():
        assert status == "success" or "interrupted" in detail.lower() or "died" in detail, detail
    assert counts["success"] >= len(refs) - 2 and reruns >= 1
    assert all(hooks[r] >= 1 for r in refs), "a finished job's webhook was lost"
    assert duplicate_hooks <= kills["api"], "more duplicate webhooks than replica kills"
    cluster.wait_ready(workers=2)  # the replacements came up and registered
