"""The fal protocol for ``fal-ai/ccsr`` and ``fal-ai/ccsr-v2`` (protocols.md B): sync run, stream, queue (submit,
status, status stream, result, cancel) and webhooks. Routing only: :mod:`ccsr.api.fal_schema` reads bodies and
makes every answer, :mod:`ccsr.api.intake` admits the caller, takes the image and submits,
:mod:`ccsr.api.jobs_view` finds, follows and announces jobs (pinned by tests/server/test_fal_protocol.py, proven
with the unmodified ``fal_client`` by tests/server/test_fal_client.py and test_v2_server.py).

Routes per app id: ``POST /{app}[/{path}]`` (sync run; a ``queue.*`` Host submits instead), ``POST /{app}/stream``
(``fal_client.stream``), ``POST /queue/{app}[/{path}][?fal_webhook=URL]``, and under
``[/queue]/{app}/requests/{id}``: ``GET /status[/stream]``, ``GET`` (the result), ``PUT /cancel``. Errors: 422 with
a FastAPI-style ``detail`` list, 429 when the queue or the key's quota is full, never 409; every answer carries
``x-fal-request-id`` (our 5xx is not an ingress error to retry). App ids: each model's
(:data:`ccsr.api.intake.MODELS`; the app of a model this server does not load answers 404 ``model_not_loaded``)
plus ``--fal-app-id`` / ``CCSR_FAL_APP_IDS`` (served like ``fal-ai/ccsr``).

The stream run mode answers server-sent events: a progress event (the queue status with its logs, plus
``progress`` in percent) whenever the job changes, then the output (what a sync run answers) as the last event.
A refusal before the job exists is answered as a sync run answers it (fal's JSON error and HTTP status); a failure
after that ends the stream with an ``error`` event carrying fal's error body. A sync run or a stream whose client
goes away cancels its job (nobody is left to receive it; the runner stops between evaluations), as does passing
``--sync-timeout`` (504) or, still queued, ``X-Fal-Request-Timeout``.
"""

from __future__ import annotations

import json
import re
import time
import uuid
from collections.abc import AsyncGenerator, Callable
from contextlib import aclosing
from typing import Any

from fastapi import APIRouter, FastAPI, Request
from fastapi.concurrency import run_in_threadpool
from fastapi.responses import JSONResponse, Response, StreamingResponse

from ccsr.jobs import ERROR, SUCCESS, Job, JobSpec, OutputOptions

from . import fal_schema as schema
from . import fal_storage, intake
from .app import get_engine, get_settings, public_base
from .auth import Denied
from .jobs_view import WEBHOOK, announce_ends, find, follow, last, queue_position

PROTOCOL = "fal"
DEFAULT_APP_IDS: tuple[str, ...] = tuple(m.fal_app_id for m in intake.MODELS)
REQUEST_ID_HEADER = "x-fal-request-id"
SSE_KEEPALIVE_S = 15.0  # a stream sends a comment after this long without an event (proxies close idle streams)
_ECHOED_ID = re.compile(r"[A-Za-z0-9][A-Za-z0-9._:-]{0,127}")

__all__ = ["DEFAULT_APP_IDS", "build_router", "router", "setup"]


# ============================================================================================ answers


def _json(
    body: Any, status: int = 200, request_id: str | None = None, headers: dict | None = None
) -> JSONResponse:
    # a header cannot carry what a URL path can (spaces, controls, non-ASCII): only an id-shaped value is echoed
    echo = request_id if request_id and _ECHOED_ID.fullmatch(request_id) else None
    h = {REQUEST_ID_HEADER: echo or str(uuid.uuid4())}
    if headers:
        h.update(headers)
    return JSONResponse(schema.finite(body) if status >= 400 else body, status_code=status, headers=h)


def _answer(a: schema.Answer, request_id: str | None = None) -> JSONResponse:
    return _json(a.body, a.status, request_id, a.headers)


def _result(job: Job) -> JSONResponse:
    """A finished job as ``run`` and the result route answer it: the output, or its error."""
    if job.status == SUCCESS:
        return _json(schema.output_of(job), 200, job.id)
    return _answer(schema.job_error(job), job.id)


def _event(text: str, name: str | None = None) -> str:
    return (f"event: {name}\n" if name else "") + f"data: {text}\n\n"


def _sse(request: Request, job: Job, snapshots: AsyncGenerator[Job, None],
         render: Callable[[Job], tuple[str | None, Any]], *, quiet_timeout: bool = False) -> StreamingResponse:
    """Server-sent events ``render(snapshot) -> (event name, body)``, one per snapshot that changes the body.
    A refusal on the way (a bound of the follow, a store outage) ends the stream with an ``error`` event of fal's
    body; with ``quiet_timeout`` the time bound ends it without one (a status stream: the client asks again)."""
    outages = get_engine(request).outages

    async def events():
        last_text, sent = "", time.monotonic()
        try:
            async with aclosing(snapshots):
                async for cur in snapshots:
                    name, body = render(cur)
                    if (text := json.dumps(body)) != last_text:
                        last_text, sent = text, time.monotonic()
                        yield _event(text, name)
                    elif time.monotonic() - sent > SSE_KEEPALIVE_S:
                        sent = time.monotonic()
                        yield ": keep-alive\n\n"
        except (intake.IntakeError, *outages) as e:
            if not isinstance(e, intake.IntakeError):  # the store cannot be reached
                e = intake.IntakeError("unavailable", intake.UNAVAILABLE)
            if not (quiet_timeout and e.kind == "timeout"):
                yield _event(json.dumps(schema.finite(schema.refusal(e).body)), "error")

    headers = {REQUEST_ID_HEADER: job.id, "Cache-Control": "no-cache", "X-Accel-Buffering": "no"}
    return StreamingResponse(events(), media_type="text/event-stream", headers=headers)


