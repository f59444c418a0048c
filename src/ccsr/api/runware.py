"""The Runware task API over REST (``POST /v1``, ``/``) and WebSocket (``/v1``, ``/``): a thin adapter that reads
tasks with :mod:`ccsr.api.runware_schema`, takes images and submits through :mod:`ccsr.api.intake`, and answers
in the wire shape. Job state is global, keyed by ``taskUUID``, and survives reconnects and restarts; an
identical retry of a ``taskUUID`` gets the same job, a different payload gets ``conflictTaskUUID``.
"""

from __future__ import annotations

import asyncio
import json
import logging
import time
import uuid
from dataclasses import dataclass
from typing import Any

from fastapi import APIRouter, Request, WebSocket, WebSocketDisconnect
from fastapi.responses import JSONResponse

from ccsr.jobs import (
    Job,
    JobConflict,
    JobEngine,
    JobSpec,
    QueueFull,
    StoredImage,
    payload_hash,
)
from ccsr.params import ParamError

from .app import get_engine, get_settings, image_url, public_base
from .auth import Denied, Principal
from .intake import (
    RETRY_AFTER_S,
    UNAVAILABLE,
    ImageIntake,
    IntakeError,
    admit,
    authenticate,
    check_outbound,
    image_intake,
    load_json_async,
    request_json,
    request_key,
    submit,
)
from .jobs_view import UPLOAD, WEBHOOK, announce_ends, follow, last
from .runware_schema import (
    OPENAPI,
    PARAM_TO_FIELD,
    UPSCALE_TYPES,
    Reply,
    RWError,
    denied_error,
    parse_upscale,
    result_reply,
    task_ident,
    task_list,
)
from .settings import Settings

log = logging.getLogger("ccsr.api.runware")

router = APIRouter(tags=["runware"])

PROTOCOL = "runware"


@dataclass
class Ctx:
    engine: JobEngine
    settings: Settings
    base: str  # public base URL for image links
    principal: Principal | None = None  # the admitted caller (a WebSocket's, once authenticated)
    images: ImageIntake | None = None  # the request's image references (None when only replying)


# ------------------------------------------------------------------------------------------- inputs


IMAGE_CODES = {"image_url_refused": "invalidInputImageURL", "image_fetch": "downloadFailed"}


async def resolve_image(ref: Any, ctx: Ctx, parameter: str) -> StoredImage:
    """A Runware image reference (image UUID, URL, data URI or bare base64) as a stored image."""
    assert ctx.images is not None
    try:
        return await ctx.images.resolve(ref, parameter)
    except IntakeError as e:
        if e.kind == "unavailable":
            raise RWError("serviceUnavailable", e.message, status=503) from None
        raise RWError(IMAGE_CODES.get(e.kind, "invalidInputImage"), e.message, parameter=parameter) from None


# ------------------------------------------------------------------------------------------- tasks


async def handle_task(task: Any, ctx: Ctx, on_ack=None) -> Reply:
    """Run one non-authentication task to its reply (sync upscales wait for their job).

    ``on_ack(frame)``: WebSocket only; with a ``webhookURL`` a sync upscale is ACKed through it as soon as
    the job is queued (the legacy SDK takes the first frame as the webhook ACK), and the result follows.
    """
    if not isinstance(task, dict):
        return Reply(errors=[(RWError("invalidRequestBody", "each task must be a JSON object").entry(None, None), 400)])
    tt, tu = task_ident(task)
    try:
        if tt is None:
            raise RWError("missingTaskType", "taskType is required", parameter="taskType")
        if tt == "ping":
            return Reply(data=[{"taskType": "ping", "pong": True}])
        if tu is None or not tu.strip():
            raise RWError("missingTaskUUID", "taskUUID is required (a UUID v4)", parameter="taskUUID")
        if tt == "imageUpload":
            return await _image_upload(task, ctx, tt, tu)
        if tt == "mediaStorage":
            return await _media_storage(task, ctx, tt, tu)
        if tt in UPSCALE_TYPES:
            return await _upscale(task, ctx, tt, tu, on_ack)
        if tt == "getResponse":
            return _get_response(ctx, tu)
        raise RWError(
            "unsupportedTaskType",
            f"taskType {tt!r} is not supported by this server (supported: imageUpload, mediaStorage, upscale,"
            " imageUpscale, getResponse, ping, authentication)",
            parameter="taskType",
        )
    except RWError as e:
        return Reply(errors=[(e.entry(tt, tu), e.status)])
    except ctx.engine.outages:
        log.warning("task %s: the job store is unreachable", tu, exc_info=True)
        return Reply(errors=[(RWError("serviceUnavailable", UNAVAILABLE, status=503).entry(tt, tu), 503)])
    except Exception:  # never let one task take the connection down; internals stay in the log
        log.exception("task %s failed", tu)
        err = RWError("internalServerError", "internal error; the server log has the details", status=500)
        return Reply(errors=[(err.entry(tt, tu), 500)])


