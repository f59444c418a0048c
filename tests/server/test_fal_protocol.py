"""fal wire protocol, in-process and fast: the adapter over the real engine with a fake runner (no model).

The end-to-end proof with the unmodified ``fal_client`` over TLS and the tiny model is test_fal_client.py;
these tests pin the wire details (status codes, bodies, headers, routes, webhooks, cancellation).
"""

from __future__ import annotations

import io
import json
import threading
import time
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer

import pytest

pytest.importorskip("fastapi")
from fastapi.testclient import TestClient
from httpx_sse import connect_sse
from PIL import Image

from ccsr.api.app import create_app
from ccsr.api.fal_schema import CCSRInput, parse_input, to_params
from ccsr.api.intake import MODELS_BY_NAME
from ccsr.api.settings import Settings
from ccsr.jobs import ErrorCode, JobCancelled, JobFailed, RunOutput, build_embedded_engine

APP = "fal-ai/ccsr"
AUTH = {"Authorization": "Key test-key"}


class FakeRunner:
    """Nearest-neighbour upscale, one ``step`` per ``steps`` with an optional delay, honouring cancel."""

    def __init__(self, step_delay: float = 0.0):
        self.step_delay = step_delay
        self.seen: list = []

    def load(self) -> None:
        pass

    def run(self, job, input_bytes, *, progress, should_cancel, log):
        p = job.params
        self.seen.append(p)
        im = Image.open(io.BytesIO(input_bytes)).convert("RGB")
        log(f"loaded input {im.width}x{im.height}")
        for i in range(p.steps):
            if should_cancel():
                raise JobCancelled()
            time.sleep(self.step_delay)
            progress((i + 1) / p.steps)
            log(f"tile 1/1 step {i + 1}/{p.steps}")
        w, h = round(im.width * p.scale), round(im.height * p.scale)
        out = im.resize((w, h), Image.NEAREST)
        buf = io.BytesIO()
        out.save(buf, "PNG")
        return RunOutput(buf.getvalue(), "image/png", "png", w, h, p.seed, im.width, im.height)


def png_data_uri(w=16, h=12, color=(200, 30, 40)) -> str:
    import base64

    buf = io.BytesIO()
    Image.new("RGB", (w, h), color).save(buf, "PNG")
    return "data:image/png;base64," + base64.b64encode(buf.getvalue()).decode()


class Sink:
    """A local webhook receiver on 127.0.0.1."""

    def __init__(self):
        self.received: list[dict] = []
        self.fail_first = 0
        sink = self

        class H(BaseHTTPRequestHandler):
            def do_POST(self):
                n = int(self.headers.get("content-length") or 0)
                body = self.rfile.read(n)
                if sink.fail_first > 0:
                    sink.fail_first -= 1
                    self.send_response(503)
                    self.end_headers()
                    return
                sink.received.append(
                    {
                        "path": self.path,
                        "body": json.loads(body),
                        "content_type": self.headers.get("content-type"),
                    }
                )
                self.send_response(200)
                self.end_headers()
                self.wfile.write(b"ok")

            def log_message(self, *a):
                pass

        self.server = ThreadingHTTPServer(("127.0.0.1", 0), H)
        self.port = self.server.server_address[1]
        self.thread = threading.Thread(target=self.server.serve_forever, daemon=True)
        self.thread.start()

    def url(self, path="/hook") -> str:
        return f"http://127.0.0.1:{self.port}{path}"

    def wait(self, n=1, timeout=15.0) -> list[dict]:
        t = time.time() + timeout
        while len(self.received) < n and time.time() < t:
            time.sleep(0.02)
        return self.received

    def close(self):
        self.server.shutdown()


@pytest.fixture
def sink():
    s = Sink()
    yield s
    s.close()


