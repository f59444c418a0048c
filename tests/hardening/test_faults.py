"""Faults: webhook sinks that are slow, fail, or never answer (retries, then give up; the server stays
healthy), and a client that goes away mid-job (the job completes and stays retrievable)."""

from __future__ import annotations

import json
import threading
import time
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer

import pytest
from hardening_helpers import data_uri, png_bytes, rw_upscale


class FaultySink:
    """A loopback webhook receiver: ``mode`` is ``slow`` (answers 200 after ``delay``), ``fail`` (500) or
    ``hang`` (accepts, reads, never answers)."""

    def __init__(self, mode: str, delay: float = 0.0):
        self.mode, self.delay = mode, delay
        self.hits: list[bytes] = []
        self.release = threading.Event()
        sink = self

        class Handler(BaseHTTPRequestHandler):
            def do_POST(self):
                body = self.rfile.read(int(self.headers.get("content-length") or 0))
                sink.hits.append(body)
                if sink.mode == "hang":
                    sink.release.wait(30)
                    return
                time.sleep(sink.delay)
                self.send_response(500 if sink.mode == "fail" else 200)
                self.send_header("content-length", "0")
                self.end_headers()

            def log_message(self, *a):
                pass

        self.srv = ThreadingHTTPServer(("127.0.0.1", 0), Handler)
        self.srv.daemon_threads = True
        threading.Thread(target=self.srv.serve_forever, daemon=True).start()

    @property
    def host(self) -> str:
        return f"127.0.0.1:{self.srv.server_address[1]}"

    def close(self) -> None:
        self.release.set()
        self.srv.shutdown()
        self.srv.server_close()


def _wait(pred, timeout=20.0):
    end = time.monotonic() + timeout
    while time.monotonic() < end:
        if v := pred():
            return v
        time.sleep(0.05)
    raise AssertionError("condition not met in time")


@pytest.mark.parametrize(
    "mode,timeout,attempts,ok",
    [("slow", 3.0, 1, True), ("fail", 3.0, 3, False), ("hang", 0.5, 3, False)],
)
def test_webhook_sink_faults(make_client, mode, timeout, attempts, ok):
    """slow: delivered once, late; 500: retried, then given up; no answer: each attempt times out, given up."""
    sink = FaultySink(mode, delay=1.0 if mode == "slow" else 0.0)
    try:
        c = make_client(fetch_allow_hosts=[sink.host], webhook_timeout=timeout, webhook_attempts=3)
        delivery = c.app.state.engine.delivery
        delivery.base_delay = 0.05
        task = rw_upscale(data_uri(png_bytes()), webhookURL=f"http://{sink.host}/hook")
        assert c.post("/v1", json=[task]).status_code == 200
        record = _wait(lambda: next((h for h in delivery.history if h["url"].endswith("/hook")), None))
        assert record["ok"] is ok and record["attempts"] == attempts, record
        assert len(sink.hits) == attempts
        assert json.loads(sink.hits[0])["data"][0]["taskUUID"] == task["taskUUID"]
        # the server stayed healthy throughout and still runs jobs
        assert c.get("/healthz").status_code == 200
        other = rw_upscale(data_uri(png_bytes()), deliveryMethod="sync")
        r = c.post("/v1", json=[other])
        assert r.status_code == 200 and r.json()["data"][0]["imageURL"]
    finally:
        sink.close()


def test_never_answering_sink_does_not_block_jobs(make_client):
    """While every delivery thread hangs on the sink, jobs and polls go on."""
    sink = FaultySink("hang")
    try:
        c = make_client(fetch_allow_hosts=[sink.host], webhook_timeout=5.0, webhook_attempts=1)
        for _ in range(5):  # more hung deliveries than delivery threads
            c.post("/v1", json=[rw_upscale(data_uri(png_bytes()), webhookURL=f"http://{sink.host}/h")])
        _wait(lambda: len(sink.hits) >= 4)
        r = c.post("/v1", json=[rw_upscale(data_uri(png_bytes()), deliveryMethod="sync")])
        assert r.status_code == 200 and r.json()["data"][0]["imageURL"]
    finally:
        sink.close()


def test_websocket_client_disconnects_mid_job(make_client, runner):
    c = make_client()
    runner.gate.clear()
    task = rw_upscale(data_uri(png_bytes()), deliveryMethod="sync")
    with c.websocket_connect("/v1") as ws:
        ws.send_text(json.dumps([{"taskType": "authentication", "apiKey": "k"}]))
        json.loads(ws.receive_text())
        ws.send_text(json.dumps([task]))
        assert runner.started.wait(10)
    runner.gate.set()  # the socket is gone; the job finishes anyway

    def done():
        body = c.post("/v1", json=[{"taskType": "getResponse", "taskUUID": task["taskUUID"]}]).json()
        return body if body["data"][0].get("status") == "success" else None

    item = _wait(done)["data"][0]
    assert c.get(item["imageURL"].split("testserver", 1)[1]).status_code == 200
