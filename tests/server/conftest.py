"""Fixtures for server tests: a real ``ccsr serve`` subprocess on 127.0.0.1 with the tiny model, a local
webhook / upload sink, small test images, and the legacy Runware SDK's own virtualenv.

Everything stays on loopback. Servers run with ``--size-mode pad`` and 2-step defaults so a job takes seconds
on a CPU; the tiny model is loaded once per server process.
"""

from __future__ import annotations

import io
import json
import os
import signal
import socket
import subprocess
import sys
import threading
import time
from dataclasses import dataclass, field
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path

import httpx
import pytest
from PIL import Image

REPO = Path(__file__).resolve().parents[2]
ARTIFACTS = REPO / "tests" / "_artifacts"
API_KEY = "test-key"


FIXTURES = REPO / "tests" / "fixtures" / "ccsr_v1_tiny"


def tiny_model() -> tuple[Path, Path]:
    if not (FIXTURES / "model.yaml").is_file():
        pytest.fail(f"tiny model fixtures not found at {FIXTURES}")
    return FIXTURES / "model.safetensors", FIXTURES / "model.yaml"


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


# ------------------------------------------------------------------------------------------ images


def png_bytes(size=(48, 40), seed=0) -> bytes:
    import random

    rnd = random.Random(seed)
    img = Image.new("RGB", size)
    img.putdata([(rnd.randrange(256), rnd.randrange(256), rnd.randrange(256)) for _ in range(size[0] * size[1])])
    buf = io.BytesIO()
    img.save(buf, "PNG")
    return buf.getvalue()


@pytest.fixture(scope="session")
def input_png() -> bytes:
    return png_bytes((48, 40), seed=1)


# ------------------------------------------------------------------------------------------ sink


@dataclass
class Sink:
    port: int
    requests: list[dict] = field(default_factory=list)
    files: dict[str, bytes] = field(default_factory=dict)  # what GET serves, by path
    refusing: set[str] = field(default_factory=set)  # path prefixes answered 503 (a receiver that is down)
    cond: threading.Condition = field(default_factory=threading.Condition)

    @property
    def base(self) -> str:
        return f"http://127.0.0.1:{self.port}"

    def hits(self, path: str, status: int | None = None) -> int:
        """How many requests reached ``path`` (answered ``status``, when given)."""
        with self.cond:
            return sum(1 for r in self.requests if r["path"] == path and status in (None, r["status"]))

    def wait_for(self, pred, timeout: float = 60.0) -> dict:
        end = time.monotonic() + timeout
        with self.cond:
            while True:
                for r in self.requests:
                    if pred(r):
                        return r
                left = end - time.monotonic()
                if left <= 0:
                    raise AssertionError(f"sink received nothing matching within {timeout}s: {self.requests!r}")
                self.cond.wait(left)


@pytest.fixture(scope="session")
def sink():
    """A loopback HTTP peer: records POSTs (webhooks) and PUTs (uploadEndpoint), answering 200 (503 under a
    ``refusing`` prefix), and serves ``files`` on GET."""
    state = Sink(port=0)

    class Handler(BaseHTTPRequestHandler):
        def _record(self):
            n = int(self.headers.get("content-length") or 0)
            body = self.rfile.read(n) if n else b""
            with state.cond:
                status = 503 if any(self.path.startswith(p) for p in state.refusing) else 200
                state.requests.append(
                    {
                        "method": self.command,
                        "path": self.path,
                        "body": body,
                        "headers": {k.lower(): v for k, v in self.headers.items()},
                        "status": status,
                    }
                )
                state.cond.notify_all()
            self.send_response(status)
            self.send_header("content-length", "2")
            self.end_headers()
            self.wfile.write(b"ok")

        do_POST = do_PUT = _record

        def do_GET(self):
            data = state.files.get(self.path)
            self.send_response(200 if data is not None else 404)
            self.send_header("content-type", "application/octet-stream")
            self.send_header("content-length", str(len(data or b"")))
            self.end_headers()
            self.wfile.write(data or b"")

        def log_message(self, *a):
            pass

    srv = ThreadingHTTPServer(("127.0.0.1", 0), Handler)
    state.port = srv.server_address[1]
    t = threading.Thread(target=srv.serve_forever, daemon=True)
    t.start()
    yield state
    srv.shutdown()


# ------------------------------------------------------------------------------------------ server


