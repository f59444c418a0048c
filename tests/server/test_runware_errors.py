"""Failure paths as the official SDK sees them: a job that fails, a full queue, an expired output, a blocked
URL. The app runs in-process under uvicorn on 127.0.0.1 with a stand-in runner (no model needed), so each
failure can be caused on purpose; the SDK is unmodified and only pointed at it."""

from __future__ import annotations

import asyncio
import base64
import io
import threading
import time
import uuid

import httpx
import pytest
import uvicorn
from PIL import Image
from runware import Runware, RunwareError, file_to_data_uri

from ccsr.api.app import create_app
from ccsr.api.settings import Settings
from ccsr.jobs import RunOutput, build_embedded_engine

pytestmark = pytest.mark.timeout(120)


class StandInRunner:
    """Encodes a flat image of the asked size; fails when the prompt says so; waits on ``gate``."""

    def __init__(self):
        self.gate = threading.Event()
        self.gate.set()

    def load(self) -> None:
        pass

    def run(self, job, input_bytes, *, progress, should_cancel, log) -> RunOutput:
        while not self.gate.wait(0.01):
            pass
        if job.params.prompt == "fail":
            raise RuntimeError("the model ran out of memory")
        w, h = Image.open(io.BytesIO(input_bytes)).size
        size = (round(w * job.params.scale), round(h * job.params.scale))
        buf = io.BytesIO()
        Image.new("RGB", size, (10, 20, 30)).save(buf, "PNG")
        progress(1.0)
        return RunOutput(buf.getvalue(), "image/png", "png", *size, seed=job.params.seed)


@pytest.fixture
def app_server(tmp_path):
    """(base_url, runner, settings) for an in-process server with a stand-in runner and a queue of 2."""
    runner = StandInRunner()
    settings = Settings(data_dir=tmp_path, api_keys=["k"], max_queue=2, image_ttl=3600)
    engine = build_embedded_engine(tmp_path, runner=runner, max_queue=2, image_ttl=3600)
    app = create_app(settings, engine=engine)
    sock_port = _free_port()
    server = uvicorn.Server(uvicorn.Config(app, host="127.0.0.1", port=sock_port, log_level="warning"))
    t = threading.Thread(target=server.run, daemon=True)
    t.start()
    end = time.monotonic() + 20
    while not server.started and time.monotonic() < end:
        time.sleep(0.02)
    yield f"127.0.0.1:{sock_port}", runner, engine
    runner.gate.set()
    server.should_exit = True
    t.join(10)


def _free_port() -> int:
    import socket

    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def png(size=(12, 10)) -> bytes:
    buf = io.BytesIO()
    Image.new("RGB", size, (200, 100, 0)).save(buf, "PNG")
    return buf.getvalue()


def rw(hostport: str, transport: str, **kw) -> Runware:
    return Runware(
        api_key="k",
        transport=transport,
        ws_base_url=f"ws://{hostport}/v1",
        http_base_url=f"http://{hostport}/v1",
        **kw,
    )


def task(image: str, **kw) -> dict:
    return {
        "taskType": "upscale",
        "model": "runware:501@1",
        "inputs": {"image": image},
        "upscaleFactor": 2,
        **kw,
    }


@pytest.mark.parametrize("transport", ["websocket", "rest"])
def test_failed_job_raises_provider_error(app_server, transport):
    hostport, _, _ = app_server

    async def go():
        # max_retries=0: REST would otherwise re-POST the 500 three times (the same cached failure each time)
        async with rw(hostport, transport, max_retries=0) as c:
            for delivery in ("async", "sync"):
                tid = str(uuid.uuid4())
                with pytest.raises(RunwareError) as e:
                    await c.run(
                        task(
                            file_to_data_uri(png()),
                            taskUUID=tid,
                            deliveryMethod=delivery,
                            settings={"positivePrompt": "fail"},
                        )
                    )
                assert e.value.code == "provider" and e.value.task_uuid == tid
                assert "out of memory" in e.value.message

    asyncio.run(go())


def test_full_queue_is_a_rate_limit(app_server):
    hostport, runner, _ = app_server
    runner.gate.clear()
    image = base64.b64encode(png()).decode()
    headers = {"Authorization": "Bearer k"}
    codes = []
    for _ in range(3):
        r = httpx.post(
            f"http://{hostport}/v1",
            headers=headers,
            timeout=10,
            json=[task(image, taskUUID=str(uuid.uuid4()), deliveryMethod="async")],
        )
        codes.append(r.status_code)
    assert codes == [200, 200, 429]
    assert r.json()["errors"][0]["code"] == "rateLimitExceeded"

    async def go():
        async with rw(hostport, "rest", max_retries=0) as c:
            with pytest.raises(RunwareError) as e:
                await c.run(task(image, deliveryMethod="async"))
            assert e.value.code == "rateLimit" and e.value.status_code == 429

    asyncio.run(go())
    runner.gate.set()


def test_outputs_expire_with_their_ttl(app_server):
    hostport, _, engine = app_server

    async def go():
        async with rw(hostport, "rest") as c:
            out = await c.run(task(file_to_data_uri(png()), deliveryMethod="sync", ttl=60, outputFormat="PNG"))
            return out[0]

    item = asyncio.run(go())
    assert httpx.get(item["imageURL"]).status_code == 200
    rec = engine.images.get(item["imageUUID"])
    assert rec is not None and 59 <= rec.expires_at - rec.created_at <= 61
    # time passes: the image is gone from its URL and can no longer be used as an input
    engine.images.put(
        engine.images.read(rec.id), content_type="image/png", width=24, height=20, ttl=0.01, image_id=rec.id
    )
    time.sleep(0.05)
    assert httpx.get(item["imageURL"]).status_code == 404
    r = httpx.post(
        f"http://{hostport}/v1",
        headers={"Authorization": "Bearer k"},
        timeout=10,
        json=[task(rec.id, taskUUID=str(uuid.uuid4()), deliveryMethod="sync")],
    )
    assert r.status_code == 400 and r.json()["errors"][0]["code"] == "invalidInputImage"


def test_private_urls_are_refused(app_server):
    hostport, _, _ = app_server
    headers = {"Authorization": "Bearer k"}
    for field, value, code in (
        ("inputs", {"image": "http://169.254.169.254/latest/meta-data"}, "invalidInputImageURL"),
        ("webhookURL", "http://10.0.0.1/hook", "invalidWebhookURL"),
        ("uploadEndpoint", "file:///etc/passwd", "invalidUploadEndpoint"),
    ):
        t = task(base64.b64encode(png()).decode(), taskUUID=str(uuid.uuid4()), deliveryMethod="sync")
        t[field] = value
        r = httpx.post(f"http://{hostport}/v1", headers=headers, json=[t], timeout=10)
        assert r.status_code == 400, r.text
        assert r.json()["errors"][0]["code"] == code


def test_keys_optional_on_loopback_only_and_required_once_configured():
    open_dev = Settings()
    assert open_dev.key_ok(None, "127.0.0.1") and open_dev.key_ok("anything", "::1")
    assert not open_dev.key_ok("anything", "192.0.2.7")  # no keys configured: remote clients are refused
    keyed = Settings(api_keys=["k1", "k2"])
    assert keyed.key_ok("k2", "192.0.2.7") and not keyed.key_ok("k3", "127.0.0.1")
    assert not keyed.key_ok(None, "127.0.0.1")
