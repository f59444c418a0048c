"""Faults on server state (issue 8): a SIGKILL with jobs in every state, and a full disk under the image store.

Restart: a real ``ccsr serve`` (tiny model) holds one job of each kind (success, error, cancelled, running,
queued) when it is killed with SIGKILL; started again on the same data directory, finished jobs answer exactly
as before and the cut-off and queued ones complete. Jobs go through fal's queue API (submit, status, result,
cancel), the one protocol with a cancel.

Disk full: a tiny tmpfs is mounted over the image store (root only; else writes there raise ENOSPC) and filled;
uploads and job outputs then fail in the protocol's own error shape, the server stays healthy, and a job
succeeds once space is back.
"""

from __future__ import annotations

import contextlib
import errno
import io
import os
import subprocess
import time
import uuid
from pathlib import Path

import httpx
import pytest
from hardening_helpers import RealServer, data_uri, png_bytes, rw_upscale
from PIL import Image

APP = "fal-ai/ccsr"


def _wait(pred, timeout: float, what: str):
    end = time.monotonic() + timeout
    while time.monotonic() < end:
        if v := pred():
            return v
        time.sleep(0.05)
    raise AssertionError(f"{what}: not within {timeout}s")


# ============================================================================================ restart


class Fal:
    """Just enough of fal's queue API over httpx."""

    def __init__(self, base: str):
        self.base = base
        self.http = httpx.Client(timeout=30)

    def submit(self, image: bytes, **args) -> str:
        body = {"image_url": data_uri(image), "scale": 2, "steps": 10, **args}
        r = self.http.post(f"{self.base}/queue/{APP}", json=body)
        assert r.status_code == 200, r.text
        return r.json()["request_id"]

    def status(self, rid: str) -> dict:
        return self.http.get(f"{self.base}/queue/{APP}/requests/{rid}/status", params={"logs": 1}).json()

    def result(self, rid: str) -> httpx.Response:
        return self.http.get(f"{self.base}/queue/{APP}/requests/{rid}")

    def cancel(self, rid: str) -> httpx.Response:
        return self.http.put(f"{self.base}/queue/{APP}/requests/{rid}/cancel")

    def done(self, rid: str) -> bool:
        return self.status(rid)["status"] == "COMPLETED"


