"""The Runware task API over REST (``POST /v1``, ``/``) and WebSocket (``/v1``, ``/``), a thin jobs adapter.

Wire rules followed here (protocols.md A.6): client frames are JSON arrays of tasks, server frames are
``{"data": [...]}`` / ``{"errors": [...]}`` objects; the auth reply is ``data[0]`` with a
``connectionSessionUUID``; every item and error carries its ``taskUUID`` and the request's own ``taskType``;
an async ACK is exactly ``{taskType, taskUUID}``; processing items carry the pre-allocated ``imageUUID`` and
``progress`` but no output; job state is global, keyed by ``taskUUID``, and survives reconnects and restarts;
an identical retry of a ``taskUUID`` gets the same job, a different payload gets ``conflictTaskUUID``; error
codes come from the SDK's families (``invalid*``/``missing*``/``unsupported*`` validation, ``invalidApiKey``
auth, ``rateLimitExceeded``, ``*NotFound``/``*Expired``, ``inferenceError``/``processingFailed`` provider).
"""

from __future__ import annotations

import asyncio
import base64
import json
import logging
import math
import random
import time
import uuid
from dataclasses import dataclass, field
from typing import Any

from fastapi import APIRouter, Request, WebSocket, WebSocketDisconnect
from fastapi.responses import JSONResponse

from ccsr.jobs import (
    CANCELLED,
    ERROR,
    SUCCESS,
    ErrorCode,
    Job,
    JobConflict,
    JobEngine,
    JobSpec,
    OutputOptions,
    QueueFull,
    StoredImage,
    payload_hash,
)
from ccsr.params import ParamError, UpscaleParams

from .app import client_host, get_engine, get_settings, image_url, public_base
from .auth import Denied, Principal
from .intake import (
    RETRY_AFTER_S,
    UNAVAILABLE,
    ImageIntake,
    IntakeError,
    image_intake,
    load_json_async,
    request_json,
    submit,
)
from .settings import Settings

log = logging.getLogger("ccsr.api.runware")

router = APIRouter(tags=["runware"])

PROTOCOL = "runware"
CCSR_MODELS = frozenset({"runware:501@1", "ccsr"})
UPSCALE_TYPES = frozenset({"upscale", "imageUpscale"})
OUTPUT_TYPES = {"url": "URL", "base64data": "base64Data", "datauri": "dataURI"}
OUTPUT_FORMATS = {"JPG": "jpeg", "JPEG": "jpeg", "PNG": "png", "WEBP": "webp"}
SETTINGS_MAP = {
    "positivePrompt": "prompt",
    "negativePrompt": "negative_prompt",
    "seed": "seed",
    "steps": "steps",
    "CFGScale": "cfg_scale",
    "controlNetWeight": "controlnet_weight",
}
PARAM_TO_FIELD = {v: f"settings.{k}" for k, v in SETTINGS_MAP.items()} | {"scale": "upscaleFactor"}

ERROR_STATUS = {  # neutral job error code -> (Runware code, HTTP status)
    ErrorCode.INVALID_INPUT: ("invalidInputImage", 400),
    ErrorCode.INVALID_PARAMS: ("invalidParameters", 400),
    ErrorCode.INFERENCE_FAILED: ("inferenceError", 500),
    ErrorCode.INTERRUPTED: ("processingFailed", 500),
    ErrorCode.CANCELLED: ("taskCancelled", 400),
    ErrorCode.INPUT_MISSING: ("inputImageExpired", 400),
    ErrorCode.TIMEOUT: ("processingTimeout", 500),
    ErrorCode.INTERNAL: ("internalServerError", 500),
}


# ------------------------------------------------------------------------------------------- errors


class RWError(Exception):
    """One Runware error entry; ``status`` is the HTTP code REST answers with."""

    def __init__(self, code: str, message: str, *, parameter: str | None = None, status: int = 400):
        super().__init__(message)
        self.code = code
        self.message = message
        self.parameter = parameter
        self.status = status

    def entry(self, task_type: str | None, task_uuid: str | None) -> dict:
        d: dict[str, Any] = {"code": self.code, "message": self.message}
        if self.parameter:
            d["parameter"] = self.parameter
        if task_type:
            d["taskType"] = task_type
        if task_uuid:
            d["taskUUID"] = task_uuid
        return d