def make_client(tmp_path, runner, sink=None, **settings_kw):
    allow = [f"127.0.0.1:{sink.port}"] if sink else []
    settings = Settings(data_dir=tmp_path, fetch_allow_hosts=allow, **settings_kw)
    engine = build_embedded_engine(
        tmp_path, runner=runner, max_queue=settings.max_queue, fetch_allow_hosts=allow
    )
    engine.delivery.base_delay = 0.05
    app = create_app(settings, engine)
    return TestClient(app, base_url="https://127.0.0.1:8443"), engine


@pytest.fixture
def client(tmp_path):
    runner = FakeRunner()
    c, engine = make_client(tmp_path, runner)
    with c:
        c.runner = runner
        c.engine = engine
        yield c


def wait_done(client, status_url, timeout=20.0):
    t = time.time() + timeout
    while time.time() < t:
        r = client.get(status_url, headers=AUTH)
        if r.json()["status"] == "COMPLETED":
            return r
        time.sleep(0.02)
    raise AssertionError("not completed in time")


# ------------------------------------------------------------------------------------------- schema


def test_input_defaults_match_fal_schema():
    inp = CCSRInput(image_url="x")
    assert inp.model_dump() == {
        "image_url": "x",
        "scale": 2,
        "tile_diffusion": "none",
        "tile_diffusion_size": 1024,
        "tile_diffusion_stride": 512,
        "tile_vae": False,
        "tile_vae_decoder_size": 226,
        "tile_vae_encoder_size": 1024,
        "steps": 50,
        "t_max": 0.6667,
        "t_min": 0.3333,
        "color_fix_type": "adain",
        "seed": None,
    }


@pytest.mark.parametrize(
    "field,bad,good",
    [
        ("scale", 4.01, 4),
        ("scale", 0.99, 1),
        ("tile_diffusion_size", 255, 2048),
        ("tile_diffusion_stride", 1025, 128),
        ("tile_vae_decoder_size", 63, 64),
        ("tile_vae_encoder_size", 2049, 128),
        ("steps", 9, 10),
        ("steps", 101, 100),
        ("t_max", 1.01, 1),
        ("t_min", -0.01, 0),
        ("tile_diffusion", "tiled", "gaussian"),
        ("color_fix_type", "hist", "wavelet"),
    ],
)
def test_input_ranges(field, bad, good):
    from ccsr.api.fal_schema import FalInputError

    with pytest.raises(FalInputError) as e:
        parse_input({"image_url": "x", field: bad})
    assert e.value.status == 422 and e.value.detail[0]["loc"] == ["body", field]
    assert getattr(parse_input({"image_url": "x", field: good}), field) == good


V1 = MODELS_BY_NAME["ccsr-v1"]


def test_params_mapping_and_seed():
    p = to_params(
        parse_input(
            {
                "image_url": "x",
                "scale": 1.5,
                "tile_diffusion": "mix",
                "tile_diffusion_size": 300,
                "tile_diffusion_stride": 130,
                "tile_vae": True,
                "tile_vae_decoder_size": 100,
                "tile_vae_encoder_size": 512,
                "steps": 12,
                "t_max": 0.9,
                "t_min": 0.1,
                "color_fix_type": "wavelet",
                "seed": 77,
            }
        ),
        V1, Settings(),
    )
    assert (p.scale, p.tile_diffusion, p.tile_diffusion_size, p.tile_diffusion_stride) == (
        1.5,
        "mix",
        296,
        128,
    )
    assert (p.tile_vae, p.tile_vae_decoder_size, p.tile_vae_encoder_size) == (True, 100, 512)
    assert (p.steps, p.t_max, p.t_min, p.color_fix, p.seed) == (12, 0.9, 0.1, "wavelet", 77)
    seeds = {to_params(parse_input({"image_url": "x"}), V1, Settings()).seed for _ in range(5)}
    assert len(seeds) > 1 and all(isinstance(s, int) and s >= 0 for s in seeds)


# ------------------------------------------------------------------------------------------- sync


