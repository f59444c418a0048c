"""Property-based fuzzing: random JSON-ish task payloads through both protocols (never a 5xx, always the
protocol's error shape) and random bytes through image decoding (only ImageError)."""

from __future__ import annotations

import contextlib
import json
import string

import pytest
from hardening_helpers import data_uri, png_bytes
from hypothesis import HealthCheck, example, given, settings
from hypothesis import strategies as st

from ccsr import imaging
from ccsr.imaging import ImageError

FUZZ = settings(
    max_examples=60,
    deadline=None,  # no timed assertions; boundedness comes from pytest-timeout
    suppress_health_check=[HealthCheck.function_scoped_fixture, HealthCheck.too_slow],
    database=None,  # nothing written into the checkout
)

scalars = st.one_of(
    st.none(),
    st.booleans(),
    st.integers(min_value=-(2**70), max_value=2**70),
    st.floats(allow_nan=True, allow_infinity=True),
    st.text(max_size=30),
    st.sampled_from(["", "async", "sync", "URL", "base64Data", "PNG", "WEBP", "runware:501@1", "http://127.0.0.1:9/x"]),
)
json_values = st.recursive(
    scalars,
    lambda inner: st.one_of(st.lists(inner, max_size=4), st.dictionaries(st.text(max_size=12), inner, max_size=4)),
    max_leaves=12,
)
RW_FIELDS = [
    "taskType",
    "taskUUID",
    "inputs",
    "inputImage",
    "upscaleFactor",
    "outputType",
    "outputFormat",
    "deliveryMethod",
    "settings",
    "model",
    "webhookURL",
    "includeCost",
    "outputQuality",
]
rw_task = st.fixed_dictionaries(
    {"taskType": st.sampled_from(["upscale", "imageUpscale", "getResponse", "imageUpload", "mediaStorage", "nope"])},
    optional={k: json_values for k in RW_FIELDS[1:]},
)
FAL_FIELDS = ["image_url", "scale", "steps", "seed", "color_fix_type", "tile_diffusion", "tile_diffusion_size"]
fal_body = st.dictionaries(st.sampled_from(FAL_FIELDS) | st.text(max_size=8), json_values, max_size=6)


@pytest.fixture
def client(make_client):
    return make_client(max_queue=1000)


def _rw_shape_ok(r) -> None:
    assert r.status_code < 500, r.text
    body = r.json()
    assert isinstance(body, dict) and ("data" in body or "errors" in body), body
    for e in body.get("errors", []):
        assert isinstance(e["code"], str) and isinstance(e["message"], str)


@FUZZ
@given(tasks=st.lists(rw_task | json_values, max_size=3))
@example(tasks=[{"taskType": "upscale", "taskUUID": "t", "model": ["x"]}])  # found by the WS fuzzer: was a 500
def test_runware_rest_never_5xx(client, tasks):
    for t in tasks:  # keep fuzzed jobs cheap and local: a small valid image where one is asked for
        if isinstance(t, dict) and isinstance(t.get("inputs"), dict) and "image" not in t["inputs"]:
            t["inputs"]["image"] = data_uri(png_bytes((8, 8)))
    _rw_shape_ok(client.post("/v1", content=json.dumps(tasks, allow_nan=True)))


@FUZZ
@given(raw=st.text(alphabet=string.printable, max_size=200) | st.binary(max_size=200))
def test_runware_rest_random_bodies(client, raw):
    r = client.post("/v1", content=raw)
    _rw_shape_ok(r)


@FUZZ
@given(body=fal_body)
def test_fal_never_5xx(client, body):
    r = client.post("/queue/fal-ai/ccsr", content=json.dumps(body, allow_nan=True))
    assert r.status_code < 500, r.text
    out = r.json()
    assert "request_id" in out or "detail" in out, out


@settings(max_examples=25, deadline=None, database=None, suppress_health_check=[HealthCheck.function_scoped_fixture])
@given(frames=st.lists(st.text(max_size=80) | st.builds(json.dumps, st.lists(rw_task, max_size=2)), max_size=4))
def test_runware_ws_frames(client, frames):
    with client.websocket_connect("/v1") as ws:
        ws.send_text(json.dumps([{"taskType": "authentication", "apiKey": "k"}]))
        json.loads(ws.receive_text())
        for f in frames:
            ws.send_text(f)
        ws.send_text(json.dumps([{"taskType": "ping"}]))
        while True:  # every frame answered or ignored; the connection is alive to the final ping
            frame = json.loads(ws.receive_text())
            for e in frame.get("errors", []):
                assert e["code"] != "internalServerError", e
            if frame.get("data") and frame["data"][0].get("pong"):
                break


@settings(max_examples=200, deadline=None, database=None)
@given(data=st.binary(max_size=4096))
def test_decode_random_bytes(data):
    with contextlib.suppress(ImageError):
        imaging.decode(data)


PNG = png_bytes((8, 8))


@settings(max_examples=200, deadline=None, database=None)
@given(pos=st.integers(0, len(PNG) - 1), val=st.integers(0, 255), cut=st.integers(1, len(PNG)))
def test_decode_mutated_png(pos, val, cut):
    data = bytearray(PNG)
    data[pos] = val
    with contextlib.suppress(ImageError):
        imaging.decode(bytes(data[:cut]))
