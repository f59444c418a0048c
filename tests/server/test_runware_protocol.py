"""The Runware wire rules a client depends on (protocols.md A.6), checked on the raw wire against a real
server: handshake and session resume, ping, several tasks per frame routed by taskUUID, error shapes and HTTP
codes, progress items, idempotent taskUUIDs, images at stable URLs, ops endpoints; plus the library parity of
outputs and the output cap (with the tiny model in-process)."""

from __future__ import annotations

import asyncio
import base64
import io
import json
import time
import uuid

import httpx
import pytest
import websockets
from PIL import Image

pytestmark = pytest.mark.timeout(240)


def image_size(data: bytes) -> tuple[int, int]:
    return Image.open(io.BytesIO(data)).size


def post(server, tasks, key: str | None = "default", **kw) -> httpx.Response:
    headers = (
        {} if key is None else {"Authorization": f"Bearer {server.api_key if key == 'default' else key}"}
    )
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
                assert item["taskType"] == "imageUpload" and item["imageURL"].endswith(
                    f"{item['imageUUID']}.png"
                )
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
    r = httpx.post(
        f"{server.http}/", json=[{"taskType": "authentication", "apiKey": server.api_key}, up], timeout=30
    )
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
    r = post(
        server, [{"taskType": "upscale", "taskUUID": str(uuid.uuid4()), "inputs": {"image": b64}, "ttl": 5}]
    )
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


def test_output_is_the_library_output_and_respects_the_cap(server, input_png, tiny_pipeline):
    """A server output is byte for byte what the library chain (imaging + pipeline) makes with the same
    settings and seed; an output over the cap shrinks the input first and keeps the exact asked-for size."""
    from ccsr import imaging
    from ccsr.jobs import Job, OutputOptions
    from ccsr.jobs.runner import CCSRRunner
    from ccsr.params import UpscaleParams

    params = UpscaleParams(scale=2, steps=2, seed=11, size_mode="pad")
    b64 = base64.b64encode(input_png).decode()
    r = post(
        server,
        [
            {
                "taskType": "upscale",
                "taskUUID": str(uuid.uuid4()),
                "inputs": {"image": b64},
                "upscaleFactor": 2,
                "outputFormat": "PNG",
                "deliveryMethod": "sync",
                "settings": {"steps": 2, "seed": 11},
            }
        ],
    )
    served = httpx.get(r.json()["data"][0]["imageURL"], timeout=30).content
    local = imaging.upscale_bytes(
        input_png,
        lambda rgb: tiny_pipeline.run(rgb, params),
        encode_options=imaging.EncodeOptions(format="PNG"),
        scale=2,
    )
    assert served == local.data

    runner = CCSRRunner(pipeline=tiny_pipeline)
    job = Job(
        id="j",
        status="processing",
        params=params.replace(scale=4.0),
        input_image_id="i",
        output=OutputOptions(format="png"),
        output_image_id=str(uuid.uuid4()),
        max_output=(100, 100),
    )
    lines: list[str] = []
    out = runner.run(job, input_png, progress=lambda f: None, should_cancel=lambda: False, log=lines.append)
    assert (out.width, out.height) == (100, 80) == image_size(out.data)
    assert (out.input_width, out.input_height) == (48, 40)
    assert any("shrunk" in line for line in lines)
