"""The fal protocol for ``fal-ai/ccsr`` and ``fal-ai/ccsr-v2`` (protocols.md B): sync run, queue (submit,
status, status stream, result, cancel) and webhooks; a thin adapter that reads bodies with
:mod:`ccsr.api.fal_schema`, takes images and submits through :mod:`ccsr.api.intake`, and answers in fal's shapes
(pinned by tests/server/test_fal_protocol.py, proven with the unmodified ``fal_client`` by
tests/server/test_fal_client.py and test_v2_server.py).

Routes per app id: ``POST /{app}[/{path}]`` (sync run; a ``queue.*`` Host submits instead), ``POST
/queue/{app}[/{path}][?fal_webhook=URL]``, and under ``[/queue]/{app}/requests/{id}``: ``GET /status[/stream]``,
``GET`` (the result), ``PUT /cancel``. Errors: 422 with a FastAPI-style ``detail`` list, 429 when the queue or the
key's quota is full, never 409; every answer carries ``x-fal-request-id`` (our 5xx is not an ingress error to
retry). App ids: each model's (:data:`ccsr.api.intake.MODELS`; the app of a model this server does not load
answers 404 ``model_not_loaded``) plus ``--fal-app-id`` / ``CCSR_FAL_APP_IDS`` (served like ``fal-ai/ccsr``).
"""

from __future__ import annotations

import asyncio
import json
import logging
import re
import uuid
from typing import Any

from fastapi import APIRouter, FastAPI, Request
from fastapi.concurrency import run_in_threadpool
from fastapi.responses import JSONResponse, Response, StreamingResponse

from ccsr import imaging
from ccsr.jobs import ERROR, QUEUED, SUCCESS, Job, JobSpec, OutputOptions, QueueFull, StoredImage
from ccsr.params import ParamError

from . import fal_storage
from .app import client_host, get_engine, get_settings, public_base
from .auth import Denied
from .fal_schema import (
    FAL_INPUTS,
    FalInputError,
    error_of,
    fal_error,
    finite,
    output_of,
    parse_input,
    request_urls,
    status_body,
    to_params,
    webhook_payload,
)
from .intake import (
    MODELS,
    RETRY_AFTER_S,
    UNAVAILABLE,
    IntakeError,
    Model,
    check_outbound,
    image_intake,
    request_json,
    request_key,
    served_model,
    shown,
    submit,
)

log = logging.getLogger("ccsr.api.fal")

PROTOCOL = "fal"
DEFAULT_APP_IDS: tuple[str, ...] = tuple(m.fal_app_id for m in MODELS)
REQUEST_ID_HEADER = "x-fal-request-id"
SSE_POLL_S = 0.5  # a status stream looks again this often (sooner when the job ends)
SSE_KEEPALIVE_S = 15.0  # and sends a comment after this long without a change (proxies close idle streams)
_ECHOED_ID = re.compile(r"[A-Za-z0-9][A-Za-z0-9._:-]{0,127}")

__all__ = ["DEFAULT_APP_IDS", "build_router", "router", "setup"]


# ============================================================================================ helpers


def _json(
    body: Any, status: int = 200, request_id: str | None = None, headers: dict | None = None
) -> JSONResponse:
    # a header cannot carry what a URL path can (spaces, controls, non-ASCII): only an id-shaped value is echoed
    echo = request_id if request_id and _ECHOED_ID.fullmatch(request_id) else None
    h = {REQUEST_ID_HEADER: echo or str(uuid.uuid4())}
    if headers:
        h.update(headers)
    return JSONResponse(finite(body) if status >= 400 else body, status_code=status, headers=h)


def _input_error(e: FalInputError, request_id: str | None = None) -> JSONResponse:
    return _json(e.body(), e.status, request_id, {"x-fal-billable-units": "0", "x-fal-retryable": "false"})


def _request_error(
    detail: str, status: int, error_type: str | None, request_id: str | None = None, retryable: bool = False
) -> JSONResponse:
    """fal "request errors": ``{"detail": str, "error_type": str}`` plus ``X-Fal-Error-Type``."""
    body: dict[str, Any] = {"detail": detail}
    headers = {"x-fal-retryable": "true" if retryable else "false"}
    if error_type:
        body["error_type"] = error_type
        headers["x-fal-error-type"] = error_type
    return _json(body, status, request_id, headers)


