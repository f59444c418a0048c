"""CCSR-v2 behind the server: the unmodified ``fal_client`` and ``runware-sdk`` upscale with it (``fal-ai/ccsr-v2``,
``ccsr:2@1``), each result equal pixel for pixel to ``ccsr upscale``'s for the same parameters and seed; the
playground lists each loaded model with its own defaults; a model the server does not load is refused in each
protocol's shape.

Servers (real ``ccsr serve`` subprocesses on 127.0.0.1, tiny models): v2 alone over TLS (fal_client needs https),
v1 and v2 together over plain http (the Runware SDK and the playground), and the shared v1-only Runware server.
"""

from __future__ import annotations

import asyncio
import base64
import io
import os
import ssl
import subprocess
import sys
import time

import httpx
import numpy as np
import pytest
from PIL import Image
from runware import Runware, RunwareError
from test_fal_client import fal

from ccsr.api.tls import make_self_signed
from conftest import API_KEY, REPO, free_port, tiny_model

V2_MODEL = REPO / "tests" / "fixtures" / "ccsr_v2_tiny" / "model"
INPUT = (REPO / "tests" / "fixtures" / "ccsr_v2_tiny" / "inputs" / "lq_32x32.png").read_bytes()
INPUT_URI = "data:image/png;base64," + base64.b64encode(INPUT).decode()
ONE_THREAD = {"OMP_NUM_THREADS": "1", "MKL_NUM_THREADS": "1"}  # server and CLI: the same kernels and sums
# x4 at process size 128: the tiny model's 32x32 input is processed at 128x128 (the fixtures' cases a and b)
SMALL = {"scale": 4, "process_size": 128}

pytestmark = pytest.mark.timeout(300)


def _env() -> dict[str, str]:
    return {**os.environ, **ONE_THREAD,
            "PYTHONPATH": os.pathsep.join([str(REPO / "src"), os.environ.get("PYTHONPATH", "")])}


def _serve(tmp, *args: str, tls=None):  # type: ignore[no-untyped-def]
    """Start ``ccsr serve`` with ``args``; returns (process, base URL, port), ready."""
    port = free_port()
    cmd = [sys.executable, "-m", "ccsr.api.serve", "--host", "127.0.0.1", "--port", str(port), "--data-dir",
           str(tmp / "data"), "--device", "cpu", "--dtype", "float32", "--api-key", API_KEY, "--log-level",
           "warning", *args]
    if tls is not None:
        cmd += ["--tls-cert", str(tls.cert), "--tls-key", str(tls.key)]
    log = tmp / "server.log"
    with open(log, "wb") as out:
        proc = subprocess.Popen(cmd, env=_env(), stdout=out, stderr=subprocess.STDOUT, cwd=tmp)
    base = f"{'https' if tls else 'http'}://127.0.0.1:{port}"
    verify = ssl.create_default_context(cafile=str(tls.cert)) if tls else True
    deadline = time.monotonic() + 180
    while time.monotonic() < deadline and proc.poll() is None:
        try:
            if httpx.get(base + "/readyz", verify=verify, timeout=2).status_code == 200:
                return proc, base, port
        except httpx.HTTPError:
            pass
        time.sleep(0.2)
    proc.kill()
    raise RuntimeError("ccsr serve did not become ready:\n" + log.read_text(errors="replace")[-4000:])


def _stop(proc) -> None:  # type: ignore[no-untyped-def]
    proc.terminate()
    try:
        proc.wait(10)
    except subprocess.TimeoutExpired:
        proc.kill()


@pytest.fixture(scope="module")
def v2_tls_server(tmp_path_factory):
    """CCSR-v2 alone, over TLS, for fal_client."""
    d = tmp_path_factory.mktemp("v2_tls")
    tls = make_self_signed(d / "cert.pem", d / "key.pem")
    proc, base, port = _serve(d, "--model", f"ccsr-v2={V2_MODEL}", tls=tls)
    yield {"port": port, "base": base, "cert": str(tls.cert), "dir": d}
    _stop(proc)


@pytest.fixture(scope="module")
def both_server(tmp_path_factory):
    """CCSR-v1 (the tiny v1 model) and CCSR-v2 in one server, over http."""
    d = tmp_path_factory.mktemp("v1_v2")
    weights, config = tiny_model()
    proc, base, _ = _serve(d, "--weights", str(weights), "--config", str(config), "--model", "ccsr-v1",
                              "--model", f"ccsr-v2={V2_MODEL}")
    yield base
    _stop(proc)


@pytest.fixture(scope="module")
def cli_pixels(tmp_path_factory):
    """``ccsr upscale`` of the input with the v2 model, ``flags`` and ``--seed``; decoded pixels, cached."""
    d = tmp_path_factory.mktemp("v2_cli")
    (d / "in.png").write_bytes(INPUT)
    cache: dict[tuple, np.ndarray] = {}

    def run(*flags: str) -> np.ndarray:
        if flags not in cache:
            out = d / f"out{len(cache)}.png"
            cmd = [sys.executable, "-m", "ccsr.cli", "upscale", str(d / "in.png"), "-o", str(out), "--weights",
                   str(V2_MODEL), "--device", "cpu", "--dtype", "float32", "-q", *flags]
            p = subprocess.run(cmd, env=_env(), capture_output=True, text=True, timeout=300)
            assert p.returncode == 0, p.stderr[-3000:]
            cache[flags] = np.asarray(Image.open(out).convert("RGB"))
        return cache[flags]

    return run


