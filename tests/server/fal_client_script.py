"""Drive the real, unmodified ``fal_client`` against our server; run as a subprocess by test_fal*.py.

The client is redirected only by environment variables, which it reads when imported (protocols.md B.2):
``FAL_KEY``, ``FAL_RUN_HOST=127.0.0.1:PORT``, ``FAL_QUEUE_RUN_HOST=127.0.0.1:PORT/queue`` and
``SSL_CERT_FILE=<our self-signed cert>``. Nothing in here patches the client.

Usage: ``python fal_client_script.py SCENARIO '<json args>'`` (``app`` in the args: the app id, default
fal-ai/ccsr); prints one JSON object on the last stdout line.
"""

from __future__ import annotations

import asyncio
import json
import sys
import time
from pathlib import Path

import fal_client

APP = "fal-ai/ccsr"


def _status(s) -> dict:
    d = {"type": type(s).__name__}
    if isinstance(s, fal_client.Queued):
        d["position"] = s.position
    if isinstance(s, fal_client.InProgress | fal_client.Completed):
        d["logs"] = s.logs
    if isinstance(s, fal_client.Completed):
        d["metrics"] = s.metrics
        d["error"] = s.error
        d["error_type"] = s.error_type
    return d


def _http_error(e: fal_client.FalClientHTTPError) -> dict:
    return {
        "error": "FalClientHTTPError",
        "status_code": e.status_code,
        "message": e.message,
        "error_type": e.error_type,
        "headers": {k.lower(): v for k, v in e.response_headers.items()},
    }


def run(a):
    return {"result": fal_client.run(a.get("app", APP), arguments=a["arguments"], path=a.get("path", ""))}


def run_error(a):
    try:
        out = fal_client.run(a.get("app", APP), arguments=a["arguments"])
    except fal_client.FalClientHTTPError as e:
        return _http_error(e)
    return {"unexpected_result": out}


def submit_flow(a):
    """submit -> status(with_logs=True) polled until Completed -> get() and result(app, id)."""
    app = a.get("app", APP)
    h = fal_client.submit(app, arguments=a["arguments"], path=a.get("path", ""))
    statuses = []
    while True:
        s = h.status(with_logs=True)
        statuses.append(_status(s))
        if isinstance(s, fal_client.Completed):
            break
        time.sleep(0.05)
    got = h.get()
    again = fal_client.result(app, h.request_id)
    st = fal_client.status(app, h.request_id, with_logs=True)
    return {
        "request_id": h.request_id,
        "urls": [h.status_url, h.response_url, h.cancel_url],
        "statuses": statuses,
        "get": got,
        "result": again,
        "final_status": _status(st),
    }


def subscribe(a):
    """With ``blocker``: a first request keeps the worker busy, so the subscription starts IN_QUEUE."""
    blocker = fal_client.submit(APP, arguments=a["blocker"]) if a.get("blocker") else None
    updates, enq = [], []
    out = fal_client.subscribe(
        APP,
        arguments=a["arguments"],
        with_logs=True,
        on_enqueue=enq.append,
        on_queue_update=lambda u: updates.append(_status(u)),
    )
    return {"result": out, "updates": updates, "enqueued": enq, "blocker": blocker.get() if blocker else None}


def subscribe_error(a):
    try:
        out = fal_client.subscribe(APP, arguments=a["arguments"], with_logs=True)
    except fal_client.FalClientHTTPError as e:
        return _http_error(e)
    return {"unexpected_result": out}


def cancel_queued(a):
    """A blocker keeps the worker busy; a second request is cancelled while it waits in the queue."""
    blocker = fal_client.submit(APP, arguments=a["blocker"])
    victim = fal_client.submit(APP, arguments=a["arguments"], path="any/subpath")
    before = _status(fal_client.status(APP, victim.request_id))
    fal_client.cancel(APP, victim.request_id)  # built client-side: sub-path dropped (protocols.md B.1)
    after = _status(victim.status(with_logs=True))
    try:
        victim.get()
        victim_result = {"unexpected": True}
    except fal_client.FalClientHTTPError as e:
        victim_result = _http_error(e)
    # The blocker still completes; then a cancel of a finished request is refused (non-2xx raises).
    blocker_out = blocker.get()
    try:
        blocker.cancel()
        late = {"unexpected": True}
    except fal_client.FalClientHTTPError as e:
        late = _http_error(e)
    return {
        "before": before,
        "after": after,
        "victim_result": victim_result,
        "blocker": blocker_out,
        "late_cancel": late,
        "victim_id": victim.request_id,
    }


