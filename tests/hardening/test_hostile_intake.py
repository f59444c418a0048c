"""A hostile client against a real ``ccsr serve`` (tiny model, 127.0.0.1): a small generated corpus of bodies,
frames and request ids over Runware REST, Runware WebSocket and fal (sync, stream and queue).

Criteria, asserted: no 5xx and every answer JSON in its protocol's shape; every WebSocket frame answered;
nothing hangs (each call has a client timeout); ``/healthz`` answers within 1 s while a maximum-size body is
being refused; the server's peak RSS grows by less than :data:`RSS_BOUND` over the whole corpus; slow image
hosts do not hold up unrelated requests; degenerate aspect ratios are not planned as huge images.
"""

from __future__ import annotations

import io
import json
import re
import socket
import threading
import time
import uuid
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from urllib.parse import quote

import httpx
import pytest
from hardening_helpers import RealServer, data_uri, png_bytes
from httpx_sse import connect_sse
from PIL import Image
from websockets.sync.client import connect as ws_connect

pytestmark = pytest.mark.timeout(600)

FAL = "/fal-ai/ccsr"
MAX_INPUT_BYTES = 3_000_000  # so the largest legal body (a data URI of this, plus 1 MiB) is ~5 MiB
RSS_BOUND = 512 * 2**20  # peak RSS growth over the whole corpus
HUGE_INT = "1" + "0" * 400  # 1e400 written as an integer: float() of it overflows
LONG_INT = "7" * 4301  # past Python's int-from-text digit limit


class SlowHost:
    """A loopback image host that holds every request for ``delay`` seconds before answering a PNG."""

    def __init__(self, delay: float):
        body = png_bytes((8, 8))

        class Handler(BaseHTTPRequestHandler):
            def do_GET(self):
                time.sleep(delay)
                try:
                    self.send_response(200)
                    self.send_header("Content-Type", "image/png")
                    self.send_header("Content-Length", str(len(body)))
                    self.end_headers()
                    self.wfile.write(body)
                except OSError:
                    pass

            def log_message(self, *a):
                pass

        self.httpd = ThreadingHTTPServer(("127.0.0.1", 0), Handler)
        self.httpd.daemon_threads = True
        self.port = self.httpd.server_address[1]
        threading.Thread(target=self.httpd.serve_forever, daemon=True).start()

    def close(self) -> None:
        self.httpd.shutdown()
        self.httpd.server_close()


@pytest.fixture(scope="module")
def slow_host():
    host = SlowHost(delay=12.0)
    yield host
    host.close()


@pytest.fixture(scope="module")
def server(tmp_path_factory, slow_host):
    srv = RealServer(
        tmp_path_factory.mktemp("hostile"),
        *("--max-input-bytes", str(MAX_INPUT_BYTES), "--fetch-workers", "4"),
        *("--allow-fetch-host", f"127.0.0.1:{slow_host.port}", "--log-level", "warning"),
    ).start()
    yield srv
    srv.stop()


@pytest.fixture(scope="module")
def http(server):
    with httpx.Client(base_url=server.http, timeout=60) as c:
        yield c


def _peak_rss(server: RealServer) -> int:
    with open(f"/proc/{server.proc.pid}/status") as f:
        return int(re.search(r"VmHWM:\s+(\d+) kB", f.read()).group(1)) * 1024


def _runware_refusal(r: httpx.Response) -> dict:
    assert 400 <= r.status_code < 500, (r.status_code, r.text[:300])
    body = r.json()
    assert isinstance(body.get("errors"), list) and body["errors"], body
    assert all({"code", "message"} <= set(e) for e in body["errors"]), body
    return body["errors"][0]


def _fal_refusal(r: httpx.Response) -> object:
    assert 400 <= r.status_code < 500, (r.status_code, r.text[:300])
    assert r.headers.get("x-fal-request-id"), r.headers
    return r.json()["detail"]