def _is_queue_host(request: Request) -> bool:
    host = (request.headers.get("host") or "").lower()
    return host.startswith("queue.")


def _authorized(request: Request) -> bool:
    """The key policy alone (no rate limit): used by :mod:`ccsr.api.fal_storage`."""
    return get_settings(request).key_ok(request_key(request), client_host(request))


def _denied(request: Request) -> JSONResponse | None:
    """``Authorization: Key <k>`` (fal_client) or ``Bearer <k>``; the server's key policy and the key's rate
    limit decide. None when admitted (the caller is kept in ``request.state.principal``), else the error."""
    try:
        request.state.principal = get_settings(request).admit(request_key(request), client_host(request))
    except Denied as e:
        if e.status == 429:
            resp = _request_error(e.message, 429, "rate_limited", retryable=True)
            resp.headers.update(e.headers())
            return resp
        return _request_error("Unauthorized: invalid or missing key (Authorization: Key <FAL_KEY>)", 401, None)
    return None


# ----------------------------------------------------------------------------------------- input image


# neutral image refusal -> fal model error type (docs.fal.ai/errors); imaging codes refine image_invalid
_IMAGE_ERROR_TYPES = {"image_missing": "file_download_error", "image_url_refused": "file_download_error",
                      "image_fetch": "file_download_error"}
_IMAGE_REASON_TYPES = {"too_large_bytes": "file_too_large", "too_many_pixels": "image_too_large"}


async def _store_input(request: Request, url: str) -> StoredImage:
    """``image_url`` (data URI, http(s) URL, or one of our own image URLs) as a stored image."""
    try:
        return await image_intake(request).resolve(url, "image_url", ids=False, bare_base64=False)
    except IntakeError as e:
        if e.kind == "unavailable":
            raise
        etype = _IMAGE_ERROR_TYPES.get(e.kind) or _IMAGE_REASON_TYPES.get(e.reason or "", "image_load_error")
        lead = "Failed to download the file" if etype == "file_download_error" else "Failed to load the image"
        ctx = {"reason": e.reason} if e.reason else None
        raise FalInputError([fal_error("image_url", f"{lead}: {e.message}", etype, shown(url), ctx)]) from None


def _check_output_size(rec: StoredImage, scale: float, cap: int | None) -> None:
    """fal answers the exact ``scale x input`` size, so an output over the server's cap is refused (422
    ``image_too_large``) instead of shrinking the input as the Runware adapter does."""
    if not cap:
        return
    w, h = imaging.output_size((rec.width, rec.height), scale)
    if w > cap or h > cap:
        raise FalInputError(
            [
                fal_error(
                    "image_url",
                    f"The output would be {w}x{h}; this server's limit is {cap}x{cap}",
                    "image_too_large",
                    None,
                    {
                        "max_width": cap,
                        "max_height": cap,
                        "input_width": rec.width,
                        "input_height": rec.height,
                    },
                )
            ]
        )


# ----------------------------------------------------------------------------------------- job <-> wire


def _error_response(job: Job) -> JSONResponse:
    status, detail, etype = error_of(job)
    headers = {"x-fal-error-type": etype, "x-fal-retryable": "true" if status in (503, 504) else "false"}
    body: dict[str, Any] = {"detail": detail}
    if not isinstance(detail, list):
        body["error_type"] = etype
    else:
        headers["x-fal-billable-units"] = "0"
    return _json(body, status, job.id, headers)


def _queue_base(request: Request, app_id: str, prefixed: bool) -> str:
    """Where the client finds this request again: ``--public-url`` when set (a proxy in front), else the
    request's own scheme, Host and mount point; a ``queue.*`` Host is always kept as it came."""
    settings = get_settings(request)
    if settings.public_url and not _is_queue_host(request):
        root = settings.public_url.rstrip("/")
    else:
        scheme = request.url.scheme
        host = request.headers.get("host") or f"{request.url.hostname}:{request.url.port}"
        root = f"{scheme}://{host}{(request.scope.get('root_path') or '').rstrip('/')}"
    return f"{root}{'/queue' if prefixed else ''}/{app_id}"