def test_sync_run_output_shape_and_headers(client):
    r = client.post(
        f"/{APP}", json={"image_url": png_data_uri(16, 12), "scale": 2, "steps": 10, "seed": 5}, headers=AUTH
    )
    assert r.status_code == 200, r.text
    assert r.headers["x-fal-request-id"]
    out = r.json()
    assert set(out) == {"image", "seed"} and out["seed"] == 5
    img = out["image"]
    assert set(img) == {"url", "content_type", "file_name", "file_size", "width", "height"}
    assert (img["width"], img["height"], img["content_type"]) == (32, 24, "image/png")
    assert img["url"].startswith("https://127.0.0.1:8443/") and img["url"].endswith(img["file_name"])
    got = client.get(img["url"])
    assert got.status_code == 200 and len(got.content) == img["file_size"]
    assert Image.open(io.BytesIO(got.content)).size == (32, 24)
    # every input is mapped onto UpscaleParams
    assert client.runner.seen[-1].steps == 10 and client.runner.seen[-1].seed == 5


def test_sync_seed_drawn_and_returned(client):
    r = client.post(f"/{APP}", json={"image_url": png_data_uri(), "steps": 10}, headers=AUTH)
    assert r.status_code == 200
    assert isinstance(r.json()["seed"], int) and client.runner.seen[-1].seed == r.json()["seed"]


def test_output_url_chains_as_input(client):
    out = client.post(f"/{APP}", json={"image_url": png_data_uri(8, 8), "steps": 10}, headers=AUTH).json()
    r = client.post(f"/{APP}", json={"image_url": out["image"]["url"], "steps": 10}, headers=AUTH)
    assert r.status_code == 200, r.text
    assert r.json()["image"]["width"] == 32


def test_validation_422_fastapi_style(client):
    r = client.post(f"/{APP}", json={"scale": 2}, headers=AUTH)
    assert r.status_code == 422
    assert r.headers["x-fal-request-id"]
    d = r.json()["detail"]
    assert d == [
        {"type": "missing", "loc": ["body", "image_url"], "msg": "Field required", "input": {"scale": 2}}
    ]
    r = client.post(f"/{APP}", json={"image_url": png_data_uri(), "t_min": 0.9, "t_max": 0.2}, headers=AUTH)
    assert r.status_code == 422 and r.json()["detail"][0]["loc"] == ["body", "t_min"]
    r = client.post(f"/{APP}", content=b"{nope", headers={**AUTH, "content-type": "application/json"})
    assert r.status_code == 422 and r.json()["detail"][0]["type"] == "json_invalid"


@pytest.mark.parametrize(
    "url,etype",
    [
        ("data:image/png;base64,AAAA", "image_load_error"),
        ("data:image/png;base64,@@@", "image_load_error"),
        ("ftp://example.com/x.png", "file_download_error"),
        ("http://127.0.0.1:1/x.png", "file_download_error"),
        ("https://127.0.0.1:8443/images/00000000-0000-0000-0000-000000000000.png", "file_download_error"),
    ],
)
def test_unreadable_image_is_422(client, url, etype):
    r = client.post(f"/{APP}", json={"image_url": url}, headers=AUTH)
    assert r.status_code == 422, r.text
    d = r.json()["detail"][0]
    assert d["loc"] == ["body", "image_url"] and d["type"] == etype and d["url"].endswith(etype)


def test_sub_path_and_unknown_app(client):
    r = client.post(f"/{APP}/some/path", json={"image_url": png_data_uri(), "steps": 10}, headers=AUTH)
    assert r.status_code == 200
    assert client.post("/fal-ai/other", json={"image_url": png_data_uri()}, headers=AUTH).status_code in (
        404,
        405,
    )


def test_key_required_off_loopback(tmp_path):
    c, _ = make_client(tmp_path, FakeRunner(), api_keys=["sekret"])
    with c:
        body = {"image_url": png_data_uri(), "steps": 10}
        assert c.post(f"/{APP}", json=body, headers={"Authorization": "Key nope"}).status_code == 401
        assert c.post(f"/{APP}", json=body, headers={"Authorization": "Key sekret"}).status_code == 200


