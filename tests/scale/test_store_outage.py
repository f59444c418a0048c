"""A Redis outage is "retry later" in each protocol's shape: 503 with Retry-After, no internal address, no
plain-text 500, on Runware REST and WebSocket, on every fal queue route and on `/readyz`."""

from __future__ import annotations

import json
import shutil
import uuid

import pytest
from fastapi.testclient import TestClient

from ccsr.api.app import create_app
from ccsr.api.settings import Settings
from ccsr.jobs.distributed import build_distributed_engine
from conftest import start_redis

pytestmark = pytest.mark.timeout(120)

FAL = "/fal-ai/ccsr"


@pytest.fixture
def doomed_redis(tmp_path):
    """A redis-server of this test's own, to be stopped by it."""
    binary = shutil.which("redis-server")
    if binary is None:
        pytest.fail("this test needs the redis-server binary")
    proc, url, port = start_redis(binary, tmp_path)
    yield url, proc, port
    if proc.poll() is None:
        proc.kill()
    proc.wait(10)


def _assert_unavailable(resp, port: int) -> None:
    assert resp.status_code == 503, (resp.status_code, resp.text)
    assert int(resp.headers["retry-after"]) > 0
    assert str(port) not in resp.text and "127.0.0.1" not in resp.text, resp.text
    resp.json()  # JSON, never plain text


def test_outage_answers_503_in_each_protocol(doomed_redis, tmp_path):
    url, proc, port = doomed_redis
    engine = build_distributed_engine(url, f"shared:{tmp_path}/images", send=lambda *_: None, tick=0.2)
    settings = Settings(data_dir=tmp_path / "unused", size_mode="pad")
    with TestClient(create_app(settings, engine=engine)) as c:
        tu = str(uuid.uuid4())
        proc.kill()
        proc.wait(10)

        r = c.post("/v1", json=[{"taskType": "getResponse", "taskUUID": tu}])
        _assert_unavailable(r, port)
        assert r.json()["errors"][0]["code"] == "serviceUnavailable"

        rid = str(uuid.uuid4())
        for method, path in (
            ("GET", f"{FAL}/requests/{rid}/status"),
            ("GET", f"/queue{FAL}/requests/{rid}"),
            ("PUT", f"/queue{FAL}/requests/{rid}/cancel"),
        ):
            r = c.request(method, path)
            _assert_unavailable(r, port)
            assert r.json()["error_type"] == "service_unavailable"
            assert r.headers["x-fal-retryable"] == "true"

        with c.websocket_connect("/v1") as ws:
            ws.send_text(json.dumps([{"taskType": "authentication", "apiKey": "k"}]))
            assert "data" in json.loads(ws.receive_text())
            ws.send_text(json.dumps([{"taskType": "getResponse", "taskUUID": tu}]))
            frame = json.loads(ws.receive_text())
            assert frame["errors"][0]["code"] == "serviceUnavailable", frame
            assert str(port) not in json.dumps(frame)

        r = c.get("/readyz")  # a load balancer's probe: not ready, and why, in words of our own
        _assert_unavailable(r, port)
        assert r.json()["status"] == "unavailable"
