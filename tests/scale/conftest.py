"""Fixtures for the scale-out tests: a private Redis, a local S3 (moto's server mode), all on 127.0.0.1.

Redis: a ``redis-server`` of our own on a free port (no persistence); without the binary, database 13 of
the Redis on 127.0.0.1:6379 (flushed); without either the tests fail with the reason.
"""

from __future__ import annotations

import json
import logging
import os
import shutil
import socket
import subprocess
import threading
import time
import uuid
from collections.abc import Iterator
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer

import pytest
import redis

os.environ.setdefault("AWS_ACCESS_KEY_ID", "testing")
os.environ.setdefault("AWS_SECRET_ACCESS_KEY", "testing")
os.environ.setdefault("AWS_DEFAULT_REGION", "us-east-1")


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def start_redis(binary: str, workdir) -> tuple[subprocess.Popen, str, int]:
    """A redis-server of our own on a free port (no persistence), answering pings: (process, URL, port)."""
    port = free_port()
    proc = subprocess.Popen(
        [binary, "--port", str(port), "--bind", "127.0.0.1", "--save", "", "--appendonly", "no"],
        cwd=workdir,
        stdout=subprocess.DEVNULL,
        stderr=subprocess.DEVNULL,
    )
    url = f"redis://127.0.0.1:{port}/0"
    client = redis.Redis.from_url(url)
    for _ in range(100):
        try:
            client.ping()
            return proc, url, port
        except redis.ConnectionError:
            time.sleep(0.05)
    proc.kill()
    pytest.fail(f"redis-server did not start on port {port}")


@pytest.fixture(scope="session")
def redis_url(tmp_path_factory) -> Iterator[str]:
    binary = shutil.which("redis-server")
    if binary:
        proc, url, _ = start_redis(binary, tmp_path_factory.mktemp("redis"))
        yield url
        proc.terminate()
        proc.wait(10)
        return
    url = "redis://127.0.0.1:6379/13"
    try:
        redis.Redis.from_url(url).flushdb()
    except redis.ConnectionError as e:
        pytest.fail(f"no redis-server binary and no Redis on 127.0.0.1:6379: {e}")
    yield url


@pytest.fixture
def rclient(redis_url) -> redis.Redis:
    client = redis.Redis.from_url(redis_url)
    client.flushdb()
    return client


@pytest.fixture
def prefix() -> str:
    return f"t{uuid.uuid4().hex[:8]}:"


@pytest.fixture(scope="session")
def s3_endpoint() -> Iterator[str]:
    """moto's S3 in server mode on a loopback port, with one bucket ``ccsr``."""
    import boto3
    from moto.server import ThreadedMotoServer

    logging.getLogger("werkzeug").setLevel(logging.WARNING)  # one line per S3 request otherwise
    server = ThreadedMotoServer(ip_address="127.0.0.1", port=0, verbose=False)
    server.start()
    host, port = server.get_host_and_port()
    endpoint = f"http://{host}:{port}"
    boto3.client("s3", endpoint_url=endpoint).create_bucket(Bucket="ccsr")
    yield endpoint
    server.stop()


class Sink:
    """A loopback webhook / upload receiver that records every request (method, path, body)."""

    def __init__(self) -> None:
        self.requests: list[tuple[str, str, bytes]] = []
        self.lock = threading.Lock()
        sink = self

        class Handler(BaseHTTPRequestHandler):
            def _record(self) -> None:
                n = int(self.headers.get("content-length") or 0)
                body = self.rfile.read(n) if n else b""
                with sink.lock:
                    sink.requests.append((self.command, self.path, body))
                self.send_response(200)
                self.send_header("content-length", "0")
                self.end_headers()

            do_POST = do_PUT = _record

            def log_message(self, *a) -> None:
                pass

        self.server = ThreadingHTTPServer(("127.0.0.1", 0), Handler)
        self.port = self.server.server_address[1]
        threading.Thread(target=self.server.serve_forever, daemon=True).start()

    @property
    def base(self) -> str:
        return f"http://127.0.0.1:{self.port}"

    def json_posts(self) -> list[dict]:
        with self.lock:
            return [json.loads(b) for m, _p, b in self.requests if m == "POST"]


@pytest.fixture(scope="session")
def sink() -> Iterator[Sink]:
    s = Sink()
    yield s
    s.server.shutdown()