@dataclass
class Reply:
    """What one task produced: data items and/or error entries (each error with its HTTP status)."""

    data: list[dict] = field(default_factory=list)
    errors: list[tuple[dict, int]] = field(default_factory=list)

    def frame(self) -> dict:
        if self.errors:
            out: dict[str, Any] = {"errors": [e for e, _ in self.errors]}
            if self.data:
                out["data"] = self.data
            return out
        return {"data": self.data}


@dataclass
class Ctx:
    engine: JobEngine
    settings: Settings
    base: str  # public base URL for image links
    principal: Principal | None = None  # the caller, for per-key queue quotas
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


def _task_ident(task: dict) -> tuple[str | None, str | None]:
    tt = task.get("taskType") if isinstance(task.get("taskType"), str) else None
    tu = task.get("taskUUID") if isinstance(task.get("taskUUID"), str) else None
    return tt, tu


async def handle_task(task: Any, ctx: Ctx, on_ack=None) -> Reply:
    """Run one non-authentication task to its reply (sync upscales wait for their job).

    ``on_ack(frame)``: WebSocket only; with a ``webhookURL`` a sync upscale is ACKed through it as soon as
    the job is queued (the legacy SDK takes the first frame as the webhook ACK), and the result follows.
    """
    if not isinstance(task, dict):
        return Reply(errors=[(RWError("invalidRequestBody", "each task must be a JSON object").entry(None, None), 400)])
    tt, tu = _task_ident(task)
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
    ref = task.get("image")
    if ref is None:
        raise RWError("missingImage", "image is required", parameter="image")
    rec = await resolve_image(ref, ctx, "image")
    return Reply(
        data=[
            {
                "taskType": tt,
                "taskUUID": tu,
                "imageUUID": rec.id,
                "imageURL": image_url(ctx.base, rec.id, rec.extension),
            }
        ]
    )


async def _media_storage(task: dict, ctx: Ctx, tt: str, tu: str) -> Reply:
    op = task.get("operation", "upload")
    if op != "upload":
        raise RWError("unsupportedOperation", f"mediaStorage operation {op!r} is not supported", parameter="operation")
    ref = task.get("media")
    if ref is None:
        raise RWError("missingMedia", "media is required", parameter="media")
    rec = await resolve_image(ref, ctx, "media")
    return Reply(
        data=[
            {
                "taskType": tt,
                "taskUUID": tu,
                "operation": "upload",
                "mediaUUID": rec.id,
                "mediaURL": image_url(ctx.base, rec.id, rec.extension),
            }
        ]
    )


def _num(v: Any, name: str, code: str, *, integer: bool = False, lo=None, hi=None):
    # compared as it came: an integer is never converted before it is known to be in range
    ok = isinstance(v, (int, float)) and not isinstance(v, bool) and (isinstance(v, int) or math.isfinite(v))
    if ok and integer and isinstance(v, float):
        ok = v.is_integer()
        v = int(v) if ok else v
    if ok and lo is not None and v < lo:
        ok = False
    if ok and hi is not None and v > hi:
        ok = False
    if not ok:
        rng = f" in [{lo}, {hi}]" if lo is not None and hi is not None else (f" >= {lo}" if lo is not None else "")
        raise RWError(code, f"{name} must be {'an integer' if integer else 'a number'}{rng}", parameter=name)
    return v


@dataclass
class UpscaleRequest:
    image_ref: Any
    image_param: str
    params: UpscaleParams
    output_type: str
    output: OutputOptions
    include_cost: bool
    delivery: str
    webhook: str | None
    upload_endpoint: str | None