# ------------------------------------------------------------------------------------------- queue


def test_queue_flow(client):
    r = client.post(f"/queue/{APP}", json={"image_url": png_data_uri(), "steps": 10, "seed": 3}, headers=AUTH)
    assert r.status_code == 200, r.text
    sub = r.json()
    rid = sub["request_id"]
    assert sub["status"] == "IN_QUEUE" and isinstance(sub["queue_position"], int)
    base = f"https://127.0.0.1:8443/queue/{APP}/requests/{rid}"
    assert (sub["response_url"], sub["status_url"], sub["cancel_url"]) == (
        base,
        base + "/status",
        base + "/cancel",
    )
    assert r.headers["x-fal-request-id"] == rid
    done = wait_done(client, sub["status_url"] + "?logs=1")
    assert done.status_code == 200
    st = done.json()
    assert st["status"] == "COMPLETED" and st["metrics"]["inference_time"] >= 0
    msgs = [ln["message"] for ln in st["logs"]]
    assert any("step 10/10" in m for m in msgs) and any(m.startswith("done in") for m in msgs)
    assert set(st["logs"][0]) == {"message", "level", "source", "timestamp"}
    # logs=false -> logs key present, null
    st2 = client.get(sub["status_url"] + "?logs=false", headers=AUTH).json()
    assert "logs" in st2 and st2["logs"] is None
    res = client.get(sub["response_url"], headers=AUTH)
    assert res.status_code == 200 and res.json()["seed"] == 3
    # trailing slashes, and the request routes also without /queue
    assert client.get(sub["response_url"] + "/", headers=AUTH).json() == res.json()
    assert client.get(f"/{APP}/requests/{rid}/status/", headers=AUTH).json()["status"] == "COMPLETED"
    # cancel when finished
    c = client.put(sub["cancel_url"], headers=AUTH)
    assert c.status_code == 400 and c.json() == {"status": "ALREADY_COMPLETED"}
    # unknown ids
    assert client.get(f"/queue/{APP}/requests/nope/status", headers=AUTH).status_code == 404
    assert client.put(f"/queue/{APP}/requests/nope/cancel", headers=AUTH).json() == {"status": "NOT_FOUND"}


def test_queue_host_submits(client):
    r = client.post(
        f"/{APP}/sub/path",
        json={"image_url": png_data_uri(), "steps": 10},
        headers={**AUTH, "Host": "queue.localhost:9999"},
    )
    assert r.status_code == 200 and r.json()["status"] == "IN_QUEUE"
    assert r.json()["status_url"].startswith(f"https://queue.localhost:9999/{APP}/requests/")


def test_queue_validation_is_422(client):
    r = client.post(f"/queue/{APP}", json={"scale": 9}, headers=AUTH)
    assert r.status_code == 422
    assert {tuple(d["loc"]) for d in r.json()["detail"]} == {("body", "image_url"), ("body", "scale")}


