"""End to end: the unmodified ``fal_client`` (a subprocess) against a real ``ccsr serve`` over TLS.

The client is pointed at us only through environment variables (protocols.md B.2): ``FAL_KEY``,
``FAL_RUN_HOST``, ``FAL_QUEUE_RUN_HOST`` and ``SSL_CERT_FILE`` (our self-signed certificate). The server runs
the tiny fixture model on CPU; every result is compared pixel for pixel with a direct
:class:`ccsr.pipeline.CCSRPipeline` run with the same parameters and seed.

Inputs are kept small and cheap: a 24x20 picture, ``tile_diffusion="mix"`` at 256 px (the reference resizes
the short side to the tile size instead of 512) and ``t_max/t_min`` giving 2 network evaluations of 10 steps.
"""

from __future__ import annotations

import base64
import io
import json
import os
import ssl
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import pytest

pytest.importorskip("fal_client")
httpx = pytest.importorskip("httpx")
from PIL import Image  # noqa: E402

from ccsr.api.tls import make_self_signed  # noqa: E402
from conftest import free_port, tiny_model  # noqa: E402

ROOT = Path(__file__).resolve().parents[2]
SCRIPT = Path(__file__).with_name("fal_client_script.py")

APP = "fal-ai/ccsr"
# cheap but complete: every input of the schema is given (tile_vae off keeps the decode global)
FAST = {
    "scale": 2,
    "steps": 10,
    "t_max": 0.2,
    "t_min": 0.1,
    "tile_diffusion": "mix",
    "tile_diffusion_size": 256,
    "tile_diffusion_stride": 128,
    "tile_vae": False,
    "tile_vae_decoder_size": 226,
    "tile_vae_encoder_size": 1024,
    "color_fix_type": "adain",
}


def _input_png() -> bytes:
    rng = np.random.default_rng(7)
    buf = io.BytesIO()
    Image.fromarray(rng.integers(0, 256, (20, 24, 3), dtype=np.uint8)).save(buf, "PNG")
    return buf.getvalue()


INPUT = _input_png()
INPUT_URI = "data:image/png;base64," + base64.b64encode(INPUT).decode()


@pytest.fixture(scope="module")
def server(tmp_path_factory, sink):
    """``python -m ccsr.api.serve`` with TLS on a free 127.0.0.1 port, the tiny model, one CPU worker."""
    d = tmp_path_factory.mktemp("fal_server")
    tls = make_self_signed(d / "cert.pem", d / "key.pem")
    port = free_port()
    weights, config = tiny_model()
    env = {
        **os.environ,
        "PYTHONPATH": os.pathsep.join([str(ROOT / "src"), os.environ.get("PYTHONPATH", "")]),
        "OMP_NUM_THREADS": "1",
        "MKL_NUM_THREADS": "1",
    }
    cmd = [
        sys.executable,
        "-m",
        "ccsr.api.serve",
        "--host",
        "127.0.0.1",
        "--port",
        str(port),
        "--data-dir",
        str(d / "data"),
        "--tls-cert",
        str(tls.cert),
        "--tls-key",
        str(tls.key),
        "--weights",
        str(weights),
        "--config",
        str(config),
        "--device",
        "cpu",
        "--dtype",
        "float32",
        "--allow-fetch-host",
        f"127.0.0.1:{sink.port}",
        "--log-level",
        "warning",
    ]
    log = open(d / "server.log", "wb")  # noqa: SIM115
    proc = subprocess.Popen(cmd, env=env, stdout=log, stderr=subprocess.STDOUT, cwd=d)
    base = f"https://127.0.0.1:{port}"
    deadline = time.time() + 120
    ready = False
    with httpx.Client(verify=ssl.create_default_context(cafile=str(tls.cert)), timeout=2) as c:
        while time.time() < deadline and proc.poll() is None:
            try:
                if c.get(base + "/readyz").status_code == 200:
                    ready = True
                    break
            except httpx.HTTPError:
                pass
            time.sleep(0.2)
    if not ready:
        proc.kill()
        log.close()
        raise RuntimeError("ccsr serve did not become ready:\n" + (d / "server.log").read_text()[-4000:])
    info = {"port": port, "base": base, "cert": str(tls.cert), "dir": d}
    try:
        yield info
    finally:
        proc.terminate()
        try:
            proc.wait(10)
        except subprocess.TimeoutExpired:
            proc.kill()
        log.close()


