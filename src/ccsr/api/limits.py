"""Request limits applied before any handler runs, answered in each protocol's own error shape.

The ASGI middleware buffers a request body up to the body limit (413 past it, whether announced by
Content-Length or discovered while streaming) and refuses JSON nested deeper than the depth limit (the
stdlib parser would otherwise raise RecursionError on a few thousand brackets). Runware paths (``/``,
``/v1``) answer ``{"errors": [{code, message}]}``; every other path answers fal/FastAPI-style ``detail``.
"""

from __future__ import annotations

import json
import re
from collections.abc import Awaitable, Callable
from typing import Any

_STRING = re.compile(rb'"(?:[^"\\]|\\.)*"', re.DOTALL)
_BRACKET = re.compile(rb"[\[\]{}]")
RUNWARE_PATHS = frozenset({"/", "/v1", "/v1/"})


def json_depth(raw: bytes | str) -> int:
    """Deepest bracket nesting of a JSON text, ignoring brackets inside strings (regex speed, no recursion)."""
    data = raw.encode("utf-8", "surrogatepass") if isinstance(raw, str) else raw
    depth = deepest = 0
    for m in _BRACKET.finditer(_STRING.sub(b'""', data)):
        if m.group() in (b"[", b"{"):
            depth += 1
            deepest = max(deepest, depth)
        else:
            depth -= 1
    return deepest


def is_runware(path: str) -> bool:
    return path in RUNWARE_PATHS


def runware_error(code: str, message: str, **extra: Any) -> dict:
    return {"errors": [{"code": code, "message": message, **extra}]}


def error_body(path: str, status: int, kind: str, message: str) -> dict:
    """``kind``: ``too_large`` or ``too_deep``."""
    if is_runware(path):
        code = {"too_large": "invalidRequestSize", "too_deep": "invalidRequestBody"}[kind]
        return runware_error(code, message)
    if kind == "too_deep":
        return {"detail": [{"loc": ["body"], "msg": message, "type": "value_error.json_depth"}]}
    return {"detail": message, "error_type": "request_too_large"}


Receive = Callable[[], Awaitable[dict]]
Send = Callable[[dict], Awaitable[None]]


class LimitsMiddleware:
    """Body size and JSON depth for every HTTP request that carries a body."""

    def __init__(self, app, settings):
        self.app = app
        self.settings = settings

    async def _reply(self, send: Send, path: str, status: int, kind: str, message: str) -> None:
        body = json.dumps(error_body(path, status, kind, message)).encode()
        headers = [(b"content-type", b"application/json"), (b"content-length", str(len(body)).encode())]
        if not is_runware(path) and kind == "too_large":
            headers.append((b"x-fal-error-type", b"request_too_large"))
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
            await self._reply(send, path, 413, "too_large", too_large)
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
                await self._reply(send, path, 413, "too_large", too_large)
                return
            chunks.append(chunk)
            if not msg.get("more_body"):
                break
        body = b"".join(chunks)
        ctype = headers.get(b"content-type", b"").lower()
        if body.lstrip()[:1] in (b"[", b"{") and b"multipart" not in ctype:
            depth = json_depth(body)
            if depth > self.settings.max_json_depth:
                msg = f"JSON nested {depth} deep; at most {self.settings.max_json_depth} allowed"
                await self._reply(send, path, 400 if is_runware(path) else 422, "too_deep", msg)
                return
        sent = False

        async def replay() -> dict:
            nonlocal sent
            if not sent:
                sent = True
                return {"type": "http.request", "body": body, "more_body": False}
            return await receive()

        await self.app(scope, replay, send)
