"""The playground router without a browser or a model: page and assets, config, auth, the event stream."""

from __future__ import annotations

import io
import json
from dataclasses import replace

import pytest
from fastapi.testclient import TestClient
from PIL import Image

from ccsr.api.app import create_app
from ccsr.api.playground import router, snapshot
from ccsr.api.settings import Settings
from ccsr.jobs import JobSpec, build_embedded_engine
from ccsr.params import UpscaleParams

KEY = "k-playground"


class NoRunner:
    """The engine is never started here: jobs stay queued until they are cancelled."""

    def load(self) -> None:
        raise AssertionError("not used")

    def run(self, *a, **kw):
        raise AssertionError("not used")


@pytest.fixture
def app_engine(tmp_path):
    engine = build_embedded_engine(tmp_path, runner=NoRunner())
    app = create_app(Settings(api_keys=[KEY], data_dir=tmp_path), engine=engine)
    if not any(getattr(r, "path", None) == "/playground/config" for r in app.routes):
        app.include_router(router)  # until app.py lists ccsr.api.playground itself
    return app, engine


def queued_job(engine):
    buf = io.BytesIO()
    Image.new("RGB", (8, 8)).save(buf, "PNG")
    rec = engine.images.put(buf.getvalue(), content_type="image/png", width=8, height=8, kind="input")
    job, _ = engine.submit(JobSpec(params=UpscaleParams(steps=2, seed=1), input_image_id=rec.id, protocol="fal"))
    return job


def test_page_assets_and_config(app_engine):
    app, _ = app_engine
    client = TestClient(app)
    page = client.get("/")
    assert page.status_code == 200 and page.headers["content-type"].startswith("text/html")
    assert '<script src="/playground/static/app.js" defer>' in page.text
    assert client.get("/playground/static/app.js").headers["content-type"].startswith("text/javascript")
    assert client.get("/playground/static/style.css").headers["content-type"].startswith("text/css")
    assert client.get("/playground/static/index.html").status_code == 404
    cfg = client.get("/playground/config").json()
    steps = cfg["fal"]["schema"]["properties"]["steps"]
    assert (steps["default"], steps["minimum"], steps["maximum"]) == (50, 10, 100)
    assert cfg["runware"]["settings"]["CFGScale"]["default"] == 1.0
    assert cfg["keys_required"] is True
    # the Runware REST endpoint on "/" still answers POST next to the page's GET
    assert client.post("/", json=[{"taskType": "ping"}], headers={"Authorization": f"Bearer {KEY}"}).json() == {
        "data": [{"taskType": "ping", "pong": True}]
    }


def test_events_need_the_key_and_a_known_request(app_engine):
    app, _ = app_engine
    client = TestClient(app)
    assert client.get("/playground/events/nope").status_code == 401
    r = client.get("/playground/events/nope", headers={"Authorization": f"Key {KEY}"})
    assert r.status_code == 404 and r.json() == {"detail": "Request not found"}
    assert client.post("/playground/cancel/nope", headers={"Authorization": f"Bearer {KEY}"}).status_code == 404


def test_cancel_then_stream_ends_with_done(app_engine):
    app, engine = app_engine
    client = TestClient(app)
    job = queued_job(engine)
    auth = {"Authorization": f"Bearer {KEY}"}
    r = client.post(f"/playground/cancel/{job.id}", headers=auth)
    assert r.json() == {"status": "cancelled", "cancel_requested": True}
    with client.stream("GET", f"/playground/events/{job.id}", headers=auth) as s:
        assert s.headers["content-type"].startswith("text/event-stream")
        body = "".join(s.iter_text())
    events = [chunk.split("\n") for chunk in body.strip().split("\n\n")]
    assert [e[0] for e in events] == ["event: done"]
    data = json.loads(events[0][1].removeprefix("data: "))
    assert data["status"] == "cancelled" and data["error"]["code"] == "cancelled"


def test_snapshot_eta_from_elapsed_and_percent(app_engine):
    _, engine = app_engine
    job = queued_job(engine)
    assert snapshot(job, engine)["queue_position"] == 0
    running = replace(job, status="processing", progress=25, started_at=100.0)
    snap = snapshot(running, engine, now=110.0)
    assert (snap["progress"], snap["elapsed"], snap["eta"]) == (25, 10.0, 30.0)