def parse_upscale(task: dict, settings: Settings) -> UpscaleRequest:
    """Validate an upscale / imageUpscale task (no I/O); raises RWError on the first bad field."""
    model = task.get("model")
    if model is not None and (not isinstance(model, str) or model not in CCSR_MODELS):
        raise RWError(
            "unsupportedModel",
            f"model {model!r} is not served here; use runware:501@1 (CCSR)",
            parameter="model",
        )
    inputs = task.get("inputs")
    if inputs is not None and not isinstance(inputs, dict):
        raise RWError("invalidInputs", "inputs must be an object", parameter="inputs")
    if inputs and inputs.get("image") is not None:
        ref, param = inputs.get("image"), "inputs.image"
    elif task.get("inputImage") is not None:
        ref, param = task.get("inputImage"), "inputImage"
    else:
        raise RWError("missingInputImage", "inputs.image (or inputImage) is required", parameter="inputs.image")

    factor = task.get("upscaleFactor", 2)
    factor = _num(factor, "upscaleFactor", "invalidUpscaleFactor", lo=2, hi=4)

    ot = task.get("outputType", "URL")
    if isinstance(ot, list) and len(ot) == 1:
        ot = ot[0]
    if not isinstance(ot, str) or ot.lower() not in OUTPUT_TYPES:
        raise RWError("invalidOutputType", "outputType must be URL, base64Data or dataURI", parameter="outputType")
    ot = OUTPUT_TYPES[ot.lower()]

    of = task.get("outputFormat", "JPG")
    if not isinstance(of, str) or of.upper() not in OUTPUT_FORMATS:
        raise RWError("invalidOutputFormat", "outputFormat must be JPG, PNG or WEBP", parameter="outputFormat")
    fmt = OUTPUT_FORMATS[of.upper()]
    quality = _num(task.get("outputQuality", 95), "outputQuality", "invalidOutputQuality", integer=True, lo=20, hi=99)
    ttl = task.get("ttl")
    if ttl is not None:
        ttl = _num(ttl, "ttl", "invalidTtl", integer=True, lo=int(settings.min_ttl))
    include_cost = task.get("includeCost", False)
    if not isinstance(include_cost, bool):
        raise RWError("invalidIncludeCost", "includeCost must be a boolean", parameter="includeCost")
    delivery = task.get("deliveryMethod", "sync")
    if delivery not in ("sync", "async"):
        raise RWError("invalidDeliveryMethod", "deliveryMethod must be sync or async", parameter="deliveryMethod")
    urls = {}
    for name, code in (("webhookURL", "invalidWebhookURL"), ("uploadEndpoint", "invalidUploadEndpoint")):
        v = task.get(name)
        if v is not None and (not isinstance(v, str) or not v.startswith(("http://", "https://"))):
            raise RWError(code, f"{name} must be an http(s) URL", parameter=name)
        urls[name] = v

    s = task.get("settings") or {}
    if not isinstance(s, dict):
        raise RWError("invalidSettings", "settings must be an object", parameter="settings")
    kw: dict[str, Any] = {"scale": float(factor), "size_mode": settings.size_mode}
    if settings.default_steps:
        kw["steps"] = settings.default_steps
    for key, fname in SETTINGS_MAP.items():
        if s.get(key) is None:
            continue
        v = s[key]
        pname = f"settings.{key}"
        if key in ("positivePrompt", "negativePrompt"):
            if not isinstance(v, str):
                raise RWError(f"invalid{key[0].upper()}{key[1:]}", f"{pname} must be a string", parameter=pname)
            if len(v) > 3000:
                raise RWError(
                    f"invalid{key[0].upper()}{key[1:]}",
                    f"{pname} is longer than 3000 characters",
                    parameter=pname,
                )
        elif key == "seed":
            v = _num(v, pname, "invalidSeed", integer=True, lo=0, hi=2**63 - 1)
        elif key == "steps":
            v = _num(v, pname, "invalidSteps", integer=True, lo=1, hi=1000)
        elif key == "CFGScale":
            v = float(_num(v, pname, "invalidCFGScale", lo=0, hi=30))
        elif key == "controlNetWeight":
            v = float(_num(v, pname, "invalidControlNetWeight", lo=0, hi=2))
        kw[fname] = v
    if kw.get("seed") is None:
        kw["seed"] = random.randrange(2**32)  # Runware: a random unsigned 32-bit seed when none is given
    try:
        params = UpscaleParams(**kw).validate()
    except ParamError as e:
        pname = PARAM_TO_FIELD.get(e.field, e.field)
        raise RWError("invalidParameters", f"{pname}: {e.message}", parameter=pname) from e
    return UpscaleRequest(
        image_ref=ref,
        image_param=param,
        params=params,
        output_type=ot,
        output=OutputOptions(format=fmt, quality=int(quality), ttl=float(ttl) if ttl is not None else None),
        include_cost=include_cost,
        delivery=delivery,
        webhook=urls["webhookURL"],
        upload_endpoint=urls["uploadEndpoint"],
    )