def _rw_task(**fields) -> dict:
    return {"taskType": "upscale", "taskUUID": str(uuid.uuid4()), "inputs": {"image": data_uri(png_bytes())},
            "upscaleFactor": 2, "deliveryMethod": "async", **fields}


def _with_raw(obj: dict, field_path: tuple, raw: str) -> str:
    """``obj`` as JSON with the value at ``field_path`` replaced by the raw JSON text ``raw``."""
    marker = "\u2603MARK\u2603"
    node = obj
    for key in field_path[:-1]:
        node = node[key]
    node[field_path[-1]] = marker
    return json.dumps(obj).replace(json.dumps(marker), raw)


# ------------------------------------------------------------------------------------- the body corpus


def _runware_bodies() -> list[str]:
    out = []
    for path in (("upscaleFactor",), ("settings", "seed"), ("settings", "steps"), ("outputQuality",), ("ttl",)):
        for raw in (HUGE_INT, "-" + HUGE_INT, LONG_INT):
            task = _rw_task(settings={})
            out.append("[" + _with_raw(task, path, raw) + "]")
    for path in (("taskType",), ("taskUUID",), ("inputs", "image"), ("settings", "positivePrompt"),
                 ("outputFormat",), ("model",)):
        task = _rw_task(settings={})
        out.append("[" + _with_raw(task, path, '"\\ud800"') + "]")
    out.append('[{"taskType": "ping", "\\udfff": 1}]')
    return out


def _fal_bodies() -> list[str]:
    base = {"image_url": data_uri(png_bytes()), "steps": 10}
    out = []
    for field in ("scale", "seed", "steps", "tile_diffusion_size", "t_max"):
        for raw in (HUGE_INT, "-" + HUGE_INT, LONG_INT):
            out.append(_with_raw(dict(base), (field,), raw))
    for field in ("image_url", "color_fix_type", "tile_diffusion"):
        out.append(_with_raw(dict(base), (field,), '"\\ud800x"'))
    out.append('{"image_url": "x", "\\ud83d": 1}')
    return out


def test_numbers_and_text_are_refused_in_protocol_shape(server, http):
    rss = _peak_rss(server)
    for body in _runware_bodies():
        err = _runware_refusal(http.post("/v1", content=body, headers={"content-type": "application/json"}))
        assert err["code"].startswith(("invalid", "missing", "unsupported")), err
    for body in _fal_bodies():
        for path in (FAL, f"/queue{FAL}", f"{FAL}/stream"):  # the stream refuses before it starts, as run does
            detail = _fal_refusal(http.post(path, content=body, headers={"content-type": "application/json"}))
            assert isinstance(detail, list) and detail[0]["loc"][0] == "body", detail
    r = http.post("/v1", content=f'[{{"taskType": "ping", "junk": {LONG_INT}}}]')  # a number no field reads
    assert r.status_code == 200 and r.json()["data"][0]["pong"] is True
    assert _peak_rss(server) - rss < RSS_BOUND


def test_degenerate_aspect_ratio_is_not_planned_as_a_huge_image(tiny_pipeline):
    """The reference stretches the short side to 512: a 1x256 image would be processed at 512x131072 (315
    windows per step). It is planned as the padded image instead, a single window."""
    from ccsr.params import UpscaleParams

    for size in ((1, 256), (256, 1), (1, 4096)):
        plan = tiny_pipeline.plan(size, UpscaleParams(scale=1, steps=45))
        w, h = plan.geometry.process
        assert w * h <= 128 * 4096, (size, plan.geometry)
    ordinary = tiny_pipeline.plan((48, 40), UpscaleParams(scale=2))
    assert ordinary.params.size_mode == "reference"  # ordinary images keep the reference's geometry


def test_degenerate_aspect_ratio_runs(http):
    buf = io.BytesIO()
    Image.new("RGB", (1, 256), (10, 200, 30)).save(buf, "PNG")
    r = http.post(FAL, json={"image_url": data_uri(buf.getvalue()), "scale": 1, "steps": 10}, timeout=300)
    assert r.status_code == 200, r.text
    assert (r.json()["image"]["width"], r.json()["image"]["height"]) == (1, 256)