async def _image_upload(task: dict, ctx: Ctx, tt: str, tu: str) -> Reply:
    if task.get("image") is None:
        raise RWError("missingImage", "image is required", parameter="image")
    rec = await resolve_image(task["image"], ctx, "image")
    url = image_url(ctx.base, rec.id, rec.extension)
    return Reply(data=[{"taskType": tt, "taskUUID": tu, "imageUUID": rec.id, "imageURL": url}])


async def _media_storage(task: dict, ctx: Ctx, tt: str, tu: str) -> Reply:
    if (op := task.get("operation", "upload")) != "upload":
        raise RWError("unsupportedOperation", f"mediaStorage operation {op!r} is not supported", parameter="operation")
    if task.get("media") is None:
        raise RWError("missingMedia", "media is required", parameter="media")
    rec = await resolve_image(task["media"], ctx, "media")
    url = image_url(ctx.base, rec.id, rec.extension)
    return Reply(data=[{"taskType": tt, "taskUUID": tu, "operation": "upload", "mediaUUID": rec.id, "mediaURL": url}])


async def _upscale(task: dict, ctx: Ctx, tt: str, tu: str, on_ack=None) -> Reply:
    key = f"{PROTOCOL}:{tu}"
    # an identical retry is answered from the existing job before anything else is done
    body_hash = payload_hash({k: v for k, v in task.items() if k != "deliveryMethod"})
    existing = ctx.engine.get_by_key(key)
    if existing is not None:
        if existing.payload_hash != body_hash:
            raise RWError("conflictTaskUUID", f"taskUUID {tu} was used for a different task", parameter="taskUUID")
        return await _deliver(existing, ctx, task.get("deliveryMethod", "sync"), fresh=False, on_ack=on_ack)

    req = parse_upscale(task, ctx.settings)
    for name, url in (("webhookURL", req.webhook), ("uploadEndpoint", req.upload_endpoint)):
        try:
            check_outbound(url, ctx.settings, name)
        except IntakeError as e:
            raise RWError(f"invalid{name[0].upper()}{name[1:]}", e.message, parameter=name) from None
    image_id = (await resolve_image(req.image_ref, ctx, req.image_param)).id
    cap = ctx.settings.max_output_side
    spec = JobSpec(
        params=req.params,
        input_image_id=image_id,
        output=req.output,
        max_output=(cap, cap) if cap else None,
        protocol=PROTOCOL,
        meta={
            "taskType": tt,
            "taskUUID": tu,
            "outputType": req.output_type,
            "includeCost": req.include_cost,
            WEBHOOK: req.webhook,
            UPLOAD: req.upload_endpoint,
            "base": ctx.base,
        },
        idempotency_key=key,
        payload_hash=body_hash,
        cost_per_second=ctx.settings.price_per_second,
        model=req.model.name,
    )
    try:
        job, created = await submit(ctx.engine, spec, ctx.principal)
    except QueueFull as e:  # the queue, or the caller's quota
        raise RWError("rateLimitExceeded", str(e), status=429) from e
    except JobConflict as e:
        raise RWError("conflictTaskUUID", str(e), parameter="taskUUID") from e
    except ParamError as e:
        raise RWError("invalidParameters", str(e), parameter=PARAM_TO_FIELD.get(e.field, e.field)) from e
    return await _deliver(job, ctx, req.delivery, fresh=created, on_ack=on_ack)


async def _deliver(job: Job, ctx: Ctx, delivery: str, *, fresh: bool, on_ack=None) -> Reply:
    meta = job.meta
    ack = {"taskType": meta["taskType"], "taskUUID": meta["taskUUID"]}
    if delivery == "async":
        return Reply(data=[ack])
    if meta.get(WEBHOOK) and on_ack is not None:
        await on_ack({"data": [ack]})
    try:  # the job runs on past the wait: the result stays pollable
        done = await last(follow(ctx.engine, job.id, timeout=ctx.settings.sync_timeout, cancel=False))
    except IntakeError:
        msg = f"the task did not finish within {ctx.settings.sync_timeout:.0f}s; poll getResponse with this taskUUID"
        return Reply(errors=[(RWError("processingTimeout", msg).entry(meta["taskType"], meta["taskUUID"]), 504)])
    return result_reply(done, ctx.engine.images.read, ctx.base, with_status=False)