def _denied(request: Request) -> JSONResponse | None:
    """Admission (:func:`ccsr.api.intake.admit`; fal_client sends ``Authorization: Key <k>``) for the routes that
    make no job (the request routes, storage): None when admitted, else fal's 401 / 429."""
    try:
        intake.admit(request)
    except Denied as e:
        return _answer(schema.refusal(e))
    return None


def _found(request: Request, app_id: str, request_id: str) -> Job | Response:
    """The caller admitted and the request found under ``app_id``, or the answer saying why not."""
    if (denied := _denied(request)) is not None:
        return denied
    return find(get_engine(request), request_id, PROTOCOL, app_id=app_id) or _json(
        {"detail": "Request not found"}, 404, request_id
    )


def _is_queue_host(request: Request) -> bool:
    return (request.headers.get("host") or "").lower().startswith("queue.")


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


def _status_of(request: Request, app_id: str, job: Job, prefixed: bool) -> tuple[dict, int]:
    logs = (request.query_params.get("logs") or "").strip().lower() in ("1", "true", "yes", "on")
    urls = schema.request_urls(_queue_base(request, app_id, prefixed), job.id)
    return schema.status_body(job, queue_position(get_engine(request), job), logs, urls)


# ============================================================================================ handlers


async def _create_job(request: Request, app_id: str, webhook: str | None = None) -> Job:
    """Admit, validate, take the input image, submit; raises what :func:`ccsr.api.fal_schema.refusal` renders."""
    settings = get_settings(request)
    principal = intake.admit(request)
    intake.check_outbound(webhook, settings, "fal_webhook")
    model = intake.served_model(settings, fal_app_id=_model_of(app_id).fal_app_id)
    inp = schema.parse_input(await intake.request_json(request), model.name)
    params = schema.to_params(inp, model, settings)
    try:
        rec = await intake.image_intake(request).resolve(inp.image_url, "image_url", ids=False, bare_base64=False)
        intake.check_output_size((rec.width, rec.height), params.scale, settings.max_output_side)
    except intake.IntakeError as e:
        raise schema.image_refusal(e, inp.image_url) from None
    meta = {"app_id": app_id, "base": public_base(request), "image_url_shown": intake.shown(inp.image_url),
            WEBHOOK: webhook}
    spec = JobSpec(params=params, input_image_id=rec.id, output=OutputOptions(format="png"), protocol=PROTOCOL,
                   meta=meta, cost_per_second=settings.price_per_second, model=model.name)
    job, _ = await intake.submit(get_engine(request), spec, principal)
    return job


def _follow(request: Request, job: Job, **bounds) -> AsyncGenerator[Job, None]:
    """The job followed under the request's bounds: ``--sync-timeout`` and ``X-Fal-Request-Timeout`` (the
    ``start_timeout=`` of fal_client: longest wait in the queue); left early, it is cancelled."""
    raw = request.headers.get("x-fal-request-timeout") or ""
    try:
        start = float(raw) if float(raw) > 0 else None
    except ValueError:
        start = None
    return follow(get_engine(request), job.id, timeout=get_settings(request).sync_timeout, start_timeout=start,
                  **bounds)


async def _sync_run(request: Request, app_id: str) -> JSONResponse:
    job = None
    try:
        job = await _create_job(request, app_id)
        return _result(await last(_follow(request, job, gone=request.is_disconnected)))
    except schema.REFUSALS as e:
        return _answer(schema.refusal(e), job.id if job else None)


async def _stream(request: Request, app_id: str) -> Response:
    """``POST /{app}/stream`` (``fal_client.stream``): progress events, then the output or an ``error`` event."""
    try:
        job = await _create_job(request, app_id)
    except schema.REFUSALS as e:
        return _answer(schema.refusal(e))
    engine = get_engine(request)

    def render(cur: Job) -> tuple[str | None, Any]:
        if cur.status == SUCCESS:
            return None, schema.output_of(cur)
        if cur.done:
            return "error", schema.job_error(cur).body
        return None, schema.progress_event(cur, queue_position(engine, cur))

    return _sse(request, job, _follow(request, job), render)