def fal(server, scenario: str, args: dict, timeout: float = 240) -> dict:
    """Run one scenario of fal_client_script.py in a fresh interpreter, redirected by env vars only."""
    env = {k: v for k, v in os.environ.items() if not k.startswith("FAL_")}
    env.update(
        FAL_KEY="test-key",
        FAL_RUN_HOST=f"127.0.0.1:{server['port']}",
        FAL_QUEUE_RUN_HOST=f"127.0.0.1:{server['port']}/queue",
        SSL_CERT_FILE=server["cert"],
    )
    env.pop("SSL_CERT_DIR", None)
    p = subprocess.run(
        [sys.executable, str(SCRIPT), scenario, json.dumps(args)],
        env=env,
        capture_output=True,
        text=True,
        timeout=timeout,
    )
    assert p.returncode == 0, f"{scenario} failed:\n{p.stdout[-3000:]}\n{p.stderr[-3000:]}"
    return json.loads(p.stdout.strip().splitlines()[-1])


@pytest.fixture(scope="module")
def reference(tiny_pipeline):
    """What ``ccsr upscale`` gives for the same input, parameters and seed: the imaging chain around a direct
    CCSRPipeline run (same model, device and dtype as the server), decoded to pixels; cached."""
    import torch

    from ccsr import imaging
    from ccsr.params import UpscaleParams

    pipe = tiny_pipeline  # same model, device (cpu) and dtype (float32) as the server
    cache: dict = {}

    def run(args: dict, seed: int) -> np.ndarray:
        key = (json.dumps(args, sort_keys=True), seed)
        if key not in cache:
            p = UpscaleParams(
                scale=float(args["scale"]),
                steps=args["steps"],
                t_max=args["t_max"],
                t_min=args["t_min"],
                seed=seed,
                color_fix=args["color_fix_type"],
                tile_diffusion=args["tile_diffusion"],
                tile_diffusion_size=args["tile_diffusion_size"],
                tile_diffusion_stride=args["tile_diffusion_stride"],
                tile_vae=args["tile_vae"],
                tile_vae_decoder_size=args["tile_vae_decoder_size"],
                tile_vae_encoder_size=args["tile_vae_encoder_size"],
            )
            threads = torch.get_num_threads()
            torch.set_num_threads(1)  # as the server (OMP_NUM_THREADS=1): same kernels, same float sums
            try:
                enc = imaging.upscale_bytes(
                    INPUT,
                    lambda rgb: pipe.run(rgb, p),
                    encode_options=imaging.EncodeOptions(format="PNG"),
                    scale=p.scale,
                )
            finally:
                torch.set_num_threads(threads)
            cache[key] = np.asarray(Image.open(io.BytesIO(enc.data)).convert("RGB"))
        return cache[key]

    return run


def fetch_pixels(server, out: dict) -> np.ndarray:
    img = out["image"]
    r = httpx.get(img["url"], verify=ssl.create_default_context(cafile=server["cert"]))
    assert r.status_code == 200 and r.headers["content-type"] == img["content_type"] == "image/png"
    assert len(r.content) == img["file_size"]
    im = Image.open(io.BytesIO(r.content))
    assert im.size == (img["width"], img["height"])
    return np.asarray(im.convert("RGB"))


def assert_same_as_pipeline(server, reference, out: dict, args: dict) -> None:
    assert set(out) == {"image", "seed"} and isinstance(out["seed"], int)
    assert set(out["image"]) == {"url", "content_type", "file_name", "file_size", "width", "height"}
    assert (out["image"]["width"], out["image"]["height"]) == (24 * args["scale"], 20 * args["scale"])
    got = fetch_pixels(server, out)
    want = reference(args, out["seed"])
    assert got.shape == want.shape
    assert np.array_equal(got, want), f"max pixel difference {np.abs(got.astype(int) - want).max()}"


# ============================================================================================= tests


def test_run_matches_pipeline(server, reference):
    args = {**FAST, "image_url": INPUT_URI, "seed": 1234}
    out = fal(server, "run", {"arguments": args})["result"]
    assert out["seed"] == 1234
    assert_same_as_pipeline(server, reference, out, FAST)


def test_run_equals_ccsr_upscale_cli(server, tmp_path):
    """The issue's bar, literally: the fal output's pixels are ``ccsr upscale``'s for the same params+seed."""
    args = {**FAST, "seed": 4321}
    out = fal(server, "run", {"arguments": {**args, "image_url": INPUT_URI}})["result"]
    (tmp_path / "in.png").write_bytes(INPUT)
    weights, config = tiny_model()
    cli = [
        sys.executable,
        "-m",
        "ccsr.cli",
        "upscale",
        str(tmp_path / "in.png"),
        "-o",
        str(tmp_path / "cli.png"),
        "--weights",
        str(weights),
        "--config",
        str(config),
        "--device",
        "cpu",
        "--dtype",
        "float32",
        "-q",
    ]
    for k in (
        "scale",
        "steps",
        "t_max",
        "t_min",
        "seed",
        "tile_diffusion",
        "tile_diffusion_size",
        "tile_diffusion_stride",
        "tile_vae_decoder_size",
        "tile_vae_encoder_size",
    ):
        cli += [f"--{k.replace('_', '-')}", str(args[k])]
    cli += ["--color-fix", args["color_fix_type"]] + (["--tile-vae"] if args["tile_vae"] else [])
    env = {
        **os.environ,
        "PYTHONPATH": os.pathsep.join([str(ROOT / "src"), os.environ.get("PYTHONPATH", "")]),
        "OMP_NUM_THREADS": "1",
        "MKL_NUM_THREADS": "1",
    }
    p = subprocess.run(cli, env=env, capture_output=True, text=True, timeout=300)
    assert p.returncode == 0, p.stderr[-3000:]
    want = np.asarray(Image.open(tmp_path / "cli.png").convert("RGB"))
    assert np.array_equal(fetch_pixels(server, out), want)