def _get_response(ctx: Ctx, tu: str) -> Reply:
    job = ctx.engine.get_by_key(f"{PROTOCOL}:{tu}")
    if job is None:
        raise RWError("taskNotFound", f"no task with taskUUID {tu}", parameter="taskUUID", status=404)
    reply = result_reply(job, ctx.engine.images.read, ctx.base, with_status=True)
    # a failed job's poll is a 400 (protocols.md E), never a retried 5xx
    reply.errors = [(e, 400 if s >= 500 else s) for e, s in reply.errors]
    return reply


# ------------------------------------------------------------------------------------------- delivery


def setup(app, engine: JobEngine, settings: Settings) -> None:
    """The session table, and the webhook / uploadEndpoint deliveries of finished tasks."""
    app.state.runware_sessions = Sessions()
    announce_ends(engine, PROTOCOL,
                  lambda job: result_reply(job, engine.images.read, job.meta.get("base", ""), with_status=True).frame())


# ------------------------------------------------------------------------------------------- REST


def _ctx(conn) -> Ctx:
    return Ctx(get_engine(conn), get_settings(conn), public_base(conn), images=image_intake(conn))


@router.post("/v1", summary="Runware task API (REST)", openapi_extra=OPENAPI)
@router.post("/", include_in_schema=False)
async def rest(request: Request) -> JSONResponse:
    """A JSON array of tasks (``imageUpload``, ``mediaStorage``, ``upscale``, ``imageUpscale``,
    ``getResponse``, ``ping``); ``Authorization: Bearer <key>`` or a leading ``authentication`` task. The same
    tasks run over the WebSocket at ``/v1`` (and ``/``)."""
    settings = get_settings(request)
    try:
        body = task_list(await request_json(request), settings.max_tasks)
    except IntakeError as e:
        return JSONResponse({"errors": [{"code": "invalidRequestBody", "message": e.message}]}, 400)
    except RWError as e:
        return JSONResponse({"errors": [e.entry(None, None)]}, 400)
    key = request_key(request)
    auth_items: list[dict] = []
    if isinstance(body[0], dict) and body[0].get("taskType") == "authentication":
        first = body.pop(0)
        key = first.get("apiKey") or key
        auth_items.append({"taskType": "authentication", "connectionSessionUUID": str(uuid.uuid4())})
    try:
        who = admit(request, key if isinstance(key, str) else None)
    except Denied as e:
        return JSONResponse({"errors": [denied_error(e)]}, status_code=e.status, headers=e.headers())
    ctx = _ctx(request)
    ctx.principal = who
    replies = await asyncio.gather(*(handle_task(t, ctx) for t in body))
    data = auth_items + [d for r in replies for d in r.data]
    errors = [e for r in replies for e in r.errors]
    if errors:
        out: dict[str, Any] = {"errors": [e for e, _ in errors]}
        if data:
            out["data"] = data
        status = errors[0][1]
        retry = {429: "1", 503: str(RETRY_AFTER_S)}.get(status)
        return JSONResponse(out, status_code=status, headers={"Retry-After": retry} if retry else None)
    return JSONResponse({"data": data})


# ------------------------------------------------------------------------------------------- WebSocket


class Sessions:
    """connectionSessionUUID -> frames a dropped socket could not receive (sync results), for a while."""

    TTL = 600.0

    def __init__(self):
        self._outbox: dict[str, tuple[float, list[dict]]] = {}

    def known(self, sid: str | None) -> bool:
        self._gc()
        return bool(sid) and sid in self._outbox

    def open(self, sid: str) -> None:
        self._outbox.setdefault(sid, (time.monotonic(), []))

    def stash(self, sid: str, frame: dict) -> None:
        _, frames = self._outbox.setdefault(sid, (time.monotonic(), []))
        frames.append(frame)
        self._outbox[sid] = (time.monotonic(), frames[-100:])

    def drain(self, sid: str) -> list[dict]:
        _, frames = self._outbox.get(sid, (0.0, []))
        self._outbox[sid] = (time.monotonic(), [])
        return frames

    def touch(self, sid: str) -> None:
        _, frames = self._outbox.get(sid, (0.0, []))
        self._outbox[sid] = (time.monotonic(), frames)

    def _gc(self) -> None:
        now = time.monotonic()
        for sid in [s for s, (t, _) in self._outbox.items() if now - t > self.TTL]:
            self._outbox.pop(sid, None)


