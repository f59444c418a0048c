"""The web playground at ``/``: one static page (``static/``) that drives the server's own public APIs.

The page uploads with the Runware ``imageUpload`` task, upscales through the fal queue API (or the Runware task
API when prompts, CFG or the ControlNet weight are set, which only Runware accepts) and downloads from
``/images``. What the public protocols lack, this router adds under ``/playground/``:

- ``GET /playground/config``: the fal input schema (defaults and ranges), Runware's extra settings, limits.
- ``GET /playground/events/{request_id}``: Server-Sent Events with status, percent, queue position and ETA of
  a fal ``request_id`` or a Runware ``taskUUID``, so the page needs no status polling of its own.
- ``POST /playground/cancel/{request_id}``: cancel for Runware tasks (its protocol has no cancel task).

Auth follows the server's key policy (``Authorization: Bearer|Key <key>``; loopback only without keys).
"""

from __future__ import annotations

import json
import time
from collections.abc import AsyncIterator
from pathlib import Path

from fastapi import APIRouter, Request
from fastapi.concurrency import run_in_threadpool
from fastapi.responses import FileResponse, JSONResponse, Response, StreamingResponse

from ccsr.jobs import PROCESSING, QUEUED, SUCCESS, Job, JobEngine
from ccsr.params import UpscaleParams

from .app import client_host, get_engine, get_settings
from .auth import Denied
from .fal_schema import CCSRInput

__all__ = ["router"]

STATIC_DIR = Path(__file__).with_name("static")
STATIC_TYPES = {
    "app.js": "text/javascript; charset=utf-8",
    "style.css": "text/css; charset=utf-8",
}
POLL_SECONDS = 0.2  # how often a stream looks at a running job (the engine only signals terminal states)
KEEPALIVE_SECONDS = 15.0  # a comment line so proxies do not close an idle stream

router = APIRouter(include_in_schema=False)


def _denied(request: Request) -> JSONResponse | None:
    """The server's key policy and the key's rate limit: None when admitted, else the 401/429 answer."""
    scheme, _, key = (request.headers.get("authorization") or "").partition(" ")
    key = key.strip() if scheme.lower() in ("key", "bearer") else ""
    try:
        get_settings(request).admit(key or None, client_host(request))
    except Denied as e:
        detail = "invalid or missing API key (Authorization: Bearer <key>)" if e.status == 401 else e.message
        return JSONResponse({"detail": detail}, e.status, headers=e.headers())
    return None


def _find_job(engine: JobEngine, request_id: str) -> Job | None:
    """A fal ``request_id`` is the job id; a Runware ``taskUUID`` is its idempotency key."""
    return engine.get(request_id) or engine.get_by_key(f"runware:{request_id}")


# ------------------------------------------------------------------------------------------ page


@router.get("/")
async def index() -> FileResponse:
    return FileResponse(
        STATIC_DIR / "index.html", media_type="text/html; charset=utf-8", headers={"Cache-Control": "no-cache"}
    )


@router.get("/playground/static/{name}")
async def static_file(name: str) -> Response:
    media_type = STATIC_TYPES.get(name)
    if media_type is None:
        return JSONResponse({"detail": "not found"}, 404)
    return FileResponse(STATIC_DIR / name, media_type=media_type, headers={"Cache-Control": "no-cache"})