def cancel_running(a):
    h = fal_client.submit(APP, arguments=a["arguments"])
    deadline = time.time() + 60
    seen = []
    while time.time() < deadline:
        s = h.status(with_logs=True)
        seen.append(type(s).__name__)
        if isinstance(s, fal_client.InProgress):
            time.sleep(0.5)  # let the sampler get going: the cancel must stop it between evaluations
            break
        if isinstance(s, fal_client.Completed):
            break
        time.sleep(0.02)
    h.cancel()
    while True:
        s = h.status(with_logs=True)
        if isinstance(s, fal_client.Completed):
            break
        time.sleep(0.02)
    try:
        h.get()
        res = {"unexpected": True}
    except fal_client.FalClientHTTPError as e:
        res = _http_error(e)
    return {"seen": seen, "final": _status(s), "result": res}


def webhook(a):
    h = fal_client.submit(APP, arguments=a["arguments"], webhook_url=a["webhook_url"])
    return {"request_id": h.request_id, "result": h.get()}


def stream(a):
    """fal_client.stream: every event, the last one the output."""
    return {"events": list(fal_client.stream(a.get("app", APP), arguments=a["arguments"]))}


def stream_error(a):
    """A refused stream: fal answers JSON, not events, and the client's SSE reader says so."""
    try:
        events = list(fal_client.stream(APP, arguments=a["arguments"]))
    except Exception as e:  # httpx_sse.SSEError, whatever its module
        return {"error": type(e).__name__, "message": str(e)}
    return {"unexpected_events": events}


def stream_disconnect(a):
    """Read the stream until the job runs, then go away; the status (polled by id) says what became of it."""
    events = fal_client.stream(APP, arguments=a["arguments"])
    seen = [next(events)]
    while seen[-1]["status"] != "IN_PROGRESS":
        seen.append(next(events))
    events.close()  # the connection is closed mid-run
    rid = seen[-1]["request_id"]
    deadline = time.time() + 60
    while not isinstance(s := fal_client.status(APP, rid, with_logs=True), fal_client.Completed):
        assert time.time() < deadline, "the job was still running a minute after its client went away"
        time.sleep(0.1)
    return {"seen": seen, "final": _status(s)}


def upload(a):
    """Uploads need fal_client's two storage URL constants pointed at us: no environment variable sets them
    (protocols.md B.3). The one scenario that touches the client module, and only these constants.
    """
    import fal_client.client as fc

    fc.REST_URL = fc.CDN_URL = a["base"]
    path = a["path"]
    out = {
        "v3": fal_client.upload_file(path),  # token + POST /files/upload
        "gcs": fal_client.upload_file(path, repository="fal", fallback_repository=[]),  # initiate + PUT
        "image": fal_client.upload(Path(path).read_bytes(), "image/png", repository="fal_v3"),
    }
    out["run"] = fal_client.run(APP, arguments={**a["arguments"], "image_url": out["v3"]})
    out["run_gcs"] = fal_client.run(APP, arguments={**a["arguments"], "image_url": out["gcs"]})
    return out


async def _async_all(a):
    args = a["arguments"]
    out = {"run": await fal_client.run_async(APP, arguments=args)}
    h = await fal_client.submit_async(APP, arguments=args)
    st = await h.status(with_logs=True)
    out["first_status"] = _status(st)
    out["get"] = await h.get()
    out["result"] = await fal_client.result_async(APP, h.request_id)
    out["status"] = _status(await fal_client.status_async(APP, h.request_id, with_logs=True))
    updates = []
    out["subscribe"] = await fal_client.subscribe_async(
        APP, arguments=args, with_logs=True, on_queue_update=lambda u: updates.append(_status(u))
    )
    out["updates"] = updates
    try:
        await fal_client.run_async(APP, arguments={"scale": 2})
        out["error"] = {"unexpected": True}
    except fal_client.FalClientHTTPError as e:
        out["error"] = _http_error(e)
    blocker = await fal_client.submit_async(APP, arguments=a["blocker"])
    victim = await fal_client.submit_async(APP, arguments=args)
    await fal_client.cancel_async(APP, victim.request_id)
    out["cancelled"] = _status(await victim.status(with_logs=False))
    await blocker.get()
    return out


def async_all(a):
    return asyncio.run(_async_all(a))


def main() -> None:
    scenario = sys.argv[1]
    args = json.loads(sys.argv[2]) if len(sys.argv) > 2 else {}
    out = globals()[scenario](args)
    sys.stdout.write("\n" + json.dumps(out) + "\n")


if __name__ == "__main__":
    main()