# ------------------------------------------------------------------------------------- size and depth


def _healthz_times(base: str, stop: threading.Event, out: list[float]) -> None:
    with httpx.Client(base_url=base, timeout=10) as c:
        while not stop.is_set():
            t0 = time.monotonic()
            assert c.get("/healthz").status_code == 200
            out.append(time.monotonic() - t0)
            time.sleep(0.05)


def _while_probing_healthz(server, fn) -> list[float]:
    times: list[float] = []
    stop = threading.Event()
    t = threading.Thread(target=_healthz_times, args=(server.http, stop, times))
    t.start()
    try:
        time.sleep(0.2)
        fn()
        time.sleep(0.2)
    finally:
        stop.set()
        t.join(30)
    return times


def test_largest_bodies_are_refused_without_stalling_the_server(server, http):
    limit = MAX_INPUT_BYTES * 4 // 3 + (1 << 20)
    rss = _peak_rss(server)

    def pathological():
        elements = (limit - 2) // 2  # [0,0,0,...] just under the byte limit: millions of JSON elements
        body = b"[" + b"0," * (elements - 1) + b"0]"
        assert len(body) <= limit
        _runware_refusal(http.post("/v1", content=body))
        _fal_refusal(http.post(FAL, content=b'{"image_url": ' + body + b"}"))
        deep = b"[" * (limit // 2 - 8) + b"]" * (limit // 2 - 8)
        _runware_refusal(http.post("/v1", content=deep))

    def oversized():
        def chunks():  # no Content-Length: found while streaming
            for _ in range(limit // 65536 + 2):
                yield b"[" + b"1" * 65535

        r = http.post("/v1", content=chunks())
        assert r.status_code == 413 and _runware_refusal(r)["code"] == "invalidRequestSize"
        r = http.post(FAL, content=b" " * (limit + 1))
        assert r.status_code == 413 and isinstance(r.json()["detail"], str)

    for fn in (pathological, oversized):
        times = _while_probing_healthz(server, fn)
        assert times and max(times) < 1.0, times
    assert _peak_rss(server) - rss < RSS_BOUND


# ------------------------------------------------------------------------------------- WebSocket


def _ws_url(server) -> str:
    return f"ws://127.0.0.1:{server.port}/v1"


def test_every_websocket_frame_is_answered(server):
    ping = '[{"taskType": "ping"}]'
    refused: list[str | bytes] = [
        b"\x00\x01binary",
        ping.encode(),  # JSON, but in a binary frame
        "[]", "[1,2,3]", "{}", "1", "-5e400", '"x"', "null", "true", "not json",
        "[" + _with_raw(_rw_task(), ("upscaleFactor",), HUGE_INT) + "]",
        "[" + _with_raw(_rw_task(), ("settings",), LONG_INT) + "]",
        '[{"taskType": "\\ud800", "taskUUID": "x"}]',
        "[" * 5000 + "]" * 5000,
    ]
    with ws_connect(_ws_url(server), open_timeout=30, close_timeout=5, max_size=None) as ws:
        ws.send(json.dumps([{"taskType": "authentication", "apiKey": "k"}]))
        assert "data" in json.loads(ws.recv(timeout=30))
        for frame in refused:
            ws.send(frame)
            replies = 3 if frame == "[1,2,3]" else 1  # one error per element that is not a task
            for _ in range(replies):
                reply = json.loads(ws.recv(timeout=30))
                assert reply.get("errors"), (frame[:40], reply)
                assert all(e["code"].startswith(("invalid", "missing", "unsupported")) for e in reply["errors"])
        ws.send(f'[{{"taskType": "ping", "n": {LONG_INT}}}]')  # the connection is still whole
        assert json.loads(ws.recv(timeout=30))["data"][0]["pong"] is True


# ------------------------------------------------------------------------------------- fal request ids


def test_odd_request_ids_never_reach_a_header(server):
    ids = [" lead", "trail ", "a b", "\t", "x\r\ny", "é", "\u2603", "a" * 300, "%", "..", "a;b", "\x7f"]
    with socket.create_connection(("127.0.0.1", server.port), timeout=30) as s:
        f = s.makefile("rwb")
        for rid in ids:
            for suffix in ("/status", "", "/cancel", "/status/stream"):
                method = "PUT" if suffix == "/cancel" else "GET"
                path = f"/queue{FAL}/requests/{quote(rid, safe='')}{suffix}"
                f.write(f"{method} {path} HTTP/1.1\r\nHost: 127.0.0.1\r\nContent-Length: 0\r\n\r\n".encode())
                f.flush()
                status = f.readline()
                assert status.startswith(b"HTTP/1.1 404"), (rid, suffix, status)
                headers = {}
                while (line := f.readline()) not in (b"\r\n", b""):
                    k, _, v = line.decode("latin-1").partition(":")
                    headers[k.strip().lower()] = v.strip()
                body = f.read(int(headers["content-length"]))
                assert json.loads(body) and re.fullmatch(r"[A-Za-z0-9._:-]+", headers["x-fal-request-id"])


# ------------------------------------------------------------------------------------- slow image hosts


def test_slow_image_hosts_do_not_hold_up_other_requests(server, slow_host):
    url = f"http://127.0.0.1:{slow_host.port}/img.png"
    results: list[int] = []

    def slow_upload(i: int) -> None:
        with httpx.Client(base_url=server.http, timeout=120) as c:
            if i < 8:
                r = c.post("/v1", json=[{"taskType": "imageUpload", "taskUUID": str(uuid.uuid4()), "image": url}])
            else:
                r = c.post(f"/queue{FAL}", json={"image_url": url, "steps": 10, "t_max": 0.2, "t_min": 0.1})
            results.append(r.status_code)

    threads = [threading.Thread(target=slow_upload, args=(i,)) for i in range(10)]
    for t in threads:
        t.start()
    time.sleep(1.0)  # every download slot is now held by the slow host
    with httpx.Client(base_url=server.http, timeout=30) as c:
        t0 = time.monotonic()
        r = c.post("/v1", json=[{"taskType": "imageUpload", "taskUUID": str(uuid.uuid4()),
                                 "image": data_uri(png_bytes((20, 20)))}])
        waited = time.monotonic() - t0
    assert r.status_code == 200, r.text
    assert waited < 5.0, f"an unrelated upload waited {waited:.1f}s behind slow image hosts"
    for t in threads:
        t.join(120)
    assert results and all(s < 500 for s in results), results


# ------------------------------------------------------------------------------------- fal status stream


def test_status_stream_follows_a_request_to_completion(server, http):
    r = http.post(f"/queue{FAL}", json={"image_url": data_uri(png_bytes((24, 20))), "steps": 10, "t_max": 0.2,
                                         "t_min": 0.1, "scale": 2})
    assert r.status_code == 200, r.text
    status_url = r.json()["status_url"]
    seen = []
    with httpx.Client(timeout=120) as c, connect_sse(c, "GET", status_url + "/stream", params={"logs": 1}) as es:
        assert es.response.status_code == 200
        assert es.response.headers["content-type"].startswith("text/event-stream")
        for event in es.iter_sse():
            seen.append(event.json())
    assert seen and seen[-1]["status"] == "COMPLETED" and "error" not in seen[-1], seen[-1]
    assert {s["status"] for s in seen} <= {"IN_QUEUE", "IN_PROGRESS", "COMPLETED"}
    assert all(s["request_id"] == r.json()["request_id"] for s in seen)
    assert http.get(r.json()["response_url"]).status_code == 200
    r = http.get(status_url + "/stream")  # a finished request: one event, then the stream ends
    assert r.status_code == 200 and r.text.count("data: ") == 1 and '"COMPLETED"' in r.text