async def _submit(request: Request, app_id: str, prefixed: bool) -> JSONResponse:
    try:
        job = await _create_job(request, app_id, webhook=request.query_params.get("fal_webhook"))
    except schema.REFUSALS as e:
        return _answer(schema.refusal(e))
    body = {
        "status": "IN_QUEUE",
        "request_id": job.id,
        "gateway_request_id": job.id,
        **schema.request_urls(_queue_base(request, app_id, prefixed), job.id),
        "queue_position": queue_position(get_engine(request), job) or 0,
    }
    return _json(body, 200, job.id)


async def _status(request: Request, app_id: str, request_id: str, prefixed: bool) -> JSONResponse:
    job = _found(request, app_id, request_id)
    if isinstance(job, Response):
        return job
    body, code = _status_of(request, app_id, job, prefixed)
    return _json(body, code, job.id)


async def _status_stream(request: Request, app_id: str, request_id: str, prefixed: bool) -> Response:
    """``GET .../status/stream``: the status as server-sent events (``data: <status JSON>``), one per change,
    until COMPLETED (or ``--sync-timeout``; the client then asks again). Same bodies as ``.../status``."""
    job = _found(request, app_id, request_id)
    if isinstance(job, Response):
        return job
    snapshots = follow(get_engine(request), job.id, timeout=get_settings(request).sync_timeout, cancel=False)
    return _sse(request, job, snapshots, lambda cur: (None, _status_of(request, app_id, cur, prefixed)[0]),
                quiet_timeout=True)


async def _response(request: Request, app_id: str, request_id: str) -> JSONResponse:
    job = _found(request, app_id, request_id)
    if isinstance(job, Response):
        return job
    if not job.done:
        return _json({"detail": "Request is still in progress"}, 400, job.id)
    return _result(job)


async def _cancel(request: Request, app_id: str, request_id: str) -> JSONResponse:
    if (denied := _denied(request)) is not None:
        return denied
    job = find(get_engine(request), request_id, PROTOCOL, app_id=app_id)
    if job is None:
        return _json({"status": "NOT_FOUND"}, 404, request_id)
    if job.done:
        return _json({"status": "ALREADY_COMPLETED"}, 400, job.id)
    job = await run_in_threadpool(get_engine(request).cancel, job.id)
    if job.status in (SUCCESS, ERROR):  # it finished between the two looks
        return _json({"status": "ALREADY_COMPLETED"}, 400, job.id)
    return _json({"status": "CANCELLATION_REQUESTED"}, 202, job.id)


# ============================================================================================ router


def _model_of(app_id: str) -> intake.Model:
    """The model behind a fal app id: its own, or CCSR-v1 for the ``--fal-app-id`` ids (served like fal-ai/ccsr)."""
    return next((m for m in intake.MODELS if m.fal_app_id == app_id), intake.MODELS[0])


def _add_app_routes(r: APIRouter, app_id: str) -> None:
    """Literal routes for one app id (plus any sub-path), so nothing else in the app is shadowed."""

    async def run_or_submit(request: Request):
        if _is_queue_host(request):
            return await _submit(request, app_id, prefixed=False)
        return await _sync_run(request, app_id)

    async def queue_submit(request: Request):
        return await _submit(request, app_id, prefixed=True)

    async def stream(request: Request):
        return await _stream(request, app_id)

    def by_id(handler, **kw):
        async def endpoint(request: Request, request_id: str):
            return await handler(request, app_id, request_id, **kw)

        return endpoint

    inputs = schema.FAL_INPUTS[_model_of(app_id).name].model_json_schema()
    body = {"tags": ["fal"], "openapi_extra": {"requestBody": {"required": True, "content": {"application/json": {
        "schema": inputs}}}}}
    r.add_api_route(f"/{app_id}/stream", stream, methods=["POST"], **body,
                    summary=f"fal stream of {app_id}: server-sent progress events, then the output")
    for sub in ("", "/{path:path}"):
        r.add_api_route(f"/{app_id}{sub}", run_or_submit, methods=["POST"], include_in_schema=not sub, **body,
                        summary=f"fal sync run of {app_id} (a queue.* Host submits instead)")
        r.add_api_route(f"/queue/{app_id}{sub}", queue_submit, methods=["POST"], include_in_schema=not sub, **body,
                        summary=f"fal queue submit of {app_id} (?fal_webhook=URL)")
    for prefix, prefixed in (("/queue", True), ("", False)):
        base = f"{prefix}/{app_id}/requests/{{request_id}}"
        routes = (("/status", _status, "GET", {"prefixed": prefixed}),
                  ("/status/stream", _status_stream, "GET", {"prefixed": prefixed}),
                  ("", _response, "GET", {}), ("/cancel", _cancel, "PUT", {}))
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


def setup(app: FastAPI, engine, settings) -> None:
    """Called once by :func:`ccsr.api.app.create_app`: the routes of every served app id (the models' own plus
    ``--fal-app-id``), and the webhooks of finished requests."""
    announce_ends(engine, PROTOCOL, schema.webhook_payload)
    extra = [a.strip("/") for a in settings.fal_app_ids if a.strip("/").count("/") == 1]
    app.include_router(build_router(list(dict.fromkeys([*DEFAULT_APP_IDS, *extra]))))
