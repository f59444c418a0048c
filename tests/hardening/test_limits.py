"""Every limit answers in the caller's protocol: Runware ``{"errors": [{code, message}]}`` with a code from
the SDK's families (protocols.md A.1), fal a FastAPI-style ``detail``."""

from __future__ import annotations

import io
import json

import pytest
from hardening_helpers import data_uri, png_bytes, rw_upscale
from PIL import Image
from starlette.websockets import WebSocketDisconnect

FAL = "/fal-ai/ccsr"


def _rw_code(resp) -> str:
    body = resp.json()
    assert set(body) >= {"errors"}, body
    return body["errors"][0]["code"]


def _nested(depth: int) -> str:
    return "[" * depth + "]" * depth


# ------------------------------------------------------------------------------------------ body size


def test_body_size_declared_and_streamed(make_client):
    c = make_client(max_body_bytes=2000)
    big = json.dumps([rw_upscale("x" * 5000)])
    r = c.post("/v1", content=big, headers={"content-type": "application/json"})
    assert r.status_code == 413 and _rw_code(r) == "invalidRequestSize"
    r = c.post(FAL, content=json.dumps({"image_url": "x" * 5000}))
    assert r.status_code == 413
    assert isinstance(r.json()["detail"], str) and r.headers["x-fal-error-type"] == "request_too_large"

    def chunks():  # no Content-Length: the limit is found while streaming
        for _ in range(10):
            yield b"[" + b" " * 500

    r = c.post("/v1", content=chunks())
    assert r.status_code == 413 and _rw_code(r) == "invalidRequestSize"
    r = c.post("/v1", content=json.dumps([{"taskType": "ping"}]))  # small bodies still pass
    assert r.status_code == 200, r.text


# ------------------------------------------------------------------------------------------ JSON depth


@pytest.mark.parametrize("depth", [40, 100_000])
def test_json_depth(make_client, depth):
    c = make_client(max_json_depth=32)
    r = c.post("/v1", content=_nested(depth))
    assert r.status_code == 400 and _rw_code(r) == "invalidRequestBody"
    r = c.post(FAL, content='{"image_url": ' + _nested(depth) + "}")
    assert r.status_code == 422
    assert r.json()["detail"][0]["type"] == "value_error.json_depth"


def test_brackets_inside_strings_do_not_count(make_client):
    c = make_client(max_json_depth=4)
    task = {"taskType": "ping", "taskUUID": '[[[[[[[[[[ {{{{{{{{ \\" [[[['}
    r = c.post("/v1", json=[task])
    assert r.status_code == 200, r.text


# ------------------------------------------------------------------------------------------ task count


def test_tasks_per_request(make_client):
    c = make_client(max_tasks=3)
    r = c.post("/v1", json=[{"taskType": "getResponse", "taskUUID": "x"}] * 4)
    assert r.status_code == 400 and _rw_code(r) == "invalidTaskCount"
    r = c.post(
        "/v1", json=[{"taskType": "authentication", "apiKey": "k"}] + [{"taskType": "getResponse", "taskUUID": "x"}] * 3
    )
    assert _rw_code(r) == "taskNotFound"  # 3 tasks (+ authentication) are within the limit


# ------------------------------------------------------------------------------------------ WebSocket


def _ws_auth(ws) -> None:
    ws.send_text(json.dumps([{"taskType": "authentication", "apiKey": "k"}]))
    assert "data" in json.loads(ws.receive_text())


def test_ws_frame_size_depth_and_task_count(make_client):
    c = make_client(max_body_bytes=3000, max_tasks=2, max_json_depth=8)
    with c.websocket_connect("/v1") as ws:
        _ws_auth(ws)
        ws.send_text(_nested(50))
        assert json.loads(ws.receive_text())["errors"][0]["code"] == "invalidRequestBody"
        ws.send_text(json.dumps([{"taskType": "getResponse", "taskUUID": "x"}] * 4))
        assert json.loads(ws.receive_text())["errors"][0]["code"] == "invalidTaskCount"
        ws.send_text(json.dumps([{"taskType": "ping"}]))  # the connection survived both
        assert json.loads(ws.receive_text())["data"][0]["pong"] is True
        ws.send_text(json.dumps([rw_upscale("x" * 5000)]))
        assert json.loads(ws.receive_text())["errors"][0]["code"] == "invalidRequestSize"
        with pytest.raises(WebSocketDisconnect) as e:
            ws.receive_text()
        assert e.value.code == 1009


def test_ws_idle_timeout(make_client):
    c = make_client(ws_idle_timeout=0.3)
    with c.websocket_connect("/v1") as ws:
        _ws_auth(ws)
        frame = json.loads(ws.receive_text())  # nothing sent: the server speaks first, then closes
        assert frame["errors"][0]["code"] == "connectionTimeout"
        with pytest.raises(WebSocketDisconnect):
            ws.receive_text()


def test_ws_idle_timeout_spares_pending_sync_task(make_client, runner):
    c = make_client(ws_idle_timeout=0.2)
    runner.gate.clear()
    with c.websocket_connect("/v1") as ws:
        _ws_auth(ws)
        task = rw_upscale(data_uri(png_bytes()), deliveryMethod="sync")
        ws.send_text(json.dumps([task]))
        assert runner.started.wait(10)
        import time

        time.sleep(0.6)  # several idle periods pass while the job runs
        runner.gate.set()
        frame = json.loads(ws.receive_text())
        assert frame["data"][0]["taskUUID"] == task["taskUUID"], frame


# ------------------------------------------------------------------------------------------ pixels, queue


def _huge_png() -> bytes:
    buf = io.BytesIO()
    Image.new("1", (8000, 8000)).save(buf, "PNG")  # 64 MP in a few KB: refused from the header
    return buf.getvalue()


def test_pixels_in_and_out(make_client):
    c = make_client()
    huge = data_uri(_huge_png())
    r = c.post("/v1", json=[rw_upscale(huge)])
    assert r.status_code == 400 and _rw_code(r) == "invalidInputImage"
    assert "pixels" in r.json()["errors"][0]["message"]
    r = c.post(FAL, json={"image_url": huge})
    assert r.status_code == 422 and isinstance(r.json()["detail"], list)
    # output over the cap: fal refuses with a typed detail, Runware shrinks the input (as Runware documents)
    c2 = make_client(max_output_side=24)
    r = c2.post(FAL, json={"image_url": data_uri(png_bytes()), "scale": 2})
    assert r.status_code == 422 and r.json()["detail"][0]["type"] == "image_too_large"
    r = c2.post("/v1", json=[rw_upscale(data_uri(png_bytes()))])
    assert r.status_code == 200, r.text


def test_queue_depth(make_client, runner):
    c = make_client(max_queue=1)
    runner.gate.clear()
    img = data_uri(png_bytes())
    assert c.post("/v1", json=[rw_upscale(img)]).status_code == 200
    r = c.post("/v1", json=[rw_upscale(img)])
    assert r.status_code == 429 and _rw_code(r) == "rateLimitExceeded" and r.headers["retry-after"]
    r = c.post(f"/queue{FAL}", json={"image_url": img})
    assert r.status_code == 429 and r.json()["error_type"] == "rate_limited" and r.headers["retry-after"]
