"""The Runware wire rules a client depends on (protocols.md A.6), checked on the raw wire against a real
server: handshake and session resume, ping, several tasks per frame routed by taskUUID, error shapes and HTTP
codes, progress items, idempotent taskUUIDs, images at stable URLs, ops endpoints; plus the library parity of
outputs with ``ccsr upscale`` and the output cap."""

from __future__ import annotations

import asyncio
import base64
import io
import json
import os
import subprocess
import sys
import time
import uuid
from pathlib import Path

import httpx
import pytest
import websockets
from PIL import Image

pytestmark = pytest.mark.timeout(240)

REPO = Path(__file__).resolve().parents[2]


def image_size(data: bytes) -> tuple[int, int]:
    return Image.open(io.BytesIO(data)).size


def post(server, tasks, key: str | None = "default", **kw) -> httpx.Response:
    headers = {} if key is None else {"Authorization": f"Bearer {server.api_key if key == 'default' else key}"}
    return httpx.post(f"{server.http}/v1", json=tasks, headers=headers, timeout=60, **kw)


def poll(server, tid: str, timeout: float = 120.0) -> dict:
    end = time.monotonic() + timeout
    while time.monotonic() < end:
        r = post(server, [{"taskType": "getResponse", "taskUUID": tid}])
        body = r.json()
        if "errors" in body or body["data"][0].get("status") != "processing":
            return body
        time.sleep(0.1)
    raise AssertionError(f"task {tid} still processing after {timeout}s")


async def recv_until(ws, want: set[str], timeout: float = 60.0) -> dict[str, dict]:
    """Collect frames until every taskUUID (or 'ping'/'auth') in ``want`` has an item or an error."""
    got: dict[str, dict] = {}
    end = time.monotonic() + timeout
    while not want <= set(got):
        frame = json.loads(await asyncio.wait_for(ws.recv(), end - time.monotonic()))
        assert isinstance(frame, dict) and ("data" in frame or "errors" in frame), frame
        for item in frame.get("data", []):
            got[item.get("taskUUID") or item["taskType"]] = {"data": item}
        for err in frame.get("errors", []):
            got[err.get("taskUUID") or err.get("taskType")] = {"error": err}
    return got


def test_websocket_handshake_ping_and_multi_task_frames(server, input_png):
    async def go():
        async with websockets.connect(server.ws) as ws:
            # a task before authenticating: an error routed by its taskUUID, nothing broadcast
            early = str(uuid.uuid4())
            await ws.send(json.dumps([{"taskType": "imageUpload", "taskUUID": early, "image": "x"}]))
            err = json.loads(await ws.recv())["errors"][0]
            assert err["taskUUID"] == early and err["code"] == "missingApiKey"
            # a bad key: the error carries taskType authentication (the legacy SDK needs it)
            await ws.send(json.dumps([{"taskType": "authentication", "apiKey": "nope"}]))
            err = json.loads(await ws.recv())["errors"][0]
            assert err["taskType"] == "authentication" and err["code"] == "invalidApiKey"
            await ws.send(json.dumps([{"taskType": "authentication", "apiKey": server.api_key}]))
            auth = json.loads(await ws.recv())["data"][0]
            assert auth["taskType"] == "authentication" and isinstance(auth["connectionSessionUUID"], str)
            session = auth["connectionSessionUUID"]

            a, b, missing, other = (str(uuid.uuid4()) for _ in range(4))
            b64 = base64.b64encode(input_png).decode()
            await ws.send(
                json.dumps(
                    [
                        {"taskType": "ping", "ping": True},
                        {"taskType": "imageUpload", "taskUUID": a, "image": f"data:image/png;base64,{b64}"},
                        {"taskType": "imageUpload", "taskUUID": b, "image": b64},
                        {"taskType": "getResponse", "taskUUID": missing},
                        {"taskType": "modelSearch", "taskUUID": other},
                    ]
                )
            )
            got = await recv_until(ws, {"ping", a, b, missing, other})
            assert got["ping"]["data"] == {"taskType": "ping", "pong": True}
            for t in (a, b):
                item = got[t]["data"]
                assert item["taskType"] == "imageUpload" and item["imageURL"].endswith(f"{item['imageUUID']}.png")
            assert got[missing]["error"]["code"] == "taskNotFound"
            assert got[other]["error"]["code"] == "unsupportedTaskType"
            assert got[other]["error"]["taskType"] == "modelSearch"

        # a reconnect that presents the session UUID keeps it
        async with websockets.connect(server.ws.replace("/v1", "/")) as ws:
            msg = {"taskType": "authentication", "apiKey": server.api_key, "connectionSessionUUID": session}
            await ws.send(json.dumps([msg]))
            assert json.loads(await ws.recv())["data"][0]["connectionSessionUUID"] == session

    asyncio.run(go())


