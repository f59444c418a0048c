"""Request limits applied before any handler runs, answered in each protocol's own error shape.

The ASGI middleware buffers a request body up to the body limit (413 past it, whether announced by
Content-Length or discovered while streaming), then reads a JSON body once under the intake's bounds
(:func:`ccsr.api.intake.load_json`: depth, element count, text) and leaves it for the handler. Runware paths (``/``,
``/v1``) answer ``{"errors": [{code, message}]}``; every other path answers fal/FastAPI-style ``detail``.
"""

from __future__ import annotations

import json
import uuid
from collections.abc import Awaitable, Callable
from typing import Any

from .intake import RETRY_AFTER_S, STATE_KEY, IntakeError, load_json_async

RUNWARE_PATHS = frozenset({"/", "/v1", "/v1/"})


def is_runware(path: str) -> bool:
    return path in RUNWARE_PATHS


def runware_error(code: str, message: str, **extra: Any) -> dict:
    return {"errors": [{"code": code, "message": message, **extra}]}


FAL_BODY_ERROR_TYPES = {
    "too_deep": "value_error.json_depth",
    "too_many_items": "value_error.json_items",
    "bad_text": "string_unicode",
}


RUNWARE_CODES = {"too_large": "invalidRequestSize", "unavailable": "serviceUnavailable"}
FAL_REQUEST_ERROR_TYPES = {"too_large": "request_too_large", "unavailable": "service_unavailable"}


def error_body(path: str, kind: str, message: str) -> dict:
    """An :class:`~ccsr.api.intake.IntakeError` ``kind`` other than ``bad_json`` (or ``unavailable``: the job
    store is down) in the path's protocol shape."""
    if is_runware(path):
        return runware_error(RUNWARE_CODES.get(kind, "invalidRequestBody"), message)
    if kind in FAL_REQUEST_ERROR_TYPES:
        return {"detail": message, "error_type": FAL_REQUEST_ERROR_TYPES[kind]}
    return {"detail": [{"loc": ["body"], "msg": message, "type": FAL_BODY_ERROR_TYPES[kind]}]}


def error_status(path: str, kind: str) -> int:
    if kind in ("too_large", "unavailable"):
        return {"too_large": 413, "unavailable": 503}[kind]
    return 400 if is_runware(path) else 422


def error_headers(path: str, kind: str) -> dict[str, str]:
    """Headers of an error answer: Retry-After for an outage; fal's error-type, retryable and request-id."""
    headers = {"Retry-After": str(RETRY_AFTER_S)} if kind == "unavailable" else {}
    if is_runware(path):
        return headers
    headers["x-fal-request-id"] = str(uuid.uuid4())  # ours, not an ingress error: the client does not retry
    headers["x-fal-retryable"] = "true" if kind == "unavailable" else "false"
    if kind in FAL_REQUEST_ERROR_TYPES:
        headers["x-fal-error-type"] = FAL_REQUEST_ERROR_TYPES[kind]
    return headers


Receive = Callable[[], Awaitable[dict]]
Send = Callable[[dict], Awaitable[None]]


class LimitsMiddleware:
    """Body size and JSON depth for every HTTP request that carries a body."""

    def __init__(self, app, settings):
        self.app = app
        self.settings = settings

    async def _reply(self, send: Send, path: str, kind: str, message: str) -> None:
        status = error_status(path, kind)
        body = json.dumps(error_body(path, kind, message)).encode()
        headers = [(b"content-type", b"application/json"), (b"content-length", str(len(body)).encode())]
        headers += [(k.lower().encode(), v.encode()) for k, v in error_headers(path, kind).items()]
        await send({"type": "http.response.start", "status": status, "headers": headers})
        await send({"type": "http.response.body", "body": body})

    async def __call__(self, scope: dict, receive: Receive, send: Send) -> None:
        if scope["type"] != "http" or scope.get("method") not in ("POST", "PUT", "PATCH"):
            await self.app(scope, receive, send)
            return
        path = scope.get("path", "")
        limit = self.settings.body_limit()
        headers = dict(scope.get("headers") or [])
        declared = headers.get(b"content-length", b"")
        too_large = f"request body over {limit} bytes"
        if declared.isdigit() and int(declared) > limit:
            await self._reply(send, path, "too_large", too_large)
            return
        chunks: list[bytes] = []
        size = 0
        while True:
            msg = await receive()
            if msg["type"] == "http.disconnect":
                return
            chunk = msg.get("body", b"")
            size += len(chunk)
            if size > limit:
                await self._reply(send, path, "too_large", too_large)
                return
            chunks.append(chunk)
            if not msg.get("more_body"):
                break
        body = b"".join(chunks)
        ctype = headers.get(b"content-type", b"").lower()
        if body.lstrip()[:1] in (b"[", b"{") and b"multipart" not in ctype:
            try:
                value = await load_json_async(body, max_depth=self.settings.max_json_depth)
            except IntakeError as e:
                if e.kind != "bad_json":
                    await self._reply(send, path, e.kind, e.message)
                    return
                value = e  # the adapter answers "not JSON" in its own words
            scope.setdefault("state", {})[STATE_KEY] = value
        sent = False

        async def replay() -> dict:
            nonlocal sent
            if not sent:
                sent = True
                return {"type": "http.request", "body": body, "more_body": False}
            return await receive()

        await self.app(scope, replay, send)
