"""Durability: SIGKILL the server with one job running and others queued, start it again on the same data
directory; every job then completes (the cut-off one is retried once) or fails with a clear error, and nothing
is lost. Jobs are submitted and polled over Runware REST, as a client would."""

from __future__ import annotations

import io
import sqlite3
import time
import uuid

import httpx
import pytest
from PIL import Image

pytestmark = pytest.mark.timeout(300)


def post(srv, tasks) -> httpx.Response:
    return httpx.post(f"{srv.http}/v1", json=tasks, headers={"Authorization": f"Bearer {srv.api_key}"}, timeout=60)


def status_of(srv, tid: str) -> dict:
    body = post(srv, [{"taskType": "getResponse", "taskUUID": tid}]).json()
    return body["errors"][0] if "errors" in body else body["data"][0]


def test_sigkill_with_running_and_queued_jobs(server_factory, input_png):
    import base64

    srv = server_factory("--api-key", "restart-key")
    srv.api_key = "restart-key"
    srv.start()
    b64 = base64.b64encode(input_png).decode()
    up = post(srv, [{"taskType": "imageUpload", "taskUUID": str(uuid.uuid4()), "image": b64}]).json()
    image = up["data"][0]["imageUUID"]
    tids = [str(uuid.uuid4()) for _ in range(3)]
    for i, tid in enumerate(tids):
        task = {
            "taskType": "upscale",
            "taskUUID": tid,
            "inputs": {"image": image},
            "upscaleFactor": 2,
            "outputFormat": "PNG",
            "deliveryMethod": "async",
            "settings": {"steps": 4, "seed": i},
        }
        assert post(srv, [task]).status_code == 200

    # wait until the first job is running (its progress is visible), then kill -9
    end = time.monotonic() + 120
    while time.monotonic() < end:
        first = status_of(srv, tids[0])
        if first.get("status") == "processing" and first.get("progress", 0) > 0:
            break
        assert first.get("status") == "processing", f"first job finished before the kill: {first}"
        time.sleep(0.02)
    else:
        raise AssertionError("the first job never started")
    srv.kill()

    db = sqlite3.connect(srv.data_dir / "jobs.db")
    states = dict(db.execute("SELECT json_extract(meta, '$.taskUUID'), status FROM jobs").fetchall())
    db.close()
    assert states[tids[0]] == "processing" and list(states.values()).count("queued") == 2

    again = server_factory("--api-key", "restart-key", port=srv.port, data_dir=srv.data_dir)
    again.api_key = "restart-key"
    again.start()
    results: dict[str, dict] = {}
    end = time.monotonic() + 180
    while len(results) < len(tids) and time.monotonic() < end:
        for tid in tids:
            if tid not in results:
                s = status_of(again, tid)
                if s.get("status") != "processing":
                    results[tid] = s
        time.sleep(0.2)
    assert set(results) == set(tids), f"jobs lost or stuck: {results}"
    for item in results.values():
        # success expected; a failure would have to say why (code + message), never vanish
        assert item.get("status") == "success", item
        img = httpx.get(item["imageURL"], timeout=30).content
        assert Image.open(io.BytesIO(img)).size == (96, 80)

    db = sqlite3.connect(again.data_dir / "jobs.db")
    attempts = dict(db.execute("SELECT json_extract(meta, '$.taskUUID'), attempts FROM jobs").fetchall())
    logs = db.execute("SELECT logs FROM jobs WHERE json_extract(meta, '$.taskUUID') = ?", (tids[0],)).fetchone()
    db.close()
    assert attempts[tids[0]] == 2 and "restart" in logs[0]


def test_sigkill_while_a_webhook_is_retried(server_factory, input_png, sink):
    """A finished job's webhook owed when the server dies is sent once it is back (and only once)."""
    import base64
    import json

    args = ("--api-key", "restart-key", "--allow-fetch-host", f"127.0.0.1:{sink.port}")
    srv = server_factory(*args)
    srv.api_key = "restart-key"
    srv.start()
    tid = str(uuid.uuid4())
    hook = f"/restart-hook/{tid}"
    sink.refusing.add(hook)  # the receiver is down: the webhook is retried with backoff
    try:
        task = {
            "taskType": "upscale",
            "taskUUID": tid,
            "inputs": {"image": "data:image/png;base64," + base64.b64encode(input_png).decode()},
            "upscaleFactor": 2,
            "outputFormat": "PNG",
            "deliveryMethod": "async",
            "webhookURL": sink.base + hook,
            "settings": {"steps": 2, "seed": 1},
        }
        assert post(srv, [task]).status_code == 200
        end = time.monotonic() + 120
        while sink.hits(hook) < 1 and time.monotonic() < end:
            time.sleep(0.02)
        assert sink.hits(hook, 503) >= 1, "the webhook was never tried"
        srv.kill()
    finally:
        sink.refusing.discard(hook)
    db = sqlite3.connect(srv.data_dir / "jobs.db")
    owed = db.execute("SELECT json_extract(meta, '$.taskUUID') FROM jobs JOIN announcements ON id = job_id").fetchall()
    db.close()
    assert owed == [(tid,)]

    again = server_factory(*args, port=srv.port, data_dir=srv.data_dir)
    again.start()
    body = json.loads(sink.wait_for(lambda r: r["path"] == hook and r["status"] == 200, timeout=60)["body"])
    item = body["data"][0]
    assert (item["taskUUID"], item["status"]) == (tid, "success")
    assert Image.open(io.BytesIO(httpx.get(item["imageURL"], timeout=30).content)).size == (96, 80)
    time.sleep(1.0)
    assert sink.hits(hook, 200) == 1