def test_rest_auth_envelopes_and_ops_endpoints(server, input_png):
    b64 = base64.b64encode(input_png).decode()
    up = {"taskType": "imageUpload", "taskUUID": str(uuid.uuid4()), "image": b64}
    # no key / wrong key: 401 with an invalidApiKey error
    for key in (None, "wrong"):
        r = post(server, [up], key=key)
        assert r.status_code == 401 and r.json()["errors"][0]["code"] == "invalidApiKey"
    # a leading authentication task instead of the header, at the root path
    r = httpx.post(f"{server.http}/", json=[{"taskType": "authentication", "apiKey": server.api_key}, up], timeout=30)
    assert r.status_code == 200, r.text
    item = r.json()["data"][-1]
    assert item["taskUUID"] == up["taskUUID"]
    img = httpx.get(item["imageURL"], timeout=30)
    assert img.status_code == 200 and img.headers["content-type"] == "image/png" and img.content == input_png
    assert httpx.get(f"{server.http}/images/{uuid.uuid4()}.png").status_code == 404
    # mediaStorage upload (the new SDK's preferred upload task) answers mediaUUID / mediaURL
    media = {"taskType": "mediaStorage", "taskUUID": str(uuid.uuid4()), "operation": "upload", "media": b64}
    item = post(server, [media]).json()["data"][0]
    assert item["operation"] == "upload" and item["mediaURL"].endswith(f"/images/{item['mediaUUID']}.png")
    # malformed bodies and unknown task types
    assert post(server, None, content=b"{nope").status_code == 400
    r = post(server, [{"taskType": "imageInference", "taskUUID": str(uuid.uuid4())}])
    assert r.status_code == 400 and r.json()["errors"][0]["code"] == "unsupportedTaskType"
    r = post(server, [{"taskType": "upscale", "taskUUID": str(uuid.uuid4()), "inputs": {"image": b64}, "ttl": 5}])
    assert r.status_code == 400 and r.json()["errors"][0]["parameter"] == "ttl"
    # ops
    assert httpx.get(f"{server.http}/healthz").json() == {"status": "ok"}
    assert httpx.get(f"{server.http}/readyz").status_code == 200
    assert httpx.get(f"{server.http}/docs").status_code == 200
    assert "/v1" in httpx.get(f"{server.http}/openapi.json").json()["paths"]


def test_progress_items_and_idempotent_task_uuids(server, input_png):
    b64 = base64.b64encode(input_png).decode()
    tid = str(uuid.uuid4())
    task = {
        "taskType": "upscale",
        "taskUUID": tid,
        "model": "runware:501@1",
        "inputs": {"image": f"data:image/png;base64,{b64}"},
        "upscaleFactor": 2,
        "outputFormat": "PNG",
        "deliveryMethod": "async",
        "settings": {"steps": 6, "seed": 2},
    }
    ack = post(server, [task])
    assert ack.status_code == 200 and ack.json() == {"data": [{"taskType": "upscale", "taskUUID": tid}]}
    first = post(server, [{"taskType": "getResponse", "taskUUID": tid}]).json()["data"][0]
    # the same task again (an SDK retry): the same job, ACKed again
    assert post(server, [task]).json() == ack.json()
    if first["status"] == "processing":
        assert first["taskType"] == "upscale" and 0 <= first["progress"] <= 100
        assert not any(k.endswith(("URL", "Base64Data", "DataURI")) for k in first)
    done = poll(server, tid)["data"][0]
    assert done["status"] == "success" and done["imageUUID"] == first["imageUUID"]
    assert image_size(httpx.get(done["imageURL"], timeout=30).content) == (96, 80)
    # a sync retry of the finished task answers its result; a different payload is a conflict
    again = post(server, [{**task, "deliveryMethod": "sync"}]).json()["data"][0]
    assert again["imageUUID"] == done["imageUUID"]
    r = post(server, [{**task, "upscaleFactor": 3}])
    assert r.status_code == 400 and r.json()["errors"][0]["code"] == "conflictTaskUUID"


def test_output_equals_ccsr_upscale_and_respects_the_cap(server, input_png, tmp_path):
    """The issue's bar: a Runware output is byte for byte what ``ccsr upscale`` writes for the same settings
    and seed. And a request over the output cap (this server: --max-output-side 192) shrinks the input first
    and returns exactly the capped size."""
    b64 = base64.b64encode(input_png).decode()

    def upscale(image: str, factor: int, **settings) -> dict:
        task = {
            "taskType": "upscale",
            "taskUUID": str(uuid.uuid4()),
            "inputs": {"image": image},
            "upscaleFactor": factor,
            "outputFormat": "PNG",
            "deliveryMethod": "sync",
            "settings": settings,
        }
        r = post(server, [task])
        assert r.status_code == 200, r.text
        return r.json()["data"][0]

    item = upscale(b64, 2, steps=2, seed=11)
    served = httpx.get(item["imageURL"], timeout=30).content
    (tmp_path / "in.png").write_bytes(input_png)
    weights, config = server.model
    cli = [sys.executable, "-m", "ccsr.cli", "upscale", str(tmp_path / "in.png"), "-o", str(tmp_path / "cli.png"),
           "--weights", str(weights), "--config", str(config), "--device", "cpu", "--dtype", "float32",
           "--scale", "2", "--steps", "2", "--seed", "11", "--size-mode", "pad", "-q"]  # fmt: skip
    env = {**os.environ, "PYTHONPATH": os.pathsep.join([str(REPO / "src"), os.environ.get("PYTHONPATH", "")])}
    p = subprocess.run(cli, env=env, capture_output=True, text=True, timeout=300)
    assert p.returncode == 0, p.stderr[-3000:]
    assert served == (tmp_path / "cli.png").read_bytes()

    # 96x80 x4 would be 384x320: the input is shrunk to 48x40 first, the output is the capped 192x160
    capped = upscale(item["imageUUID"], 4, steps=2, seed=1)
    assert image_size(httpx.get(capped["imageURL"], timeout=30).content) == (192, 160)
