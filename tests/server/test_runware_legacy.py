"""The legacy official ``runware`` SDK (PyPI 0.5.24), unmodified, in its own virtualenv (it installs the same
module name as runware-sdk), pointed at a real ``ccsr serve`` with ``url=`` (protocols.md C.2 T2)."""

from __future__ import annotations

import io
import json
import subprocess
from pathlib import Path

import httpx
import pytest
from PIL import Image


def image_size(data: bytes) -> tuple[int, int]:
    return Image.open(io.BytesIO(data)).size


pytestmark = pytest.mark.timeout(300)

SCRIPT = Path(__file__).with_name("runware_legacy_script.py")


def test_legacy_sdk_upload_upscale_async_webhook_error(server, sink, input_png, legacy_python, tmp_path):
    png = tmp_path / "in.png"
    png.write_bytes(input_png)
    proc = subprocess.run(
        [str(legacy_python), str(SCRIPT), server.ws, server.api_key, str(png), sink.base],
        capture_output=True,
        text=True,
        timeout=240,
    )
    lines = [ln for ln in proc.stdout.splitlines() if ln.startswith("{")]
    assert lines, f"no result from the legacy client (rc={proc.returncode}):\n{proc.stdout}\n{proc.stderr[-3000:]}"
    out = json.loads(lines[-1])
    assert "fatal" not in out, out.get("traceback", out)

    sync = out["sync"]
    assert sync["taskType"] == "imageUpscale" and sync["cost"] == 0 and sync["inputImageUUID"]
    assert image_size(httpx.get(sync["imageURL"], timeout=30).content) == (96, 80)
    assert image_size(httpx.get(out["inputs"]["imageURL"], timeout=30).content) == (192, 160)

    a = out["async"]
    assert a["ack_type"] == "IAsyncTaskResponse" and a["status"] == "success"
    assert image_size(httpx.get(a["imageURL"], timeout=30).content) == (192, 160)

    assert out["webhook"]["ack_type"] == "IAsyncTaskResponse"
    hook = sink.wait_for(lambda q: q["path"] == "/legacy-webhook")
    item = json.loads(hook["body"])["data"][0]
    assert item["taskUUID"] == out["webhook"]["taskUUID"] and item["taskType"] == "imageUpscale"
    assert item["status"] == "success" and item["imageURL"]

    err = out["error"]
    assert err["raised"] and err["type"] == "RunwareAPIError"
    assert err["code"] == "invalidInputImage" and err["taskUUID"]