@router.get("/playground/config")
async def config(request: Request) -> dict:
    """Everything the page needs to build its form; the fal schema is the single source of its ranges."""
    settings = get_settings(request)
    engine = get_engine(request)
    core = UpscaleParams()
    return {
        "fal": {"app_id": "fal-ai/ccsr", "schema": CCSRInput.model_json_schema()},
        "runware": {
            "model": "runware:501@1",
            "scale": {"minimum": 2, "maximum": 4},
            # ranges as ccsr.api.runware.parse_upscale checks them; defaults are the core's
            "settings": {
                "positivePrompt": {
                    "title": "Prompt",
                    "description": "What the restored image should show.",
                    "type": "text",
                    "default": core.prompt,
                    "maxLength": 3000,
                },
                "negativePrompt": {
                    "title": "Negative prompt",
                    "description": "What to steer away from (needs CFG scale above 1).",
                    "type": "text",
                    "default": core.negative_prompt,
                    "maxLength": 3000,
                },
                "CFGScale": {
                    "title": "CFG scale",
                    "description": "How strongly the prompts guide the result; 1 turns guidance off.",
                    "type": "number",
                    "default": core.cfg_scale,
                    "minimum": 0,
                    "maximum": 30,
                },
                "controlNetWeight": {
                    "title": "ControlNet weight",
                    "description": "How closely the result follows the input image.",
                    "type": "number",
                    "default": core.controlnet_weight,
                    "minimum": 0,
                    "maximum": 2,
                },
            },
        },
        "limits": {"max_input_bytes": settings.max_input_bytes, "max_output_side": settings.max_output_side},
        "keys_required": settings.keys_required(),
        "ready": engine.ready,
        "load_error": engine.load_error,
    }


# ------------------------------------------------------------------------------------------ progress


def snapshot(job: Job, engine: JobEngine, now: float | None = None) -> dict:
    """What the page shows of a job: status, percent, queue position, elapsed and remaining seconds."""
    now = time.time() if now is None else now
    snap: dict = {"status": job.status, "progress": 100 if job.status == SUCCESS else int(job.progress)}
    if job.status == QUEUED:
        snap["queue_position"] = engine.queue_position(job.id)
    if job.started_at is not None:
        elapsed = (job.finished_at or now) - job.started_at
        snap["elapsed"] = round(max(0.0, elapsed), 1)
        if job.status == PROCESSING and job.progress > 0:
            snap["eta"] = round(elapsed * (100 - job.progress) / job.progress, 1)
    if job.logs:
        snap["message"] = job.logs[-1].message
    if job.error is not None:
        snap["error"] = {"code": job.error.code, "message": job.error.message}
    return snap


def _event(name: str, data: dict) -> str:
    return f"event: {name}\ndata: {json.dumps(data)}\n\n"


async def _events(request: Request, engine: JobEngine, job_id: str) -> AsyncIterator[str]:
    last: dict | None = None
    quiet_since = time.monotonic()
    while True:
        job = await run_in_threadpool(engine.get, job_id)
        if job is None:
            yield _event("gone", {"detail": "the request no longer exists"})
            return
        snap = await run_in_threadpool(snapshot, job, engine)
        # elapsed/eta change every tick; send when what the user reads changes
        key = {k: v for k, v in snap.items() if k not in ("elapsed", "eta")}
        if key != last:
            last = key
            quiet_since = time.monotonic()
            yield _event("done" if job.done else "progress", snap)
        elif time.monotonic() - quiet_since > KEEPALIVE_SECONDS:
            quiet_since = time.monotonic()
            yield ": keep-alive\n\n"
        if job.done or await request.is_disconnected():
            return
        await engine.wait(job_id, timeout=POLL_SECONDS, poll=POLL_SECONDS)


@router.get("/playground/events/{request_id}")
async def events(request: Request, request_id: str) -> Response:
    """``text/event-stream`` of ``progress`` events, then one ``done`` event (or ``gone``)."""
    if (denied := _denied(request)) is not None:
        return denied
    engine = get_engine(request)
    job = await run_in_threadpool(_find_job, engine, request_id)
    if job is None:
        return JSONResponse({"detail": "Request not found"}, 404)
    return StreamingResponse(
        _events(request, engine, job.id),
        media_type="text/event-stream",
        headers={"Cache-Control": "no-cache", "X-Accel-Buffering": "no"},
    )


@router.post("/playground/cancel/{request_id}")
async def cancel(request: Request, request_id: str) -> JSONResponse:
    if (denied := _denied(request)) is not None:
        return denied
    engine = get_engine(request)
    job = await run_in_threadpool(_find_job, engine, request_id)
    if job is None:
        return JSONResponse({"detail": "Request not found"}, 404)
    job = await run_in_threadpool(engine.cancel, job.id)
    return JSONResponse({"status": job.status, "cancel_requested": job.cancel_requested})