def _find_job(request: Request, app_id: str, request_id: str) -> Job | None:
    job = get_engine(request).get(request_id)
    if job is None or job.protocol != PROTOCOL or job.meta.get("app_id") != app_id:
        return None
    return job


def _admitted_job(request: Request, app_id: str, request_id: str) -> Job | Response:
    """The caller's key admitted and the request found under ``app_id``, or the answer saying why not."""
    if (denied := _denied(request)) is not None:
        return denied
    return _find_job(request, app_id, request_id) or _not_found(request_id)


def _not_found(request_id: str) -> JSONResponse:
    return _json({"detail": "Request not found"}, 404, request_id)


# ============================================================================================ handlers


async def _create_job(request: Request, app_id: str, *, webhook: str | None = None) -> Job | JSONResponse:
    """Validate, store the input, submit. Returns the job or the error response."""
    settings = get_settings(request)
    model = _model_of(app_id)
    try:
        served_model(settings, fal_app_id=model.fal_app_id)
    except IntakeError as e:  # an app of a model this server does not load
        return _request_error(e.message, 404, "model_not_loaded")
    try:
        try:
            body = await request_json(request)
        except IntakeError as e:  # the limits middleware answered every other kind already
            detail = {"type": "json_invalid", "loc": ["body"], "msg": "JSON decode error", "input": {}}
            raise FalInputError([detail | {"ctx": {"error": e.message}}]) from None
        inp = parse_input(body, model.name)
        params = to_params(inp, model, settings)
        rec = await _store_input(request, inp.image_url)
        _check_output_size(rec, params.scale, settings.max_output_side)
    except FalInputError as e:
        return _input_error(e)
    except IntakeError as e:  # unavailable: the image store cannot take it (a full disk), retry later
        resp = _request_error(e.message, 503, "service_unavailable", retryable=True)
        resp.headers["Retry-After"] = str(RETRY_AFTER_S)
        return resp
    engine = get_engine(request)
    meta = {"app_id": app_id, "base": public_base(request), "image_url_shown": shown(inp.image_url)}
    if webhook:
        meta["webhook"] = webhook
    spec = JobSpec(
        params=params,
        input_image_id=rec.id,
        output=OutputOptions(format="png"),
        protocol=PROTOCOL,
        meta=meta,
        cost_per_second=settings.price_per_second,
        model=model.name,
    )
    try:
        job, _ = await submit(engine, spec, getattr(request.state, "principal", None))
    except QueueFull as e:  # the queue, or the caller's quota
        resp = _request_error(str(e), 429, "rate_limited", retryable=True)
        resp.headers["Retry-After"] = "1"
        return resp
    except ParamError as e:
        return _input_error(FalInputError([fal_error(e.field, e.message, "value_error")]))
    return job


def _start_timeout(request: Request) -> float | None:
    raw = request.headers.get("x-fal-request-timeout")
    if not raw:
        return None
    try:
        v = float(raw)
    except ValueError:
        return None
    return v if v > 0 else None


async def _sync_run(request: Request, app_id: str) -> JSONResponse:
    if (denied := _denied(request)) is not None:
        return denied
    job = await _create_job(request, app_id)
    if isinstance(job, JSONResponse):
        return job
    engine = get_engine(request)
    settings = get_settings(request)
    loop = asyncio.get_running_loop()
    deadline = loop.time() + settings.sync_timeout
    start_deadline = None
    if (st := _start_timeout(request)) is not None:
        start_deadline = loop.time() + st
    while True:
        # short slices: notice a client that went away, or a start timeout, promptly
        cur = await engine.wait(job.id, timeout=0.25 if start_deadline else 1.0)
        if cur is None:
            return _request_error("the job vanished", 500, "internal_error", job.id)
        if cur.done:
            break
        now = loop.time()
        if await request.is_disconnected():
            await run_in_threadpool(engine.cancel, job.id)
            log.info("fal sync %s: client went away; cancelled", job.id)
            return _request_error("client disconnected", 499, "client_disconnected", job.id)
        if start_deadline is not None and cur.status == QUEUED and now > start_deadline:
            await run_in_threadpool(engine.cancel, job.id)
            return _json(
                {"detail": "Request timed out before processing started", "error_type": "startup_timeout"},
                504,
                job.id,
                {"x-fal-error-type": "startup_timeout", "x-fal-request-timeout-type": "user"},
            )
        if now > deadline:
            await run_in_threadpool(engine.cancel, job.id)
            return _request_error(
                f"request timed out after {settings.sync_timeout:.0f}s", 504, "request_timeout", job.id
            )
    if cur.status == SUCCESS:
        return _json(output_of(cur), 200, cur.id)
    return _error_response(cur)


