"""fal storage endpoints, so ``fal_client.upload_file/upload_image/upload`` can store inputs on this server.

``fal_client`` sends uploads to two hard-coded URLs, ``REST_URL`` (``https://rest.fal.ai``) and ``CDN_URL``
(``https://v3.fal.media``); a client that points those two module constants at us (protocols.md B.3; there is
no environment variable for them) gets:

- ``POST /storage/auth/token?storage_type=fal-cdn-v3`` (``Authorization: Key …``) -> ``{token, token_type,
  base_url, expires_at}``;
- ``POST /files/upload`` (``Authorization: Bearer <token>``, raw bytes, ``Content-Type``, ``X-Fal-File-Name``,
  optional ``X-Fal-Object-Lifecycle``) -> ``{"access_url": …}``;
- the fallback ``POST /storage/upload/initiate?storage_type=gcs`` (``{file_name, content_type}``) ->
  ``{upload_url, file_url}``, then ``PUT <upload_url>`` with the bytes (a signed, expiring URL).

Only images are stored (they land in the engine's image store as inputs, with its TTL); the returned URLs are
``/images/<uuid>.<ext>`` on this server, which the fal adapter reads back from the store rather than fetching.
Multipart uploads (files over 100 MB) are not offered: inputs are capped far below that.
"""

from __future__ import annotations

import asyncio
import datetime as _dt
import hashlib
import hmac
import json
import os
import secrets
import time
import uuid
from pathlib import Path

from fastapi import APIRouter, Request
from fastapi.responses import JSONResponse

from ccsr.imaging import formats

from .app import get_engine, get_settings, image_url, public_base
from .intake import Probed, limits_of, probe

router = APIRouter(tags=["fal storage"])

TOKEN_TTL = 3600.0
UPLOAD_URL_TTL = 3600.0


def _secret(request: Request) -> bytes:
    """A per-installation signing key (``<data_dir>/fal_storage.key``), so tokens survive a restart."""
    state = request.app.state
    key = getattr(state, "fal_storage_key", None)
    if key is None:
        path = Path(get_settings(request).data_dir) / "fal_storage.key"
        try:
            key = bytes.fromhex(path.read_text().strip())
        except (OSError, ValueError):
            key = secrets.token_bytes(32)
            path.parent.mkdir(parents=True, exist_ok=True)
            fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o600)
            with os.fdopen(fd, "w") as f:
                f.write(key.hex())
        state.fal_storage_key = key
    return key


def _sign(request: Request, *parts: str) -> str:
    return hmac.new(_secret(request), "|".join(parts).encode(), hashlib.sha256).hexdigest()


def _make_token(request: Request) -> tuple[str, float]:
    exp = int(time.time() + TOKEN_TTL)
    return f"v1.{exp}.{_sign(request, 'cdn', str(exp))}", exp


def _token_ok(request: Request, token: str) -> bool:
    try:
        v, exp, sig = token.split(".")
        if v != "v1" or int(exp) < time.time():
            return False
    except ValueError:
        return False
    return hmac.compare_digest(sig, _sign(request, "cdn", exp))


def _key_denied(request: Request) -> JSONResponse | None:
    """The server's key policy and the key's rate limit, answered the fal way (401 / 429 + Retry-After)."""
    from .fal import _denied

    return _denied(request)


def _err(detail: str, status: int) -> JSONResponse:
    return JSONResponse({"detail": detail}, status_code=status)


async def _read_image(request: Request) -> tuple[bytes, Probed] | JSONResponse:
    """Body -> (bytes, what the header says), under the input byte cap; images only."""
    from ccsr.imaging import ImageError

    settings = get_settings(request)
    limit = settings.max_input_bytes
    declared = request.headers.get("content-length")
    if declared and declared.isdigit() and int(declared) > limit:
        return _err(f"file is larger than {limit} bytes", 413)
    data = await request.body()
    if len(data) > limit:
        return _err(f"file is larger than {limit} bytes", 413)
    try:
        return data, await asyncio.to_thread(probe, data, limits_of(settings))
    except ImageError as e:
        return _err(f"only images can be stored here: {e.message}", 415)


def _ttl(request: Request) -> float | None:
    """``X-Fal-Object-Lifecycle: {"expiration_duration_seconds": N}`` -> TTL within the server's bounds."""
    settings = get_settings(request)
    raw = request.headers.get("x-fal-object-lifecycle")
    if not raw:
        return None
    try:
        n = float(json.loads(raw).get("expiration_duration_seconds"))
    except (ValueError, TypeError, AttributeError):
        return None
    return max(settings.min_ttl, min(n, settings.image_ttl))


@router.post("/storage/auth/token", include_in_schema=False)
async def auth_token(request: Request):
    if (denied := _key_denied(request)) is not None:
        return denied
    token, exp = _make_token(request)
    return {
        "token": token,
        "token_type": "Bearer",
        "base_url": public_base(request),
        "expires_at": _dt.datetime.fromtimestamp(exp, _dt.timezone.utc).isoformat(),
    }


@router.post("/files/upload", include_in_schema=False)
async def files_upload(request: Request):
    scheme, _, token = (request.headers.get("authorization") or "").partition(" ")
    if not (scheme.lower() == "bearer" and _token_ok(request, token.strip())) and (
        denied := _key_denied(request)
    ) is not None:
        return denied
    got = await _read_image(request)
    if isinstance(got, JSONResponse):
        return got
    data, p = got
    rec = get_engine(request).images.put(
        data, content_type=p.content_type, extension=p.extension, width=p.width, height=p.height,
        ttl=_ttl(request), kind="input",
    )
    return {
        "access_url": image_url(public_base(request), rec.id, rec.extension),
        "content_type": p.content_type,
        "file_name": request.headers.get("x-fal-file-name") or rec.filename,
        "file_size": rec.size,
    }


@router.post("/storage/upload/initiate", include_in_schema=False)
async def upload_initiate(request: Request):
    if (denied := _key_denied(request)) is not None:
        return denied
    try:
        body = json.loads(await request.body() or b"{}")
        declared = formats.of_content_type(str(body.get("content_type") or ""))
    except (ValueError, AttributeError):
        return _err("invalid JSON body", 422)
    upload_id = str(uuid.uuid4())
    exp = str(int(time.time() + UPLOAD_URL_TTL))
    base = public_base(request)
    sig = _sign(request, "put", upload_id, exp)
    return {
        "upload_url": f"{base}/storage/upload/{upload_id}?expires={exp}&signature={sig}",
        "file_url": image_url(base, upload_id, declared.extension if declared else "png"),
    }


@router.put("/storage/upload/{upload_id}", include_in_schema=False)
async def upload_put(request: Request, upload_id: str):
    exp = request.query_params.get("expires") or ""
    sig = request.query_params.get("signature") or ""
    try:
        upload_id = str(uuid.UUID(upload_id))
        fresh = int(exp) >= time.time()
    except ValueError:
        return _err("Not found", 404)
    if not (fresh and hmac.compare_digest(sig, _sign(request, "put", upload_id, exp))):
        return _err("invalid or expired upload URL", 403)
    got = await _read_image(request)
    if isinstance(got, JSONResponse):
        return got
    data, p = got
    get_engine(request).images.put(
        data, content_type=p.content_type, extension=p.extension, width=p.width, height=p.height,
        image_id=upload_id, kind="input",
    )
    return JSONResponse({}, status_code=200)
