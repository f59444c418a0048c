"""The playground router without a browser or a model: page and assets, config, auth, the event stream."""

from __future__ import annotations

import io
import json
from dataclasses import replace

import pytest
from fastapi.testclient import TestClient
from PIL import Image

from ccsr.api.app import create_app
from ccsr.api.fal_schema import CCSRInput
from ccsr.api.playground import router, snapshot
from ccsr.api.settings import Settings
from ccsr.jobs import JobSpec, build_embedded_engine
from ccsr.jobs.types import LogLine
from ccsr.params import UpscaleParams

KEY = "k-playground"


class NoRunner:
    """The engine is never started here: jobs stay queued until they are cancelled."""

    def load(self) -> None:
        raise AssertionError("not used")

    def run(self, *a, **kw):
        raise AssertionError("not used")


def make_app(tmp_path, **settings):
    engine = build_embedded_engine(tmp_path, runner=NoRunner())
    app = create_app(Settings(api_keys=[KEY], data_dir=tmp_path, **settings), engine=engine)
    if not any(getattr(r, "path", None) == "/playground/config" for r in app.routes):
        app.include_router(router)  # until app.py lists ccsr.api.playground itself
    return app, engine


@pytest.fixture
def app_engine(tmp_path):
    return make_app(tmp_path)


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
    assert client.get("/playground/config").json()["keys_required"] is True
    icon = client.get("/favicon.ico")
    assert icon.status_code == 200 and icon.headers["content-type"] == "image/svg+xml"
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


def test_models_describe_the_form_with_the_servers_defaults(tmp_path):
    """The page has no defaults of its own: each model's parameters carry the server's (the library's, or
    ``--default-steps``), the ranges the fal API checks, and help that is not the schema's description."""
    app, _ = make_app(tmp_path)
    (model,) = TestClient(app).get("/playground/models").json()
    assert (model["fal_app_id"], model["runware_model"], model["status"]) == ("fal-ai/ccsr", "runware:501@1", "loading")
    params = {p["name"]: p for p in model["parameters"]}
    core = UpscaleParams()
    assert (params["steps"]["default"], params["t_max"]["default"], params["scale"]["default"]) == (
        core.steps,
        core.t_max,
        core.scale,
    )
    assert "reference CCSR" in params["steps"]["help"] and "50" in params["steps"]["help"]
    fal = CCSRInput.model_json_schema()["properties"]
    for name, p in params.items():
        if p["api"] == "runware":
            continue
        assert p["help"] and fal[name]["description"] not in p["help"], name
        for bound in ("minimum", "maximum"):
            if bound in fal[name]:
                assert p[bound] == fal[name][bound], (name, bound)
    # tiling is the server's to plan unless chosen; sizes only apply with a mode
    assert params["tile_diffusion"]["default"] is None and params["tile_vae"]["default"] is None
    assert params["tile_diffusion"]["options"][0] == {"value": None, "label": "automatic"}
    assert params["tile_diffusion_size"]["needs"] == {"tile_diffusion": ["mix", "gaussian"]}
    assert "tile_vae_encoder_size" not in params  # no effect on CCSR-v1

    app, _ = make_app(tmp_path / "b", default_steps=30)
    (model,) = TestClient(app).get("/playground/models").json()
    steps = next(p for p in model["parameters"] if p["name"] == "steps")
    assert steps["default"] == 30 and "--default-steps" in steps["help"]


def test_snapshot_reports_the_plan_that_ran(app_engine):
    _, engine = app_engine
    job = queued_job(engine)
    assert "plan" not in snapshot(job, engine)
    logs = (
        LogLine(1.0, "plan: 40 network evaluations (tiles x steps); untiled; VAE decode whole; ~9.00 of 8.00 GiB"),
        LogLine(2.0, "out of memory: planning again with smaller tiles"),
        LogLine(3.0, "plan: 80 network evaluations (tiles x steps); mix tiles 512/448 px x 2; VAE decode whole"),
        LogLine(4.0, "timings: ..."),
    )
    snap = snapshot(replace(job, status="success", logs=logs), engine)
    assert snap["plan"] == "80 network evaluations (tiles x steps); mix tiles 512/448 px x 2; VAE decode whole"