def pixels(url: str, verify=True) -> np.ndarray:  # type: ignore[no-untyped-def]
    r = httpx.get(url, verify=verify, timeout=30)
    assert r.status_code == 200, r.text
    return np.asarray(Image.open(io.BytesIO(r.content)).convert("RGB"))


# -- fal ---------------------------------------------------------------------------------------------------------


@pytest.mark.parametrize("preset", [None, "two-step"])
def test_fal_client_v2_equals_cli(v2_tls_server, cli_pixels, preset):
    """fal-ai/ccsr-v2 with only scale, process size and seed given takes the model's defaults (one-step); with
    the two-step preset's fields, its two evaluations with CFG. Pixels equal ``ccsr upscale``'s."""
    two_step = {"steps": 6, "t_max": 0.6667, "t_min": 0.5, "cfg_scale": 4.5} if preset else {}
    args = {**SMALL, **two_step, "image_url": INPUT_URI, "seed": 233}
    r = fal(v2_tls_server, "submit_flow", {"app": "fal-ai/ccsr-v2", "arguments": args})
    out = r["get"]
    assert out["seed"] == 233 and (out["image"]["width"], out["image"]["height"]) == (128, 128)
    logs = "\n".join(ln["message"] for ln in r["statuses"][-1]["logs"])
    assert "with ccsr-v2 (" in logs, logs  # the job says which model ran it
    got = pixels(out["image"]["url"], ssl.create_default_context(cafile=v2_tls_server["cert"]))
    flags = ("--scale", "4", "--process-size", "128", "--seed", "233", *(("--preset", preset) if preset else ()))
    assert np.array_equal(got, cli_pixels(*flags))


def test_fal_client_refuses_a_model_not_loaded(v2_tls_server):
    """This server loads CCSR-v2 only: fal-ai/ccsr answers 404 model_not_loaded, saying how to load it."""
    r = fal(v2_tls_server, "run_error", {"app": "fal-ai/ccsr", "arguments": {"image_url": INPUT_URI}})
    assert r["error"] == "FalClientHTTPError" and r["status_code"] == 404
    assert r["error_type"] == "model_not_loaded" and "--model ccsr-v1" in r["message"]


def test_fal_v2_fields_are_validated_in_fal_shape(v2_tls_server):
    r = fal(v2_tls_server, "run_error", {"app": "fal-ai/ccsr-v2",
                                         "arguments": {"image_url": INPUT_URI, "start_point": "middle"}})
    assert r["status_code"] == 422 and r["message"][0]["loc"] == ["body", "start_point"]


# -- Runware -----------------------------------------------------------------------------------------------------


def _runware(base: str) -> Runware:
    ws = base.replace("http://", "ws://") + "/v1"
    return Runware(api_key=API_KEY, transport="websocket", ws_base_url=ws, http_base_url=f"{base}/v1")


def test_runware_sdk_v2_equals_cli(both_server, cli_pixels):
    """ccsr:2@1 with upscaleFactor 4, settings.processSize and seed; the rest the model's defaults."""

    async def go():
        async with _runware(both_server) as rw:
            return await rw.run({"taskType": "upscale", "model": "ccsr:2@1", "inputs": {"image": INPUT_URI},
                                 "upscaleFactor": 4, "outputFormat": "PNG", "deliveryMethod": "sync",
                                 "settings": {"seed": 233, "processSize": 128}})

    item = asyncio.run(go())[0]
    got = pixels(item["imageURL"])
    assert np.array_equal(got, cli_pixels("--scale", "4", "--process-size", "128", "--seed", "233"))


@pytest.mark.parametrize("settings", [{"preset": "two-step"},
                                      {"steps": 6, "tMax": 0.6667, "tMin": 0.5, "CFGScale": 4.5}])
def test_runware_sdk_v2_two_step_equals_cli(both_server, cli_pixels, settings):
    """Runware reaches the two-step preset exactly: by name (settings.preset) or field by field (settings.tMax and
    tMin, Runware's steps and CFGScale): the pixels of ``ccsr upscale --preset two-step``."""

    async def go():
        async with _runware(both_server) as rw:
            return await rw.run({"taskType": "upscale", "model": "ccsr:2@1", "inputs": {"image": INPUT_URI},
                                 "upscaleFactor": 4, "outputFormat": "PNG", "deliveryMethod": "sync",
                                 "settings": {"seed": 233, "processSize": 128, **settings}})

    item = asyncio.run(go())[0]
    flags = ("--scale", "4", "--process-size", "128", "--seed", "233")
    two_step = cli_pixels(*flags, "--preset", "two-step")
    assert not np.array_equal(two_step, cli_pixels(*flags))  # the preset changes the image
    assert np.array_equal(pixels(item["imageURL"]), two_step)