def test_cancel_queued_and_running(tmp_path):
    runner = FakeRunner(step_delay=0.05)
    c, _engine = make_client(tmp_path, runner)
    with c:
        a = c.post(f"/queue/{APP}", json={"image_url": png_data_uri(), "steps": 60}, headers=AUTH).json()
        b = c.post(f"/queue/{APP}/x/y", json={"image_url": png_data_uri(), "steps": 10}, headers=AUTH).json()
        st = c.get(b["status_url"], headers=AUTH)
        assert st.status_code == 202 and st.json() == {**st.json(), "status": "IN_QUEUE", "queue_position": 0}
        # cancel the queued one through the sub-path-free URL the client builds itself
        r = c.put(f"/queue/{APP}/requests/{b['request_id']}/cancel", headers=AUTH)
        assert r.status_code == 202 and r.json() == {"status": "CANCELLATION_REQUESTED"}
        st = c.get(b["status_url"], headers=AUTH).json()
        assert st["status"] == "COMPLETED" and st["error_type"] == "client_cancelled"
        res = c.get(b["response_url"], headers=AUTH)
        assert res.status_code == 499 and res.headers["x-fal-error-type"] == "client_cancelled"
        # cancel the running one: it stops between steps, long before its 60 steps are done
        while c.get(a["status_url"], headers=AUTH).json()["status"] != "IN_PROGRESS":
            time.sleep(0.01)
        r = c.put(a["cancel_url"], headers=AUTH)
        assert r.status_code == 202
        st = wait_done(c, a["status_url"] + "?logs=true").json()
        assert st["error_type"] == "client_cancelled"
        msgs = [ln["message"] for ln in st["logs"]]
        assert msgs[-1] == "cancelled" and "tile 1/1 step 60/60" not in msgs
        assert not any(m.startswith("done in") for m in msgs)


def test_queue_full_is_429(tmp_path):
    runner = FakeRunner(step_delay=0.05)
    c, _ = make_client(tmp_path, runner, max_queue=1)
    with c:
        body = {"image_url": png_data_uri(), "steps": 40}
        first = c.post(f"/queue/{APP}", json=body, headers=AUTH)
        assert first.status_code == 200
        r = c.post(f"/queue/{APP}", json=body, headers=AUTH)
        assert r.status_code == 429 and r.headers["x-fal-request-id"]
        c.put(first.json()["cancel_url"], headers=AUTH)


# ------------------------------------------------------------------------------------------- webhooks


def test_webhook_ok_and_error(tmp_path, sink):
    c, _ = make_client(tmp_path, FakeRunner(), sink=sink)
    sink.fail_first = 1  # the first delivery attempt fails: it is retried
    with c:
        r = c.post(
            f"/queue/{APP}",
            params={"fal_webhook": sink.url("/ok?x=1")},
            json={"image_url": png_data_uri(), "steps": 10, "seed": 9},
            headers=AUTH,
        )
        rid = r.json()["request_id"]
        got = sink.wait(1)
        assert got and got[0]["path"] == "/ok?x=1" and got[0]["content_type"] == "application/json"
        body = got[0]["body"]
        assert body["status"] == "OK" and body["error"] is None and body["request_id"] == rid
        assert body["gateway_request_id"] == rid
        assert body["payload"] == c.get(r.json()["response_url"], headers=AUTH).json()
        assert body["payload"]["seed"] == 9


def test_webhook_must_be_http(client):
    r = client.post(
        f"/queue/{APP}",
        params={"fal_webhook": "file:///etc/passwd"},
        json={"image_url": png_data_uri()},
        headers=AUTH,
    )
    assert r.status_code == 422 and r.json()["detail"][0]["loc"] == ["query", "fal_webhook"]


def test_server_defaults_apply(tmp_path):
    """``--default-steps`` fills a missing ``steps``; ``--size-mode`` reaches the params."""
    runner = FakeRunner()
    c, _ = make_client(tmp_path, runner, default_steps=12, size_mode="pad")
    with c:
        assert c.post(f"/{APP}", json={"image_url": png_data_uri()}, headers=AUTH).status_code == 200
        assert (runner.seen[-1].steps, runner.seen[-1].size_mode) == (12, "pad")
        assert (
            c.post(f"/{APP}", json={"image_url": png_data_uri(), "steps": 10}, headers=AUTH).status_code
            == 200
        )
        assert runner.seen[-1].steps == 10


# ------------------------------------------------------------------------------------------- storage