class _Conn:
    def __init__(self, ws: WebSocket):
        self.ws = ws
        self.lock = asyncio.Lock()
        self.open = True
        self.session: str | None = None

    async def send(self, frame: dict) -> bool:
        if not self.open:
            return False
        try:
            async with self.lock:
                await self.ws.send_text(json.dumps(frame))
            return True
        except Exception:
            self.open = False
            return False


@router.websocket("/v1")
@router.websocket("/")
async def websocket(ws: WebSocket) -> None:
    await ws.accept()
    settings = get_settings(ws)
    sessions: Sessions = ws.app.state.runware_sessions
    conn = _Conn(ws)
    ctx = _ctx(ws)
    pending: set[asyncio.Task] = set()
    session_key: str | None = None  # the authentication task's key, checked again for every task

    async def run(task: dict) -> None:
        reply = await handle_task(task, ctx, on_ack=conn.send)
        frame = reply.frame()
        if not await conn.send(frame) and conn.session and task.get("taskType") in UPSCALE_TYPES:
            sessions.stash(conn.session, frame)  # a sync result the client may come back for

    def frame_error(code: str, message: str) -> dict:
        return {"errors": [{"code": code, "message": message}]}

    try:
        while True:
            try:
                msg = await asyncio.wait_for(ws.receive(), settings.ws_idle_timeout)
            except asyncio.TimeoutError:
                if pending:
                    continue  # the client waits for a sync result: not idle
                await conn.send(frame_error("connectionTimeout", f"no frame for {settings.ws_idle_timeout:g}s"))
                await ws.close(1000)
                break
            if msg["type"] == "websocket.disconnect":
                break
            raw = msg.get("text")
            if raw is None:
                await conn.send(frame_error("invalidRequestBody", "binary frames are not accepted: send JSON text"))
                continue
            if len(raw) > settings.frame_limit():
                await conn.send(frame_error("invalidRequestSize", f"frame over {settings.frame_limit()} bytes"))
                await ws.close(1009)
                break
            try:
                tasks = task_list(await load_json_async(raw, max_depth=settings.max_json_depth), settings.max_tasks)
            except IntakeError as e:
                await conn.send(frame_error("invalidRequestBody", e.message))
                continue
            except RWError as e:
                await conn.send({"errors": [e.entry(None, None)]})
                continue
            for task in tasks:
                if not isinstance(task, dict):
                    await conn.send(frame_error("invalidRequestBody", "each task must be a JSON object"))
                    continue
                tt, tu = task_ident(task)
                if tt == "authentication":
                    key = task.get("apiKey")
                    session_key = key if isinstance(key, str) else None
                    try:  # once per session, as Runware does; each task is then admitted below
                        ctx.principal = authenticate(ws, session_key)
                    except Denied as e:
                        ctx.principal = None
                        await conn.send({"errors": [denied_error(e)]})
                        continue
                    sid = task.get("connectionSessionUUID")
                    resumed = isinstance(sid, str) and sessions.known(sid)
                    if resumed:
                        log.info("websocket session %s resumed", sid)
                    else:
                        sid = str(uuid.uuid4())
                    sessions.open(sid)
                    conn.session = sid
                    await conn.send({"data": [{"taskType": "authentication", "connectionSessionUUID": sid}]})
                    if resumed:
                        for frame in sessions.drain(sid):
                            await conn.send(frame)
                    continue
                if tt == "ping":
                    await conn.send({"data": [{"taskType": "ping", "pong": True}]})
                    continue
                if ctx.principal is None:
                    err = {
                        "code": "missingApiKey",
                        "message": "authenticate first: send an authentication task",
                        "parameter": "apiKey",
                        "taskType": tt or "authentication",
                    }
                    if tu:
                        err["taskUUID"] = tu
                    await conn.send({"errors": [err]})
                    continue
                try:  # the session's key checked again (a key revoked since stops here), then the rate limit
                    ctx.principal = admit(ws, session_key)  # that REST and fal requests of the same caller draw on
                except Denied as e:
                    await conn.send({"errors": [denied_error(e) | {"taskType": tt or "", "taskUUID": tu or ""}]})
                    continue
                if conn.session:
                    sessions.touch(conn.session)
                t = asyncio.create_task(run(task))
                pending.add(t)
                t.add_done_callback(pending.discard)
    except (WebSocketDisconnect, RuntimeError):
        pass
    finally:
        conn.open = False
        # running tasks finish on their own: jobs live on in the engine, results go to the session outbox