def test_submit_status_logs_get_result(server, reference):
    args = {**FAST, "image_url": INPUT_URI}  # no seed: drawn by the server and returned
    r = fal(server, "submit_flow", {"arguments": args})
    kinds = [s["type"] for s in r["statuses"]]
    assert kinds[-1] == "Completed" and set(kinds) <= {"Queued", "InProgress", "Completed"}
    final = r["statuses"][-1]
    assert final["error"] is None and final["metrics"]["inference_time"] > 0
    msgs = [ln["message"] for ln in final["logs"]]
    text = "\n".join(msgs)
    # real log lines from the run: what is upscaled, progress, timing
    assert "upscaling 24x20 -> 48x40" in text and "done in" in text, text
    assert all(set(ln) >= {"message", "level", "timestamp"} for ln in final["logs"])
    assert r["get"] == r["result"]
    assert r["final_status"]["type"] == "Completed"
    # the URLs the client used came from us, absolute, under /queue
    assert all(u.startswith(f"https://127.0.0.1:{server['port']}/queue/{APP}/requests/") for u in r["urls"])
    assert_same_as_pipeline(server, reference, r["get"], FAST)


def test_subscribe_queue_updates(server, reference):
    args = {**FAST, "image_url": INPUT_URI, "seed": 99}
    r = fal(server, "subscribe", {"arguments": args, "blocker": {**FAST, "image_url": INPUT_URI, "seed": 98}})
    kinds = [u["type"] for u in r["updates"]]
    # Queued (behind the blocker) -> InProgress -> Completed, in that order
    assert kinds[0] == "Queued" and "InProgress" in kinds and kinds[-1] == "Completed", kinds
    order = {"Queued": 0, "InProgress": 1, "Completed": 2}
    assert [order[k] for k in kinds] == sorted(order[k] for k in kinds)
    assert r["updates"][0]["position"] == 0
    assert r["enqueued"] and r["result"]["seed"] == 99 and r["blocker"]["seed"] == 98
    assert_same_as_pipeline(server, reference, r["result"], FAST)


def test_subscribe_sees_queued_then_cancel_queued(server):
    """A blocker occupies the single worker; the victim is IN_QUEUE, is cancelled, and never runs."""
    blocker = {**FAST, "image_url": INPUT_URI, "seed": 5}
    r = fal(server, "cancel_queued", {"blocker": blocker, "arguments": {**FAST, "image_url": INPUT_URI}})
    assert r["before"]["type"] == "Queued" and r["before"]["position"] >= 0
    assert r["after"]["type"] == "Completed" and r["after"]["error_type"] == "client_cancelled"
    assert r["victim_result"]["status_code"] == 499
    assert r["blocker"]["seed"] == 5
    assert r["late_cancel"]["status_code"] == 400  # ALREADY_COMPLETED raises in the client
    assert not any("step" in (ln["message"] or "") for ln in r["after"]["logs"])  # it never ran


def test_cancel_running_stops_between_steps(server):
    # 100 steps over t in [0.02, 1]: ~100 network evaluations, far longer than the cancel takes
    args = {**FAST, "image_url": INPUT_URI, "steps": 100, "t_max": 1.0, "t_min": 0.02}
    r = fal(server, "cancel_running", {"arguments": args})
    assert "InProgress" in r["seen"]
    assert r["final"]["type"] == "Completed" and r["final"]["error_type"] == "client_cancelled"
    assert r["result"]["status_code"] == 499
    msgs = [ln["message"] for ln in r["final"]["logs"]]
    assert msgs[-1] == "cancelled" and not any(m.startswith("done in") for m in msgs)
    # it stopped part-way through its ~100 evaluations (the engine logs "progress N%" as it goes)
    done = [int(m.split()[1].rstrip("%")) for m in msgs if m.startswith("progress ")]
    assert max(done, default=0) < 50, msgs