def _check_outbound(url: str, name: str, ctx: Ctx) -> None:
    from ccsr import imaging

    try:
        imaging.check_url(url, allow_hosts=frozenset(ctx.settings.fetch_allow_hosts))
    except imaging.FetchError as e:
        raise RWError(f"invalid{name[0].upper()}{name[1:]}", f"{name} is not allowed: {e}", parameter=name) from e


async def _upscale(task: dict, ctx: Ctx, tt: str, tu: str, on_ack=None) -> Reply:
    key = f"{PROTOCOL}:{tu}"
    # an identical retry is answered from the existing job before anything else is done
    body_hash = payload_hash({k: v for k, v in task.items() if k != "deliveryMethod"})
    existing = ctx.engine.get_by_key(key)
    if existing is not None:
        if existing.payload_hash != body_hash:
            raise RWError(
                "conflictTaskUUID",
                f"taskUUID {tu} was already used for a different task",
                parameter="taskUUID",
            )
        req_delivery = task.get("deliveryMethod", "sync")
        return await _deliver(existing, ctx, req_delivery, fresh=False, on_ack=on_ack)

    req = parse_upscale(task, ctx.settings)
    for name, url in (("webhookURL", req.webhook), ("uploadEndpoint", req.upload_endpoint)):
        if url:
            _check_outbound(url, name, ctx)
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
            "webhookURL": req.webhook,
            "uploadEndpoint": req.upload_endpoint,
            "base": ctx.base,
        },
        idempotency_key=key,
        payload_hash=body_hash,
        cost_per_second=ctx.settings.price_per_second,
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
    if meta.get("webhookURL") and on_ack is not None:
        await on_ack({"data": [ack]})
    done = await ctx.engine.wait(job.id, ctx.settings.sync_timeout)
    if done is None or not done.done:
        err = RWError(
            "processingTimeout",
            f"the task did not finish within {ctx.settings.sync_timeout:.0f}s; poll getResponse with this taskUUID",
            status=504,
        )
        return Reply(errors=[(err.entry(meta["taskType"], meta["taskUUID"]), 504)])
    return result_reply(done, ctx, with_status=False)


def result_reply(job: Job, ctx: Ctx | None, *, with_status: bool, base: str | None = None) -> Reply:
    """A terminal (or running) job as a Runware reply."""
    meta = job.meta
    tt, tu = meta.get("taskType", "upscale"), meta.get("taskUUID")
    engine = ctx.engine if ctx else None
    base = base or (ctx.base if ctx else meta.get("base", ""))
    if job.status == SUCCESS and job.result is not None:
        r = job.result
        item: dict[str, Any] = {
            "taskType": tt,
            "taskUUID": tu,
            "imageUUID": r.image_id,
            "inputImageUUID": job.input_image_id,
        }
        ot = meta.get("outputType", "URL")
        if ot == "URL":
            item["imageURL"] = image_url(base, r.image_id, r.extension)
        else:
            data = engine.images.read(r.image_id) if engine else None
            if data is None:
                err = RWError("imageExpired", f"the output image {r.image_id} has expired", status=404)
                return Reply(errors=[(err.entry(tt, tu), 404)])
            b64 = base64.b64encode(data).decode("ascii")
            if ot == "base64Data":
                item["imageBase64Data"] = b64
            else:
                item["imageDataURI"] = f"data:{r.content_type};base64,{b64}"
        if meta.get("includeCost"):
            item["cost"] = r.cost
        if with_status:
            item["status"] = "success"
        return Reply(data=[item])
    if job.status in (ERROR, CANCELLED):
        code, status = ERROR_STATUS.get(job.error.code if job.error else "", ("inferenceError", 500))
        msg = job.error.message if job.error else "the task failed"
        return Reply(errors=[(RWError(code, msg, status=status).entry(tt, tu), status)])
    item = {
        "taskType": tt,
        "taskUUID": tu,
        "status": "processing",
        "imageUUID": job.output_image_id,
        "progress": int(job.progress),
    }
    return Reply(data=[item])