async def _submit(request: Request, app_id: str, prefixed: bool) -> JSONResponse:
    if (denied := _denied(request)) is not None:
        return denied
    webhook = request.query_params.get("fal_webhook")
    try:
        check_outbound(webhook, get_settings(request), "fal_webhook")
    except IntakeError as e:
        return _input_error(FalInputError([{"loc": ["query", "fal_webhook"], "msg": e.message, "type": "value_error",
                                            "input": webhook}]))
    job = await _create_job(request, app_id, webhook=webhook)
    if isinstance(job, JSONResponse):
        return job
    engine = get_engine(request)
    pos = engine.queue_position(job.id)
    body = {
        "status": "IN_QUEUE",
        "request_id": job.id,
        "gateway_request_id": job.id,
        **request_urls(_queue_base(request, app_id, prefixed), job.id),
        "queue_position": 0 if pos is None else pos,
    }
    return _json(body, 200, job.id)


def _want_logs(request: Request) -> bool:
    return (request.query_params.get("logs") or "").strip().lower() in ("1", "true", "yes", "on")


def _status_of(request: Request, app_id: str, job: Job, prefixed: bool) -> tuple[dict, int]:
    position = get_engine(request).queue_position(job.id) if job.status == QUEUED else None
    urls = request_urls(_queue_base(request, app_id, prefixed), job.id)
    return status_body(job, position, _want_logs(request), urls)


async def _status(request: Request, app_id: str, request_id: str, prefixed: bool) -> JSONResponse:
    job = _admitted_job(request, app_id, request_id)
    if isinstance(job, Response):
        return job
    body, code = _status_of(request, app_id, job, prefixed)
    return _json(body, code, job.id)


async def _status_stream(request: Request, app_id: str, request_id: str, prefixed: bool) -> Response:
    """``GET .../status/stream``: the status as server-sent events (``data: <status JSON>``), one per change,
    until COMPLETED (or ``--sync-timeout``; the client then asks again). Same bodies as ``.../status``."""
    job = _admitted_job(request, app_id, request_id)
    if isinstance(job, Response):
        return job
    engine = get_engine(request)
    settings = get_settings(request)

    async def events():
        loop = asyncio.get_running_loop()
        end = loop.time() + settings.sync_timeout
        last, quiet_since = "", loop.time()
        while True:
            try:
                cur = await run_in_threadpool(engine.get, job.id)
            except engine.outages:
                body = {"detail": UNAVAILABLE, "error_type": "service_unavailable"}
                yield f"event: error\ndata: {json.dumps(body)}\n\n"
                return
            if cur is None:
                return
            text = json.dumps(_status_of(request, app_id, cur, prefixed)[0])
            if text != last:
                last, quiet_since = text, loop.time()
                yield f"data: {text}\n\n"
            elif loop.time() - quiet_since > SSE_KEEPALIVE_S:
                quiet_since = loop.time()
                yield ": keep-alive\n\n"
            if cur.done or loop.time() > end:
                return
            await engine.wait(job.id, timeout=SSE_POLL_S)

    headers = {REQUEST_ID_HEADER: job.id, "Cache-Control": "no-cache", "X-Accel-Buffering": "no"}
    return StreamingResponse(events(), media_type="text/event-stream", headers=headers)


async def _result(request: Request, app_id: str, request_id: str) -> JSONResponse:
    job = _admitted_job(request, app_id, request_id)
    if isinstance(job, Response):
        return job
    if not job.done:
        return _json({"detail": "Request is still in progress"}, 400, job.id)
    if job.status == SUCCESS:
        return _json(output_of(job), 200, job.id)
    return _error_response(job)