def test_webhook_delivered_to_local_sink(server, sink):
    args = {**FAST, "image_url": INPUT_URI, "seed": 11}
    r = fal(server, "webhook", {"arguments": args, "webhook_url": f"{sink.base}/fal-hook?tag=1"})
    got = sink.wait_for(lambda q: q["path"] == "/fal-hook?tag=1", timeout=30)
    assert got["method"] == "POST" and got["headers"]["content-type"] == "application/json"
    body = json.loads(got["body"])
    assert body["status"] == "OK" and body["request_id"] == r["request_id"] and body["error"] is None
    assert body["payload"] == r["result"]


def test_missing_image_url_is_422_detail_list(server):
    r = fal(server, "run_error", {"arguments": {"scale": 2}})
    assert r["error"] == "FalClientHTTPError" and r["status_code"] == 422
    assert isinstance(r["message"], list) and r["message"][0]["loc"] == ["body", "image_url"]
    assert r["message"][0]["type"] == "missing"
    assert r["headers"].get("x-fal-request-id")
    r = fal(server, "subscribe_error", {"arguments": {"image_url": INPUT_URI, "scale": 5}})
    assert r["status_code"] == 422 and r["message"][0]["loc"] == ["body", "scale"]


def test_async_variants(server, reference):
    blocker = {**FAST, "image_url": INPUT_URI, "seed": 6}
    r = fal(
        server, "async_all", {"arguments": {**FAST, "image_url": INPUT_URI, "seed": 21}, "blocker": blocker}
    )
    assert r["run"]["seed"] == 21
    assert r["first_status"]["type"] in ("Queued", "InProgress", "Completed")
    assert r["get"] == r["result"] and r["status"]["type"] == "Completed"
    assert r["updates"][-1]["type"] == "Completed"
    assert r["error"]["status_code"] == 422 and r["error"]["message"][0]["loc"] == ["body", "image_url"]
    assert r["cancelled"]["type"] == "Completed" and r["cancelled"]["error_type"] == "client_cancelled"
    # same params + seed -> same pixels, whichever way the request came in
    assert fetch_pixels(server, r["run"]).tobytes() == fetch_pixels(server, r["get"]).tobytes()
    assert_same_as_pipeline(server, reference, r["subscribe"], FAST)


def test_upload_file_to_our_storage(server, reference, tmp_path):
    """Optional storage endpoints: upload_file (both repositories) lands here and chains into a run."""
    path = tmp_path / "in.png"
    path.write_bytes(INPUT)
    args = {**FAST, "seed": 3}
    r = fal(server, "upload", {"base": server["base"], "path": str(path), "arguments": args})
    for k in ("v3", "gcs", "image"):
        assert r[k].startswith(server["base"] + "/images/"), r[k]
        got = httpx.get(r[k], verify=ssl.create_default_context(cafile=server["cert"]))
        assert got.status_code == 200 and got.content == INPUT
    assert_same_as_pipeline(server, reference, r["run"], FAST)
    assert fetch_pixels(server, r["run_gcs"]).tobytes() == fetch_pixels(server, r["run"]).tobytes()


def test_stream_sends_progress_then_the_output(server, reference):
    """``fal_client.stream``: progress events (queue status, logs, percent), then what ``run`` returns."""
    args = {**FAST, "image_url": INPUT_URI, "seed": 77}
    *progress, out = fal(server, "stream", {"arguments": args})["events"]
    assert progress and all(e["status"] in ("IN_QUEUE", "IN_PROGRESS") for e in progress)
    assert len({e["request_id"] for e in progress}) == 1 and all(0 <= e["progress"] <= 100 for e in progress)
    assert out["seed"] == 77
    assert_same_as_pipeline(server, reference, out, FAST)


def test_stream_refused_before_it_starts_is_a_json_error(server):
    r = fal(server, "stream_error", {"arguments": {"scale": 2}})
    assert r["error"] == "SSEError" and "application/json" in r["message"], r
    with httpx.Client(verify=ssl.create_default_context(cafile=server["cert"])) as c:
        got = c.post(f"{server['base']}/{APP}/stream", json={"scale": 2}, headers={"Authorization": "Key k"})
    assert got.status_code == 422 and got.json()["detail"][0]["loc"] == ["body", "image_url"]


def test_stream_client_going_away_cancels_the_job(server):
    # ~100 network evaluations: far longer than reading two events and closing the connection takes
    args = {**FAST, "image_url": INPUT_URI, "steps": 100, "t_max": 1.0, "t_min": 0.02}
    r = fal(server, "stream_disconnect", {"arguments": args})
    assert r["seen"][-1]["status"] == "IN_PROGRESS"
    assert r["final"]["type"] == "Completed" and r["final"]["error_type"] == "client_cancelled", r["final"]
    msgs = [ln["message"] for ln in r["final"]["logs"]]
    assert msgs[-1] == "cancelled" and not any(m.startswith("done in") for m in msgs)