def _get_response(ctx: Ctx, tu: str) -> Reply:
    job = ctx.engine.get_by_key(f"{PROTOCOL}:{tu}")
    if job is None:
        raise RWError("taskNotFound", f"no task with taskUUID {tu}", parameter="taskUUID", status=404)
    reply = result_reply(job, ctx, with_status=True)
    # a failed job's poll is a 400 (protocols.md E), never a retried 5xx
    reply.errors = [(e, 400 if s >= 500 else s) for e, s in reply.errors]
    return reply


# ------------------------------------------------------------------------------------------- delivery


def setup(app, engine: JobEngine, settings: Settings) -> None:
    """Register the webhook / uploadEndpoint listener and the session table."""
    app.state.runware_sessions = Sessions()

    def on_done(job: Job) -> None:
        if job.protocol != PROTOCOL:
            return
        meta = job.meta
        delivery = engine.delivery
        if delivery is None:
            return
        if meta.get("webhookURL"):
            ctx = Ctx(engine, settings, meta.get("base", ""))
            reply = result_reply(job, ctx, with_status=True)
            delivery.post_json(meta["webhookURL"], reply.frame())
        if meta.get("uploadEndpoint") and job.status == SUCCESS and job.result is not None:
            data = engine.images.read(job.result.image_id)
            if data is not None:
                delivery.put_bytes(meta["uploadEndpoint"], data, job.result.content_type)

    engine.add_listener(on_done)


# ------------------------------------------------------------------------------------------- REST


def _ctx(conn) -> Ctx:
    return Ctx(get_engine(conn), get_settings(conn), public_base(conn), images=image_intake(conn))


def _auth_error(message: str) -> dict:
    return {"code": "invalidApiKey", "message": message, "parameter": "apiKey", "taskType": "authentication"}


def _denied_error(e: Denied) -> dict:
    if e.status == 429:
        return {"code": "rateLimitExceeded", "message": e.message, "retryAfter": e.headers()["Retry-After"]}
    return _auth_error(e.message)


def _task_count(tasks: list) -> int:
    """Tasks that do work: authentication and ping ride along for free."""
    return sum(1 for t in tasks if not (isinstance(t, dict) and t.get("taskType") in ("authentication", "ping")))


def _too_many_tasks(n: int, settings: Settings) -> dict:
    return {
        "code": "invalidTaskCount",
        "message": f"{n} tasks in one request; at most {settings.max_tasks} allowed",
    }


_EXAMPLE = [
    {
        "taskType": "upscale",
        "taskUUID": "061fab37-bf9d-4115-880c-6bacb1f0193e",
        "model": "runware:501@1",
        "inputs": {"image": "<image UUID | URL | data URI | base64>"},
        "upscaleFactor": 2,
        "outputType": "URL",
        "outputFormat": "PNG",
        "deliveryMethod": "sync",
        "settings": {"steps": 24, "seed": 72130, "CFGScale": 1.0, "controlNetWeight": 1.0},
    }
]
_OPENAPI = {
    "requestBody": {
        "required": True,
        "content": {
            "application/json": {
                "schema": {"type": "array", "items": {"type": "object"}},
                "example": _EXAMPLE,
            }
        },
    },
    "responses": {
        "200": {"description": '{"data": [items]}'},
        "400": {"description": '{"errors": [...]}: validation (invalid*, missing*, conflict*, unsupported*)'},
        "401": {"description": "invalidApiKey"},
        "404": {"description": "taskNotFound / imageExpired"},
        "429": {"description": "rateLimitExceeded: the queue is full"},
        "500": {"description": "inferenceError / processingFailed / internalServerError"},
    },
}