async def _cancel(request: Request, app_id: str, request_id: str) -> JSONResponse:
    if (denied := _denied(request)) is not None:
        return denied
    job = _find_job(request, app_id, request_id)
    if job is None:
        return _json({"status": "NOT_FOUND"}, 404, request_id)
    if job.done:
        return _json({"status": "ALREADY_COMPLETED"}, 400, job.id)
    job = await run_in_threadpool(get_engine(request).cancel, job.id)
    if job.status in (SUCCESS, ERROR):  # it finished between the two looks
        return _json({"status": "ALREADY_COMPLETED"}, 400, job.id)
    return _json({"status": "CANCELLATION_REQUESTED"}, 202, job.id)


# ============================================================================================ router


def _model_of(app_id: str) -> Model:
    """The model behind a fal app id: its own, or CCSR-v1 for the ``--fal-app-id`` ids (served like fal-ai/ccsr)."""
    return next((m for m in MODELS if m.fal_app_id == app_id), MODELS[0])


def _add_app_routes(r: APIRouter, app_id: str) -> None:
    """Literal routes for one app id (plus any sub-path), so nothing else in the app is shadowed."""

    async def run_or_submit(request: Request):
        if _is_queue_host(request):
            return await _submit(request, app_id, prefixed=False)
        return await _sync_run(request, app_id)

    async def submit(request: Request):
        return await _submit(request, app_id, prefixed=True)

    def by_id(handler, **kw):
        async def endpoint(request: Request, request_id: str):
            return await handler(request, app_id, request_id, **kw)

        return endpoint

    schema = FAL_INPUTS[_model_of(app_id).name].model_json_schema()
    body_schema = {"requestBody": {"required": True, "content": {"application/json": {"schema": schema}}}}
    for sub in ("", "/{path:path}"):
        documented = {"include_in_schema": not sub, "tags": ["fal"], "openapi_extra": body_schema}
        r.add_api_route(f"/{app_id}{sub}", run_or_submit, methods=["POST"], **documented,
                        summary=f"fal sync run of {app_id} (a queue.* Host submits instead)")
        r.add_api_route(f"/queue/{app_id}{sub}", submit, methods=["POST"], **documented,
                        summary=f"fal queue submit of {app_id} (?fal_webhook=URL)")
    for prefix, prefixed in (("/queue", True), ("", False)):
        base = f"{prefix}/{app_id}/requests/{{request_id}}"
        routes = (("/status", _status, "GET", {"prefixed": prefixed}),
                  ("/status/stream", _status_stream, "GET", {"prefixed": prefixed}),
                  ("", _result, "GET", {}), ("/cancel", _cancel, "PUT", {}))
        for slash in ("", "/"):
            for tail, handler, method, kw in routes:
                r.add_api_route(f"{base}{tail}{slash}", by_id(handler, **kw), methods=[method], tags=["fal"],
                                include_in_schema=prefixed and not slash)


def build_router(app_ids: tuple[str, ...] | list[str] = DEFAULT_APP_IDS) -> APIRouter:
    r = APIRouter()
    for app_id in app_ids:
        _add_app_routes(r, app_id.strip("/"))
    return r


router = fal_storage.router  # optional upload endpoints (fal_client.upload_file); app routes come from setup


# ============================================================================================ webhooks


def _on_terminal(engine) -> Any:
    def listener(job: Job) -> None:
        if job.protocol != PROTOCOL:
            return
        url = job.meta.get("webhook")
        if not url:
            return
        if engine.delivery is None:
            log.warning("fal webhook for %s dropped: the engine has no delivery", job.id)
            return
        try:
            body = webhook_payload(job)
        except Exception:  # pragma: no cover - never let a listener break the worker
            log.exception("fal webhook payload for %s", job.id)
            return
        engine.delivery.post_json(url, body)

    return listener


def setup(app: FastAPI, engine, settings) -> None:
    """Called once by :func:`ccsr.api.app.create_app`: the routes of every served app id (the models' own plus
    ``--fal-app-id``), and the webhook listener."""
    engine.add_listener(_on_terminal(engine))
    extra = [a.strip("/") for a in settings.fal_app_ids if a.strip("/").count("/") == 1]
    app.include_router(build_router(list(dict.fromkeys([*DEFAULT_APP_IDS, *extra]))))