def test_runware_sdk_refuses_a_model_not_loaded(server):
    """The shared Runware server loads CCSR-v1 only: ccsr:2@1 is unsupportedModel, naming what it serves."""

    async def go():
        async with _runware(server.http) as rw:
            await rw.run({"taskType": "upscale", "model": "ccsr:2@1", "inputs": {"image": INPUT_URI},
                          "upscaleFactor": 4, "deliveryMethod": "sync"})

    with pytest.raises(RunwareError) as e:
        asyncio.run(go())
    text = str(e.value)
    assert e.value.parameter == "model" and "not loaded" in text and "runware:501@1" in text, text


def test_unknown_model_refused_in_each_protocol(server):
    r = httpx.post(f"{server.http}/v1", headers={"Authorization": f"Bearer {API_KEY}"},
                   json=[{"taskType": "upscale", "taskUUID": "6f1c7a4e-3b0e-4f53-9a51-2d6f0c1b8e11",
                          "model": "civitai:1@1", "inputs": {"image": INPUT_URI}}])
    assert r.status_code == 400 and r.json()["errors"][0]["code"] == "unsupportedModel"
    r = httpx.post(f"{server.http}/fal-ai/ccsr-v2", headers={"Authorization": f"Key {API_KEY}"},
                   json={"image_url": INPUT_URI})
    assert r.status_code == 404 and r.json()["error_type"] == "model_not_loaded"


# -- playground --------------------------------------------------------------------------------------------------


def test_playground_lists_both_models_with_their_defaults(both_server):
    models = httpx.get(f"{both_server}/playground/models").json()
    assert [(m["name"], m["fal_app_id"], m["runware_model"]) for m in models] == [
        ("CCSR-v1", "fal-ai/ccsr", "runware:501@1"), ("CCSR-v2", "fal-ai/ccsr-v2", "ccsr:2@1")]
    v2 = {p["name"]: p for p in models[1]["parameters"]}
    assert (v2["steps"]["default"], v2["scale"]["default"], v2["process_size"]["default"]) == (1, 4, 512)
    assert v2["start_point"]["default"] == "lr" and v2["prompt"]["default"] == "clean, high-resolution, 8k"
    assert all(p["api"] != "runware" for p in v2.values())  # the page sends v2 through fal-ai/ccsr-v2
    v1 = {p["name"]: p for p in models[0]["parameters"]}
    assert "process_size" not in v1 and v1["steps"]["default"] == 45


def test_playground_form_upscales_with_v2(both_server, cli_pixels):
    """What the page sends for CCSR-v2 (the fal queue of fal-ai/ccsr-v2 with its form's fields) runs v2."""
    auth = {"Authorization": f"Key {API_KEY}"}
    sub = httpx.post(f"{both_server}/queue/fal-ai/ccsr-v2", headers=auth,
                     json={"image_url": INPUT_URI, **SMALL, "seed": 233}).json()
    deadline = time.monotonic() + 120
    while httpx.get(sub["status_url"], headers=auth).json()["status"] != "COMPLETED":
        assert time.monotonic() < deadline
        time.sleep(0.2)
    out = httpx.get(sub["response_url"], headers=auth).json()
    assert np.array_equal(pixels(out["image"]["url"]),
                          cli_pixels("--scale", "4", "--process-size", "128", "--seed", "233"))


def test_runware_v2_settings_are_validated_in_runware_shape(both_server):
    def errors(**task) -> list[dict]:  # type: ignore[no-untyped-def]
        r = httpx.post(f"{both_server}/v1", headers={"Authorization": f"Bearer {API_KEY}"},
                       json=[{"taskType": "upscale", "taskUUID": "0b4b2a39-8f8e-4d3c-9a43-5d7e1f2a6c10",
                              "model": "ccsr:2@1", "inputs": {"image": INPUT_URI}, **task}])
        assert r.status_code == 400, r.text
        return r.json()["errors"]

    (e,) = errors(settings={"startPoint": "middle"})
    assert (e["code"], e["parameter"]) == ("invalidStartPoint", "settings.startPoint")
    (e,) = errors(settings={"preset": "three-step"})
    assert (e["code"], e["parameter"]) == ("invalidPreset", "settings.preset") and "two-step" in e["message"]
    (e,) = errors(settings={"tMax": 1.5})
    assert (e["code"], e["parameter"]) == ("invalidTMax", "settings.tMax")
    (e,) = errors(settings={"tMax": 0.4, "tMin": 0.5})  # the range is checked where the parameters meet
    assert e["code"] == "invalidParameters" and e["parameter"].startswith("settings.t")
    (e,) = errors(upscaleFactor=2.5)  # CCSR-v2 takes whole factors
    assert (e["code"], e["parameter"]) == ("invalidParameters", "upscaleFactor") and "whole" in e["message"]