def test_storage_token_upload_and_signed_put(client):
    import base64 as b64
    import datetime as dt

    png = b64.b64decode(png_data_uri(10, 6).split(",", 1)[1])
    assert client.post("/storage/auth/token?storage_type=fal-cdn-v3", json={}).status_code == 200  # loopback
    tok = client.post("/storage/auth/token?storage_type=fal-cdn-v3", json={}, headers=AUTH).json()
    assert tok["token_type"] == "Bearer" and tok["base_url"] == "https://127.0.0.1:8443"
    assert dt.datetime.fromisoformat(tok["expires_at"]) > dt.datetime.now(dt.timezone.utc)
    hdr = {"Authorization": f"Bearer {tok['token']}", "Content-Type": "image/png", "X-Fal-File-Name": "a.png"}
    up = client.post("/files/upload", content=png, headers=hdr)
    assert up.status_code == 200 and up.json()["access_url"].startswith("https://127.0.0.1:8443/images/")
    assert client.get(up.json()["access_url"]).content == png
    assert client.post("/files/upload", content=b"not an image", headers=hdr).status_code == 415
    init = client.post(
        "/storage/upload/initiate?storage_type=gcs",
        json={"file_name": "b.png", "content_type": "image/png"},
        headers=AUTH,
    ).json()
    assert client.put(init["upload_url"].replace("signature=", "signature=0"), content=png).status_code == 403
    assert (
        client.put(init["upload_url"], content=png, headers={"Content-Type": "image/png"}).status_code == 200
    )
    assert client.get(init["file_url"]).content == png
    r = client.post(f"/{APP}", json={"image_url": init["file_url"], "steps": 10}, headers=AUTH)
    assert r.status_code == 200 and r.json()["image"]["width"] == 20


@pytest.mark.parametrize("fmt", ["GIF", "TIFF", "AVIF", "WEBP", "JPEG"])
def test_uploads_are_stored_under_their_formats_type_and_extension(client, fmt):
    """Whatever the client declares, the bytes decide, through the one format table."""
    from ccsr.imaging.formats import BY_NAME

    buf = io.BytesIO()
    Image.new("RGB", (6, 4), (10, 20, 30)).save(buf, fmt)
    tok = client.post("/storage/auth/token", json={}, headers=AUTH).json()["token"]
    hdr = {"Authorization": f"Bearer {tok}", "Content-Type": "application/octet-stream"}
    up = client.post("/files/upload", content=buf.getvalue(), headers=hdr).json()
    want = BY_NAME[fmt]
    assert up["access_url"].endswith("." + want.extension) and up["content_type"] == want.content_type
    got = client.get(up["access_url"])
    assert got.headers["content-type"] == want.content_type and got.content == buf.getvalue()


def test_storage_needs_key_when_keys_are_set(tmp_path):
    c, _ = make_client(tmp_path, FakeRunner(), api_keys=["sekret"])
    with c:
        assert (
            c.post("/storage/auth/token", json={}, headers={"Authorization": "Key nope"}).status_code == 401
        )
        tok = c.post("/storage/auth/token", json={}, headers={"Authorization": "Key sekret"}).json()["token"]
        png = b"\x89PNG"
        assert (
            c.post("/files/upload", content=png, headers={"Authorization": "Bearer forged"}).status_code
            == 401
        )
        ok = c.post("/files/upload", content=png, headers={"Authorization": f"Bearer {tok}"})
        assert ok.status_code == 415  # authorised; the bytes are simply no image


def test_registered_alias_app_id(tmp_path):
    c, _ = make_client(tmp_path, FakeRunner(), fal_app_ids=["me/upscaler"])
    with c:
        body = {"image_url": png_data_uri(), "steps": 10}
        assert c.post("/me/upscaler", json=body, headers=AUTH).status_code == 200
        sub = c.post("/queue/me/upscaler/v2", json=body, headers=AUTH).json()
        assert sub["status_url"].startswith("https://127.0.0.1:8443/queue/me/upscaler/requests/")
        assert wait_done(c, sub["status_url"]).status_code == 200
        # a request belongs to the app it was submitted to
        assert c.get(f"/queue/{APP}/requests/{sub['request_id']}", headers=AUTH).status_code == 404