def _truncated_png() -> bytes:
    """A PNG whose header is sound (accepted at submit) but whose pixel data is cut: it fails in the runner."""
    buf = io.BytesIO()
    Image.effect_noise((48, 40), 64).convert("RGB").save(buf, "PNG")
    data = buf.getvalue()
    return data[: len(data) // 2]


@pytest.mark.timeout(120)
def test_sigkill_with_jobs_in_every_state(tmp_path):
    srv = RealServer(tmp_path).start()
    try:
        fal = Fal(srv.http)
        image = png_bytes((48, 40), (30, 120, 200))
        ok = fal.submit(image, seed=1)
        _wait(lambda: fal.done(ok), 40, "first job")
        bad = fal.submit(_truncated_png(), seed=2)
        _wait(lambda: fal.done(bad), 20, "broken-input job")
        running = fal.submit(image, seed=3, steps=100)  # the slowest job the API takes: ~2 s here
        queued = [fal.submit(image, seed=4), fal.submit(image, seed=5)]
        cancelled = fal.submit(image, seed=6)
        assert fal.cancel(cancelled).status_code == 202

        # what a client saw before the crash
        before = {rid: (fal.result(rid).status_code, fal.result(rid).json()) for rid in (ok, bad, cancelled)}
        assert before[ok][0] == 200, before[ok]
        assert before[bad][0] == 422 and before[bad][1]["detail"][0]["type"] == "image_load_error", before[bad]
        assert before[cancelled][0] == 499, before[cancelled]
        ok_url = before[ok][1]["image"]["url"]
        ok_png = fal.http.get(ok_url).content
        _wait(lambda: fal.status(running)["status"] == "IN_PROGRESS", 20, "running job")
        assert [fal.status(q)["status"] for q in queued] == ["IN_QUEUE", "IN_QUEUE"]
        assert fal.status(running)["status"] == "IN_PROGRESS"
        srv.proc.kill()
        srv.proc.wait(10)
    finally:
        srv.stop()

    again = RealServer(tmp_path)
    again.port, again.args[again.args.index("--port") + 1] = srv.port, str(srv.port)  # same URLs as before
    again.start()
    try:
        fal = Fal(again.http)
        for rid, (code, body) in before.items():  # finished jobs: exactly as before
            r = fal.result(rid)
            assert (r.status_code, r.json()) == (code, body), rid
        assert fal.http.get(ok_url).content == ok_png  # the output outlived the crash at the same URL
        for rid in (running, *queued):  # the cut-off job is retried, the queued ones run
            _wait(lambda rid=rid: fal.done(rid), 40, f"job {rid} after restart")
            r = fal.result(rid)
            assert r.status_code == 200, r.text
            out = r.json()["image"]
            assert (out["width"], out["height"]) == (96, 80)
            assert Image.open(io.BytesIO(fal.http.get(out["url"]).content)).size == (96, 80)
        logs = " ".join(line["message"] for line in fal.status(running)["logs"])
        assert "restart" in logs, logs
        assert fal.result(cancelled).status_code == 499  # a cancelled job is never run again
    finally:
        again.stop()


# ============================================================================================ disk full


class FullDisk:
    """Makes ``root`` refuse writes: a 256 KiB tmpfs mounted there and filled up, when root may mount;
    else writes under ``root`` raise ENOSPC. ``fill()`` / ``free()`` switch it."""

    def __init__(self, root: Path, monkeypatch: pytest.MonkeyPatch):
        self.root, self.mp = root, monkeypatch
        root.mkdir(parents=True, exist_ok=True)
        mount = ["mount", "-t", "tmpfs", "-o", "size=256k", "tmpfs", str(root)]
        self.mounted = os.geteuid() == 0 and subprocess.run(mount, capture_output=True).returncode == 0
        self.filler = root / "filler"

    def fill(self) -> None:
        if self.mounted:
            with open(self.filler, "ab", buffering=0) as f, contextlib.suppress(OSError):
                while True:
                    f.write(b"\0" * 4096)
            return
        real = Path.write_bytes

        def write_bytes(path: Path, data) -> int:
            if Path(path).is_relative_to(self.root):
                raise OSError(errno.ENOSPC, os.strerror(errno.ENOSPC), str(path))
            return real(path, data)

        self.mp.setattr(Path, "write_bytes", write_bytes)

    def free(self) -> None:
        if self.mounted:
            self.filler.unlink(missing_ok=True)
        else:
            self.mp.undo()

    def close(self) -> None:
        if self.mounted:
            subprocess.run(["umount", "-l", str(self.root)], capture_output=True)


@pytest.fixture
def full_disk(tmp_path, monkeypatch):
    disk = FullDisk(tmp_path / "data-0" / "images", monkeypatch)
    try:
        yield disk
    finally:
        disk.close()


def _rw(c, tasks: list[dict]) -> httpx.Response:
    return c.post("/v1", json=tasks)


def test_disk_full_on_image_store(make_client, full_disk):
    c = make_client()  # data-0: its image store sits on the small disk
    assert c.app.state.engine.images.root == full_disk.root
    image = png_bytes((32, 32))
    # an input stored while there was room, for a job whose output will not fit
    up = _rw(c, [{"taskType": "imageUpload", "taskUUID": str(uuid.uuid4()), "image": data_uri(image)}])
    stored = up.json()["data"][0]["imageUUID"]

    full_disk.fill()
    try:
        # an upload: Runware's error shape, a 5xx that says why
        r = _rw(c, [{"taskType": "imageUpload", "taskUUID": str(uuid.uuid4()), "image": data_uri(image)}])
        assert r.status_code >= 500, r.text
        err = r.json()["errors"][0]
        assert err["taskType"] == "imageUpload" and "space" in err["message"].lower(), err
        # a job whose output cannot be written: a job error that says why
        task = rw_upscale(stored, deliveryMethod="sync")
        r = _rw(c, [task])
        err = r.json()["errors"][0]
        assert r.status_code >= 500 and err["taskUUID"] == task["taskUUID"], r.text
        assert "space" in err["message"].lower() and "inference" not in err["code"].lower(), err
        # fal: an upscale of a new input is refused in fal's shape
        r = c.post(f"/{APP}", json={"image_url": data_uri(image), "steps": 10})
        assert r.status_code == 503 and "space" in r.json()["detail"].lower(), r.text
        assert r.headers["x-fal-retryable"] == "true"
        # the server itself is fine
        assert c.get("/healthz").status_code == 200
        assert _rw(c, [{"taskType": "ping", "ping": True}]).status_code == 200
    finally:
        full_disk.free()

    r = _rw(c, [rw_upscale(data_uri(image), deliveryMethod="sync")])
    assert r.status_code == 200, r.text
    url = r.json()["data"][0]["imageURL"]
    assert c.get(url.split("testserver", 1)[1]).status_code == 200
    leftovers = [p.name for p in full_disk.root.rglob("*.tmp")]
    assert not leftovers, f"partial files left behind on the full disk: {leftovers}"