@dataclass
class Server:
    port: int
    data_dir: Path
    log_path: Path
    args: list[str]
    proc: subprocess.Popen | None = None
    api_key: str = API_KEY
    model: tuple[Path, Path] = field(default_factory=tiny_model)  # (weights, config) it serves

    @property
    def http(self) -> str:
        return f"http://127.0.0.1:{self.port}"

    @property
    def ws(self) -> str:
        return f"ws://127.0.0.1:{self.port}/v1"

    def start(self, timeout: float = 180.0) -> Server:
        env = dict(os.environ)
        env["PYTHONPATH"] = str(REPO / "src") + os.pathsep + env.get("PYTHONPATH", "")
        env.setdefault("OMP_NUM_THREADS", "2")
        with open(self.log_path, "ab") as log:  # the child keeps its own copy of the descriptor
            self.proc = subprocess.Popen(
                [sys.executable, "-m", "ccsr.api.serve", *self.args],
                stdout=log,
                stderr=subprocess.STDOUT,
                env=env,
                cwd=str(REPO),
            )
        end = time.monotonic() + timeout
        while time.monotonic() < end:
            if self.proc.poll() is not None:
                raise RuntimeError(f"server exited with {self.proc.returncode}:\n{self.log()}")
            try:
                r = httpx.get(f"{self.http}/readyz", timeout=2)
                if r.status_code == 200:
                    return self
                if r.json().get("status") == "failed":
                    raise RuntimeError(f"model failed to load: {r.text}\n{self.log()}")
            except httpx.HTTPError:
                pass
            time.sleep(0.25)
        raise RuntimeError(f"server not ready after {timeout}s:\n{self.log()}")

    def log(self) -> str:
        try:
            return self.log_path.read_text(errors="replace")[-6000:]
        except OSError:
            return ""

    def kill(self) -> None:
        if self.proc and self.proc.poll() is None:
            self.proc.send_signal(signal.SIGKILL)
            self.proc.wait(10)

    def stop(self) -> None:
        if self.proc and self.proc.poll() is None:
            self.proc.terminate()
            try:
                self.proc.wait(15)
            except subprocess.TimeoutExpired:
                self.proc.kill()
                self.proc.wait(5)


def make_server(tmp: Path, *extra: str, port: int | None = None, data_dir: Path | None = None) -> Server:
    weights, config = tiny_model()
    port = port or free_port()
    data_dir = data_dir or (tmp / "data")
    args = [
        "--host",
        "127.0.0.1",
        "--port",
        str(port),
        "--weights",
        str(weights),
        "--config",
        str(config),
        "--device",
        "cpu",
        "--dtype",
        "float32",
        "--data-dir",
        str(data_dir),
        "--size-mode",
        "pad",
        "--default-steps",
        "2",
        "--log-level",
        "info",
        *extra,
    ]
    return Server(port=port, data_dir=data_dir, log_path=tmp / f"server-{port}.log", args=args)


@pytest.fixture
def server_factory(tmp_path):
    """``server_factory(*extra_args, port=, data_dir=)`` -> an unstarted :class:`Server`, stopped after."""
    made: list[Server] = []

    def factory(*extra: str, port: int | None = None, data_dir: Path | None = None) -> Server:
        srv = make_server(tmp_path, *extra, port=port, data_dir=data_dir)
        made.append(srv)
        return srv

    yield factory
    for srv in made:
        srv.stop()


@pytest.fixture(scope="session")
def server(tmp_path_factory, sink):
    """One shared server for the Runware tests: API key ``test-key``, the sink allowed for deliveries."""
    tmp = tmp_path_factory.mktemp("runware-server")
    # a small output cap (Runware's is 4096) so that the shrink-to-fit rule is exercised on tiny images
    srv = make_server(
        tmp, "--api-key", API_KEY, "--allow-fetch-host", f"127.0.0.1:{sink.port}", "--max-output-side", "192"
    )
    srv.start()
    yield srv
    srv.stop()


# ------------------------------------------------------------------------------------------ legacy SDK venv

LEGACY_SPEC = "runware==0.5.24"


@pytest.fixture(scope="session")
def legacy_python() -> Path:
    """A virtualenv with the legacy ``runware`` package (same module name as runware-sdk, so it lives apart).

    Cached under tests/_artifacts/; created with ``python -m venv`` + ``pip install runware==0.5.24``.
    """
    venv = ARTIFACTS / "runware-legacy-venv"
    py = venv / "bin" / "python"
    marker = venv / ".ccsr-ok"
    if py.exists() and marker.exists():
        return py
    ARTIFACTS.mkdir(parents=True, exist_ok=True)
    try:
        subprocess.run(
            [sys.executable, "-m", "venv", "--clear", str(venv)], check=True, capture_output=True, timeout=300
        )
        r = subprocess.run(
            [str(py), "-m", "pip", "install", "-q", "--disable-pip-version-check", LEGACY_SPEC],
            capture_output=True,
            text=True,
            timeout=600,
        )
    except (subprocess.CalledProcessError, subprocess.TimeoutExpired) as e:
        pytest.fail(f"could not create the legacy Runware venv at {venv}: {e}")
    if r.returncode != 0:
        pytest.fail(f"pip could not install {LEGACY_SPEC} into {venv} (needs PyPI access):\n{r.stdout}\n{r.stderr}")
    check = subprocess.run(
        [str(py), "-c", "import runware, runware.version as v; print(v.__version__)"],
        capture_output=True,
        text=True,
    )
    if check.returncode != 0:
        pytest.fail(f"legacy runware does not import in {venv}:\n{check.stderr}")
    marker.write_text(json.dumps({"spec": LEGACY_SPEC, "version": check.stdout.strip()}))
    return py