def test_output_over_cap_is_422_image_too_large(tmp_path):
    c, _ = make_client(tmp_path, FakeRunner(), max_output_side=64)
    with c:
        r = c.post(f"/{APP}", json={"image_url": png_data_uri(40, 20), "scale": 2}, headers=AUTH)
        assert r.status_code == 422
        d = r.json()["detail"][0]
        assert d["type"] == "image_too_large" and d["ctx"]["max_width"] == 64
        assert (
            c.post(f"/{APP}", json={"image_url": png_data_uri(32, 20), "scale": 2}, headers=AUTH).status_code
            == 200
        )


def test_public_url_used_for_queue_urls(tmp_path):
    c, _ = make_client(tmp_path, FakeRunner(), public_url="https://upscale.example.com/api/")
    with c:
        sub = c.post(f"/queue/{APP}", json={"image_url": png_data_uri(), "steps": 10}, headers=AUTH).json()
        assert sub["status_url"].startswith(f"https://upscale.example.com/api/queue/{APP}/requests/")
        out = c.post(f"/{APP}", json={"image_url": png_data_uri(), "steps": 10}, headers=AUTH).json()
        assert out["image"]["url"].startswith("https://upscale.example.com/api/images/")


def test_sync_start_timeout_header(tmp_path):
    """``X-Fal-Request-Timeout`` (``start_timeout=``): still queued after it -> 504; the job is cancelled."""
    c, engine = make_client(tmp_path, FakeRunner(step_delay=0.05))
    with c:
        blocker = c.post(
            f"/queue/{APP}", json={"image_url": png_data_uri(), "steps": 60}, headers=AUTH
        ).json()
        r = c.post(
            f"/{APP}",
            json={"image_url": png_data_uri(), "steps": 10},
            headers={**AUTH, "X-Fal-Request-Timeout": "0.2"},
        )
        assert r.status_code == 504 and r.json()["error_type"] == "startup_timeout"
        assert r.headers["x-fal-request-timeout-type"] == "user"  # the client must not retry it
        assert engine.get(r.headers["x-fal-request-id"]).status == "cancelled"
        c.put(blocker["cancel_url"], headers=AUTH)


def test_oversized_body_and_input(tmp_path):
    c, _ = make_client(tmp_path, FakeRunner(), max_input_bytes=2000)
    with c:
        huge = {"image_url": "data:image/png;base64," + "A" * (1200 * 1024)}
        assert c.post(f"/{APP}", json=huge, headers=AUTH).status_code == 413
        import base64

        import numpy as np

        buf = io.BytesIO()
        noise = np.random.default_rng(0).integers(0, 256, (40, 40, 3), dtype=np.uint8)
        Image.fromarray(noise).save(buf, "PNG")  # ~5 KB: over the 2000-byte input cap
        big_png = "data:image/png;base64," + base64.b64encode(buf.getvalue()).decode()
        r = c.post(f"/{APP}", json={"image_url": big_png}, headers=AUTH)
        assert r.status_code == 422 and r.json()["detail"][0]["type"] == "file_too_large"


def test_tiling_that_cannot_fit_is_422_with_the_estimate(tmp_path, tiny_pipeline):
    """A real pipeline on a machine with (pretend) 1 KiB to spare: explicit tiling is refused before sampling,
    in fal's error shape, with the estimate; nothing crashes."""
    from ccsr.jobs.runner import CCSRRunner
    from ccsr.pipeline import CCSRPipeline

    pipe = CCSRPipeline(tiny_pipeline.model, device="cpu", max_memory=1024)
    c, _ = make_client(tmp_path, CCSRRunner(pipeline=pipe))
    with c:
        body = {"image_url": png_data_uri(48, 40), "tile_diffusion": "none", "steps": 10}
        r = c.post(f"/{APP}", json=body, headers=AUTH)
    assert r.status_code == 422, r.text
    assert "GiB of working memory" in r.text and "tile_diffusion" in r.text