@router.post("/v1", summary="Runware task API (REST)", openapi_extra=_OPENAPI)
@router.post("/", include_in_schema=False)
async def rest(request: Request) -> JSONResponse:
    """A JSON array of tasks (``imageUpload``, ``mediaStorage``, ``upscale``, ``imageUpscale``,
    ``getResponse``, ``ping``); ``Authorization: Bearer <key>`` or a leading ``authentication`` task. The same
    tasks run over the WebSocket at ``/v1`` (and ``/``)."""
    settings = get_settings(request)
    try:
        body = await request_json(request)
    except IntakeError as e:
        return JSONResponse({"errors": [{"code": "invalidRequestBody", "message": e.message}]}, 400)
    if isinstance(body, dict):
        body = [body]
    if not isinstance(body, list) or not body:
        return JSONResponse(
            {"errors": [{"code": "invalidRequestBody", "message": "the body must be a JSON array of tasks"}]},
            400,
        )
    if (n := _task_count(body)) > settings.max_tasks:
        return JSONResponse({"errors": [_too_many_tasks(n, settings)]}, 400)
    key = None
    authz = request.headers.get("authorization", "")
    if authz.lower().startswith("bearer "):
        key = authz[7:].strip()
    auth_items: list[dict] = []
    if isinstance(body[0], dict) and body[0].get("taskType") == "authentication":
        first = body.pop(0)
        key = first.get("apiKey") or key
        auth_items.append({"taskType": "authentication", "connectionSessionUUID": str(uuid.uuid4())})
    try:
        who = settings.admit(key if isinstance(key, str) else None, client_host(request))
    except Denied as e:
        return JSONResponse({"errors": [_denied_error(e)]}, status_code=e.status, headers=e.headers())
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
    authed = False

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
                tasks = await load_json_async(raw, max_depth=settings.max_json_depth)
            except IntakeError as e:
                await conn.send(frame_error("invalidRequestBody", e.message))
                continue
            if isinstance(tasks, dict):
                tasks = [tasks]
            if not isinstance(tasks, list) or not tasks:
                await conn.send(frame_error("invalidRequestBody", "a frame must be a non-empty JSON array of tasks"))
                continue
            if (n := _task_count(tasks)) > settings.max_tasks:
                await conn.send({"errors": [_too_many_tasks(n, settings)]})
                continue
            for task in tasks:
                if not isinstance(task, dict):
                    await conn.send(frame_error("invalidRequestBody", "each task must be a JSON object"))
                    continue
                tt, tu = _task_ident(task)
                if tt == "authentication":
                    key = task.get("apiKey")
                    try:
                        ctx.principal = settings.principal(key if isinstance(key, str) else None, client_host(ws))
                    except Denied as e:
                        authed = False
                        await conn.send({"errors": [_denied_error(e)]})
                        continue
                    sid = task.get("connectionSessionUUID")
                    resumed = isinstance(sid, str) and sessions.known(sid)
                    if resumed:
                        log.info("websocket session %s resumed", sid)
                    else:
                        sid = str(uuid.uuid4())
                    sessions.open(sid)
                    conn.session = sid
                    authed = True
                    await conn.send({"data": [{"taskType": "authentication", "connectionSessionUUID": sid}]})
                    if resumed:
                        for frame in sessions.drain(sid):
                            await conn.send(frame)
                    continue
                if tt == "ping":
                    await conn.send({"data": [{"taskType": "ping", "pong": True}]})
                    continue
                if not authed:
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
                if ctx.principal is not None:
                    try:
                        settings.admit_principal(ctx.principal)
                    except Denied as e:
                        err = _denied_error(e) | {"taskType": tt or "", "taskUUID": tu or ""}
                        await conn.send({"errors": [err]})
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
