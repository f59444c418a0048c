"""Prometheus metrics, JSON logs carrying the task id (in-process); graceful drain is in test_faults.py."""

from __future__ import annotations

import json
import logging
import time

from hardening_helpers import data_uri, png_bytes, rw_upscale

from ccsr.logs import JsonFormatter, task_id


def _wait_done(c, tu: str) -> dict:
    deadline = time.monotonic() + 10
    while time.monotonic() < deadline:
        r = c.post("/v1", json=[{"taskType": "getResponse", "taskUUID": tu}])
        body = r.json()
        if "errors" in body or body["data"][0].get("status") == "success":
            return body
        time.sleep(0.02)
    raise AssertionError("job did not finish")


def _metric(text: str, prefix: str) -> float:
    for line in text.splitlines():
        if line.startswith(prefix):
            return float(line.rsplit(" ", 1)[1])
    raise AssertionError(f"{prefix} not in metrics:\n{text}")


def test_metrics_exposition(make_client):
    c = make_client()
    task = rw_upscale(data_uri(png_bytes()))
    assert c.post("/v1", json=[task]).status_code == 200
    _wait_done(c, task["taskUUID"])
    bad = rw_upscale("not an image at all, just text")
    assert c.post("/v1", json=[bad]).status_code == 400
    time.sleep(0.05)  # the terminal listener runs right after the job is stored
    r = c.get("/metrics")
    assert r.status_code == 200 and r.headers["content-type"].startswith("text/plain")
    text = r.text
    assert _metric(text, "ccsr_queue_depth") == 0
    assert _metric(text, 'ccsr_jobs_total{protocol="runware",status="success"}') == 1
    assert _metric(text, 'ccsr_job_duration_seconds_count{protocol="runware",status="success"}') == 1
    assert _metric(text, "ccsr_model_step_seconds_count") == 1
    assert _metric(text, 'ccsr_http_errors_total{protocol="runware",status="400"}') == 1


def test_metrics_need_a_key_when_keys_are_set(make_client):
    c = make_client(api_keys=["k" * 24])
    assert c.get("/metrics").status_code == 401
    assert c.get("/metrics", headers={"Authorization": "Bearer " + "k" * 24}).status_code == 200


def test_job_errors_by_code(make_client, runner):
    c = make_client()
    runner.gate.clear()
    task = rw_upscale(data_uri(png_bytes()))
    c.post("/v1", json=[task])
    assert runner.started.wait(10)
    job = c.app.state.engine.get_by_key(f"runware:{task['taskUUID']}")
    c.app.state.engine.cancel(job.id)
    body = _wait_done(c, task["taskUUID"])
    assert body["errors"][0]["code"] == "taskCancelled"
    time.sleep(0.05)
    assert _metric(c.get("/metrics").text, 'ccsr_job_errors_total{code="cancelled"}') == 1


def test_json_logs_carry_the_task_id(make_client, caplog):
    c = make_client()
    task = rw_upscale(data_uri(png_bytes()))
    with caplog.at_level(logging.INFO, logger="ccsr.jobs"):
        c.post("/v1", json=[task])
        _wait_done(c, task["taskUUID"])
    fmt = JsonFormatter()
    started = [r for r in caplog.records if "started" in r.getMessage()]
    assert started, caplog.text
    line = json.loads(fmt.format(started[0]))
    assert line["task_id"] == task["taskUUID"] and line["level"] == "INFO" and "ts" in line
    token = task_id.set("abc")
    try:
        rec = logging.LogRecord("x", logging.WARNING, __file__, 1, "hello %s", ("w",), None)
        assert json.loads(fmt.format(rec)) | {"ts": 0} == {
            "ts": 0,
            "level": "WARNING",
            "logger": "x",
            "msg": "hello w",
            "task_id": "abc",
        }
    finally:
        task_id.reset(token)