# ------------------------------------------------------------------------------------------- stream


def stream(client, body: dict, headers: dict = AUTH):
    """``POST /{APP}/stream`` read as server-sent events: (response, [(event name, JSON data)])."""
    with connect_sse(client, "POST", f"/{APP}/stream", json=body, headers=headers) as es:
        return es.response, [(e.event, e.json()) for e in es.iter_sse()]


def wait_status(engine, job_id: str, status: str, timeout: float = 15.0) -> None:
    end = time.time() + timeout
    while engine.get(job_id).status != status:
        assert time.time() < end, engine.get(job_id).status
        time.sleep(0.02)


def test_stream_sends_progress_then_the_output(tmp_path):
    c, _ = make_client(tmp_path, FakeRunner(step_delay=0.05))
    with c:
        r, events = stream(c, {"image_url": png_data_uri(16, 12), "steps": 20, "seed": 8})
        rid = r.headers["x-fal-request-id"]
        assert r.status_code == 200 and r.headers["content-type"].startswith("text/event-stream")
        *progress, (name, out) = events
        assert progress and {n for n, _ in progress} == {name} == {"message"}
        assert all(p["status"] in ("IN_QUEUE", "IN_PROGRESS") and p["request_id"] == rid for _, p in progress)
        percents = [p["progress"] for _, p in progress]
        assert percents == sorted(percents) and percents[0] >= 0 and percents[-1] < 100
        assert any("step" in ln["message"] for _, p in progress for ln in p["logs"])
        # the last event is the output: what run and the queue's result route answer for this request
        assert out == c.get(f"/queue/{APP}/requests/{rid}", headers=AUTH).json()
        assert out["seed"] == 8 and (out["image"]["width"], out["image"]["height"]) == (32, 24)


def test_stream_refusals_are_answered_as_run_answers_them(tmp_path):
    c, _ = make_client(tmp_path, FakeRunner(), api_keys=["sekret"])
    with c:
        key = {"Authorization": "Key sekret"}
        for body, headers, status, check in (
            ({"scale": 2}, key, 422, lambda b: b["detail"][0]["loc"] == ["body", "image_url"]),
            ({"image_url": "data:,AAAA"}, key, 422, lambda b: b["detail"][0]["type"] == "image_load_error"),
            ({"image_url": png_data_uri()}, {"Authorization": "Key no"}, 401, lambda b: "Unauthorized" in b["detail"]),
        ):
            r = c.post(f"/{APP}/stream", json=body, headers=headers)
            assert r.status_code == status and r.headers["content-type"] == "application/json", r.text
            assert r.headers["x-fal-request-id"] and check(r.json()), r.text


def test_stream_failure_is_an_error_event_in_fals_shape(tmp_path):
    class Refusing(FakeRunner):
        def run(self, job, input_bytes, **kw):
            raise JobFailed(ErrorCode.INVALID_PARAMS, "the tiles cannot fit")

    c, _ = make_client(tmp_path, Refusing())
    with c:
        _, events = stream(c, {"image_url": png_data_uri()})
    name, err = events[-1]
    assert name == "error" and err["detail"][0]["msg"] == "the tiles cannot fit"
    assert all(n == "message" for n, _ in events[:-1])


def test_stream_past_the_sync_timeout_ends_with_an_error_and_cancels_the_job(tmp_path):
    c, engine = make_client(tmp_path, FakeRunner(step_delay=0.05), sync_timeout=0.6)
    with c:
        r, events = stream(c, {"image_url": png_data_uri(), "steps": 100})
        name, err = events[-1]
        assert name == "error" and err == {"detail": "request timed out after 0.6s", "error_type": "request_timeout"}
        wait_status(engine, r.headers["x-fal-request-id"], "cancelled")  # stopped between steps, not run to its end
