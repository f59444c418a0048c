"""Helpers shared by the hardening tests (imported as a plain module: tests/ has no packages)."""

from __future__ import annotations

import base64
import io
import os
import socket
import subprocess
import sys
import time
import uuid
from pathlib import Path

import httpx
from PIL import Image

from ccsr.api.auth import hash_key


def png_bytes(size=(16, 16), color=(200, 30, 30)) -> bytes:
    buf = io.BytesIO()
    Image.new("RGB", size, color).save(buf, "PNG")
    return buf.getvalue()


def keys_file(path: Path, lines: dict[str, str]) -> Path:
    """Write ``{plaintext key: options}`` as digests, the way an operator would."""
    path.write_text("".join(f"{hash_key(k)} {opts}\n" for k, opts in lines.items()))
    return path


def rw_upscale(image: str, **extra) -> dict:
    return {
        "taskType": "upscale",
        "taskUUID": str(uuid.uuid4()),
        "inputs": {"image": image},
        "upscaleFactor": 2,
        "deliveryMethod": "async",
        **extra,
    }


def data_uri(data: bytes) -> str:
    return "data:image/png;base64," + base64.b64encode(data).decode()


# ------------------------------------------------------------------------------------------ real server

REPO = Path(__file__).resolve().parents[2]
FIXTURES = REPO / "tests" / "fixtures" / "ccsr_v1_tiny"


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


class RealServer:
    """``ccsr serve`` in a subprocess on 127.0.0.1 with the tiny model, 2 steps, pad mode."""

    def __init__(self, tmp: Path, *extra: str):
        self.port = free_port()
        self.tmp = tmp
        self.data_dir = tmp / "data"
        self.log_path = tmp / f"server-{self.port}.log"
        self.args = [
            *("--host", "127.0.0.1", "--port", str(self.port), "--device", "cpu", "--dtype", "float32"),
            *("--weights", str(FIXTURES / "model.safetensors"), "--config", str(FIXTURES / "model.yaml")),
            *("--data-dir", str(self.data_dir), "--size-mode", "pad", "--default-steps", "2"),
            *extra,
        ]
        self.proc: subprocess.Popen | None = None

    @property
    def http(self) -> str:
        return f"http://127.0.0.1:{self.port}"

    def start(self, timeout: float = 180.0) -> RealServer:
        env = dict(os.environ, OMP_NUM_THREADS="2")
        env["PYTHONPATH"] = str(REPO / "src") + os.pathsep + env.get("PYTHONPATH", "")
        with open(self.log_path, "ab") as log:
            self.proc = subprocess.Popen(
                [sys.executable, "-m", "ccsr.api.serve", *self.args], stdout=log, stderr=subprocess.STDOUT, env=env
            )
        end = time.monotonic() + timeout
        while time.monotonic() < end:
            if self.proc.poll() is not None:
                raise RuntimeError(f"server exited with {self.proc.returncode}:\n{self.log()}")
            try:
                if httpx.get(f"{self.http}/readyz", timeout=2).status_code == 200:
                    return self
            except httpx.HTTPError:
                pass
            time.sleep(0.25)
        raise RuntimeError(f"server not ready after {timeout}s:\n{self.log()}")

    def log(self) -> str:
        try:
            return self.log_path.read_text(errors="replace")[-6000:]
        except OSError:
            return ""

    def stop(self) -> None:
        if self.proc and self.proc.poll() is None:
            self.proc.terminate()
            try:
                self.proc.wait(30)
            except subprocess.TimeoutExpired:
                self.proc.kill()
                self.proc.wait(5)
