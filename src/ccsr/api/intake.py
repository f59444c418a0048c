"""The protocol-neutral intake under the Runware and fal adapters: what both protocols do with a request between
their wire schemas. Callers are admitted (:func:`admit`: key policy and rate limit); bodies and frames are read
under bounds (:func:`load_json`); image references are resolved, downloaded on a bounded pool
(:class:`FetchPool`), probed by header and stored once (:class:`ImageIntake`); jobs are submitted with the
caller's quota counted by the store (:func:`submit`); :data:`MODELS` maps the protocols' model ids to the
pipeline a job runs. What follows a submission (finding, following, announcing jobs) is :mod:`ccsr.api.jobs_view`.

Everything here raises :class:`IntakeError`, a neutral refusal (``kind`` + message) that each adapter renders in
its own protocol's shape; nothing here knows a wire format.

JSON is read by :func:`load_json`, bounded before any Python-level work: the number of structural bytes
(``[``, ``{``, ``,``) is counted at C speed first, so a body of millions of tiny elements is refused without being
materialised; the C parser then reads what is left (its own recursion guard turns pathological nesting into
"too deep"); integers longer than any field accepts are read as infinities (every numeric range refuses them,
nothing converts them); finally one walk over the (bounded) tree checks the depth limit and that every string
is valid Unicode text (``"\\ud800"`` is legal JSON but cannot be encoded, logged or stored).
"""

from __future__ import annotations

import asyncio
import base64
import binascii
import dataclasses
import functools
import json
import math
from collections.abc import Mapping
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from typing import Any
from urllib.parse import unquote_to_bytes, urlsplit

from ccsr import imaging
from ccsr.imaging import formats
from ccsr.imaging.decode import open_image
from ccsr.jobs import Job, JobSpec, StoredImage
from ccsr.params import ParamError, UpscaleParams
from ccsr.presets import V2_DEFAULT_PRESET, V2_PRESETS

from .auth import Principal
from .images import parse_image_ref

MAX_JSON_ITEMS = 1 << 18  # structural bytes per body: 16 tasks of 3,000-comma prompts stay well inside
MAX_INT_DIGITS = 40  # longer integer literals are out of every accepted range (seeds need 19 digits)
INLINE_BYTES = 1 << 16  # larger bodies are parsed off the event loop


@dataclass(frozen=True)
class Model:
    """A model this server can run, the ids each protocol names it by, and the parameters it pins."""

    name: str  # the pipeline the job runs (``ccsr serve --model NAME[=WEIGHTS]``)
    title: str  # as the model names itself (``ModelDescriptor.name``)
    runware_ids: tuple[str, ...]  # Runware ``model`` values (AIR ids)
    fal_app_id: str  # fal endpoint, ``owner/alias``
    # its own defaults, over the server's (--size-mode, --default-steps) and UpscaleParams'; a request's win
    defaults: Mapping[str, object] = dataclasses.field(default_factory=dict)
    integer_scale: bool = False  # only whole upscale factors

    def params(self, given: Mapping[str, object], settings) -> UpscaleParams:
        """UpscaleParams' defaults < the server's < the model's < ``given`` (the request's fields), validated;
        raises :class:`~ccsr.params.ParamError` with the field's name."""
        server: dict[str, object] = {"size_mode": settings.size_mode}
        if settings.default_steps:
            server["steps"] = settings.default_steps
        params = UpscaleParams(**{**server, **self.defaults, **given}).validate()  # type: ignore[arg-type]
        if self.integer_scale and not float(params.scale).is_integer():
            raise ParamError("scale", f"{self.title} takes a whole upscale factor (1, 2, 3, 4)")
        return params


V2_DEFAULTS: dict[str, object] = {**V2_PRESETS[V2_DEFAULT_PRESET], "size_mode": "reference"}
MODELS: tuple[Model, ...] = (  # every model a server may load; `ccsr serve --model` picks those it does
    Model("ccsr-v1", "CCSR-v1", ("runware:501@1", "ccsr"), "fal-ai/ccsr"),
    Model("ccsr-v2", "CCSR-v2", ("ccsr:2@1", "ccsr-v2"), "fal-ai/ccsr-v2", V2_DEFAULTS, integer_scale=True),
)
MODELS_BY_NAME = {m.name: m for m in MODELS}


def served_model(settings, *, runware_id: str | None = None, fal_app_id: str | None = None) -> Model:
    """The model a request names (by its Runware id or fal app id), if this server loads it; else
    :class:`IntakeError` ``model_unknown`` or ``model_not_loaded``."""
    wanted = runware_id if runware_id is not None else fal_app_id
    model = next((m for m in MODELS if runware_id in m.runware_ids or m.fal_app_id == fal_app_id), None)
    if model is None:
        raise IntakeError("model_unknown", f"model {wanted!r} is not served here")
    if model.name not in settings.served_models():
        flag = "--model ccsr-v1" if model.name == "ccsr-v1" else f"--model {model.name}=FOLDER"
        raise IntakeError("model_not_loaded", f"model {wanted!r} ({model.title}) is not loaded on this server "
                          f"(it serves {', '.join(settings.served_models())}; start it with {flag})")
    return model


class IntakeError(Exception):
    """A request refused by the intake, in neutral words each adapter renders in its protocol's shape.

    ``kind``: body: ``too_large``, ``too_deep``, ``too_many_items``, ``bad_json``, ``bad_text``; images:
    ``image_unreadable`` (not a reference, bad base64), ``image_missing`` (unknown or expired id),
    ``image_url_refused`` (scheme or address not allowed), ``image_fetch`` (the download failed),
    ``image_invalid`` (not an accepted image); callbacks: ``url_refused`` (a webhook the SSRF rules refuse);
    ``output_too_large`` (the output would pass the server's cap); models: ``model_unknown`` (no such id),
    ``model_not_loaded`` (known, not loaded here); following a job (:mod:`ccsr.api.jobs_view`): ``timeout``,
    ``start_timeout`` (still queued too long), ``client_gone``, ``job_missing``; server: ``unavailable``
    (retry later).
    ``where``: the field (``inputs.image``) or JSON path (``[0].settings.seed``) concerned, when one is;
    ``reason``: the imaging or fetch error code behind an image refusal (``too_many_pixels``, ``timeout``);
    ``details``: the values behind it (``max_width``, ``input_width``, the refused URL as ``input``)."""

    def __init__(self, kind: str, message: str, where: str | None = None, reason: str | None = None,
                 details: Mapping[str, Any] | None = None):
        super().__init__(message)
        self.kind = kind
        self.message = message
        self.where = where
        self.reason = reason
        self.details = dict(details or {})


def _bounded_int(literal: str) -> int | float:
    if len(literal) - literal.startswith("-") <= MAX_INT_DIGITS:
        return int(literal)
    return -math.inf if literal.startswith("-") else math.inf


def _path(parts: tuple) -> str:
    return "".join(f"[{p}]" if isinstance(p, int) else f".{p}" for p in parts).lstrip(".") or "(body)"


def _is_text(s: str) -> bool:
    if s.isascii():
        return True
    try:
        s.encode("utf-8")
    except UnicodeEncodeError:
        return False
    return True


def _check_tree(value: Any, max_depth: int) -> None:
    stack: list[tuple[Any, int, tuple]] = [(value, 0, ())]
    while stack:
        node, depth, where = stack.pop()
        if isinstance(node, str):
            if not _is_text(node):
                msg = f"{_path(where)} is not valid Unicode text (a lone surrogate)"
                raise IntakeError("bad_text", msg, _path(where))
            continue
        if isinstance(node, dict):
            if depth + 1 > max_depth:
                raise IntakeError("too_deep", f"JSON nested deeper than {max_depth}")
            for k, v in node.items():
                if not _is_text(k):
                    raise IntakeError("bad_text", f"a key in {_path(where)} is not valid Unicode text", _path(where))
                stack.append((v, depth + 1, (*where, k)))
        elif isinstance(node, list):
            if depth + 1 > max_depth:
                raise IntakeError("too_deep", f"JSON nested deeper than {max_depth}")
            stack.extend((v, depth + 1, (*where, i)) for i, v in enumerate(node))


def load_json(raw: bytes | str, *, max_depth: int) -> Any:
    """Parse one JSON text under the intake's bounds; raises :class:`IntakeError`."""
    items = raw.count(b"[" if isinstance(raw, bytes) else "[")
    items += raw.count(b"{" if isinstance(raw, bytes) else "{")
    items += raw.count(b"," if isinstance(raw, bytes) else ",")
    if items > MAX_JSON_ITEMS:
        raise IntakeError("too_many_items", f"JSON with over {MAX_JSON_ITEMS} elements")
    try:
        text = raw.decode("utf-8") if isinstance(raw, bytes) else raw  # strict: JSON is UTF-8 (RFC 8259)
        value = json.loads(text, parse_int=_bounded_int)
    except RecursionError:
        raise IntakeError("too_deep", f"JSON nested deeper than {max_depth}") from None
    except UnicodeDecodeError as e:
        raise IntakeError("bad_json", f"the body is not UTF-8 text (byte {e.start})") from None
    except ValueError as e:  # JSONDecodeError is a ValueError
        raise IntakeError("bad_json", f"the body is not JSON: {e}") from None
    _check_tree(value, max_depth)
    return value


async def _offload(size: int, fn, *args):
    """``fn(*args)`` on the event loop for small inputs (no thread hop), off it for large ones (``/healthz`` and
    every other request keep being answered)."""
    return fn(*args) if size <= INLINE_BYTES else await asyncio.to_thread(fn, *args)


async def load_json_async(raw: bytes | str, *, max_depth: int) -> Any:
    """:func:`load_json`, off the event loop for large inputs."""
    return await _offload(len(raw), functools.partial(load_json, max_depth=max_depth), raw)


UNAVAILABLE = "the job store cannot be reached right now; retry later"  # never the store's own message
RETRY_AFTER_S = 5  # what an outage answer asks the client to wait


STATE_KEY = "ccsr.json"  # where the limits middleware leaves a parsed body (or its IntakeError) in the scope


async def request_json(request) -> Any:
    """The request's JSON body, parsed once under the intake's bounds; raises :class:`IntakeError`."""
    state = request.scope.setdefault("state", {})
    if STATE_KEY not in state:
        try:
            state[STATE_KEY] = await load_json_async(
                await request.body() or b"null", max_depth=request.app.state.settings.max_json_depth
            )
        except IntakeError as e:
            state[STATE_KEY] = e
    value = state[STATE_KEY]
    if isinstance(value, IntakeError):
        raise value
    return value


# ----------------------------------------------------------------------------------------------- images

@dataclass(frozen=True)
class Probed:
    content_type: str
    extension: str
    width: int
    height: int


def limits_of(settings) -> imaging.Limits:
    return imaging.Limits(max_input_bytes=settings.max_input_bytes, fetch_timeout=settings.fetch_timeout)


def probe(data: bytes, limits: imaging.Limits) -> Probed:
    """Format and size from the header only, under ``limits`` (format allow-list, byte and pixel caps,
    animation); the pixels are decoded once, by the job. Raises :class:`ccsr.imaging.ImageError`."""
    im = open_image(data, limits)
    fmt = formats.BY_NAME[im.format]  # the decoder opened it as one of ``limits.formats``
    return Probed(fmt.content_type, fmt.extension, int(im.width), int(im.height))


class FetchPool:
    """Input-image downloads on threads of their own: slow image hosts queue behind each other, never in
    front of the server's other work. A download waits at most ``fetch_timeout`` for a free thread, then
    runs under the fetcher's own total time limit."""

    def __init__(self, workers: int):
        self.workers = workers
        self._executor = ThreadPoolExecutor(workers, thread_name_prefix="ccsr-fetch")
        self._slots = asyncio.Semaphore(workers)

    async def fetch(self, url: str, limits: imaging.Limits, allow_hosts: frozenset[str]) -> bytes:
        try:
            await asyncio.wait_for(self._slots.acquire(), limits.fetch_timeout)
        except asyncio.TimeoutError:
            raise imaging.FetchError("timeout", "every image download slot is busy; try again") from None
        try:
            loop = asyncio.get_running_loop()
            job = functools.partial(imaging.fetch_image, url, limits, allow_hosts=allow_hosts)
            return await loop.run_in_executor(self._executor, job)
        finally:
            self._slots.release()

    def close(self) -> None:
        self._executor.shutdown(wait=False, cancel_futures=True)


BASE64_CHUNK = 1 << 20  # characters decoded per call (a multiple of 4): each holds the GIL for ~7 ms, not ~0.35 s


def decode_base64(text: str) -> bytes:
    """Standard or URL-safe base64, whitespace and missing padding tolerated; ValueError otherwise. Cleaned and
    decoded a chunk at a time (never a whole-string copy or scan in one call), so that a maximum-size upload decoding
    on a worker thread stalls the event loop (``/healthz``, other requests) for one chunk at most."""
    end = text.find("=")  # the padding: only "=" and whitespace may follow it
    if end < 0:
        end = len(text)
    elif len(text) - end > 64 or "".join(text[end:].split()).strip("="):
        raise ValueError("data after the base64 padding")
    alt = b"-_" if (text.find("-", 0, end) >= 0 or text.find("_", 0, end) >= 0) else None
    out, carry = bytearray(), ""
    try:
        for start in range(0, end, BASE64_CHUNK):
            piece = carry + "".join(text[start : min(start + BASE64_CHUNK, end)].split())
            cut = len(piece) - len(piece) % 4
            out += base64.b64decode(piece[:cut], altchars=alt, validate=True)
            carry = piece[cut:]
        if carry:
            out += base64.b64decode(carry + "=" * (-len(carry) % 4), altchars=alt, validate=True)
    except (binascii.Error, ValueError) as e:
        raise ValueError(str(e)) from None
    return bytes(out)


def decode_data_uri(uri: str) -> bytes:
    """``data:[<type>][;base64],<payload>``; ValueError when malformed."""
    head, sep, payload = uri.partition(",")
    if not sep:
        raise ValueError("malformed data URI (no comma)")
    if head.lower().endswith(";base64"):
        return decode_base64(payload)
    return unquote_to_bytes(payload)


def shown(ref: str) -> str:
    """A reference as echoed in errors: data URIs can be megabytes long."""
    return ref if len(ref) <= 200 else ref[:200] + "..."


@dataclass
class ImageIntake:
    """Image references of one request -> records in the image store: fetched through the bounded pool under
    ``imaging.Limits``, probed by header, stored once. ``own_hosts``: the ``host[:port]`` forms under which
    this server hands out image URLs (its public URL, the request's Host); such URLs are read from the store."""

    engine: Any
    settings: Any
    fetches: FetchPool
    own_hosts: frozenset[str]

    async def resolve(self, ref: Any, where: str, *, ids: bool = True, bare_base64: bool = True) -> StoredImage:
        """``ref``: an http(s) URL, a data URI, or (when allowed) a stored image id or bare base64."""
        if not isinstance(ref, str) or not ref.strip():
            raise IntakeError("image_unreadable", f"{where} must be a non-empty string", where)
        ref = ref.strip()
        if ids and len(ref) == 36 and (image_id := parse_image_ref(ref)) is not None:
            return self._stored(image_id, where)
        if ref[:5].lower() == "data:":
            try:
                data = await _offload(len(ref), decode_data_uri, ref)
            except ValueError as e:
                raise IntakeError("image_unreadable", f"{where}: bad data URI: {e}", where) from None
        elif ref[:8].lower().startswith(("http://", "https://")):
            if (image_id := self._own_image_id(ref)) is not None:
                return self._stored(image_id, where)
            try:
                allow = frozenset(self.settings.fetch_allow_hosts)
                data = await self.fetches.fetch(ref, limits_of(self.settings), allow)
            except imaging.FetchError as e:
                kind = "image_url_refused" if e.code in ("blocked_address", "bad_url", "bad_scheme") else "image_fetch"
                raise IntakeError(kind, f"could not fetch {where}: {e.message}", where, e.code) from None
        elif "://" in ref[:16]:
            raise IntakeError("image_url_refused", f"{where}: only http(s) URLs are fetched", where, "bad_scheme")
        elif bare_base64 and len(ref) >= 16:
            try:
                data = await _offload(len(ref), decode_base64, ref)
            except ValueError:
                raise IntakeError("image_unreadable", f"{where} is neither an image id, a URL, a data URI nor "
                                  "valid base64", where) from None
        else:
            forms = "an image id, a URL, a data URI or base64" if bare_base64 else "an http(s) URL or a data URI"
            raise IntakeError("image_unreadable", f"{where} must be {forms}", where)
        try:
            p = await _offload(len(data), probe, data, limits_of(self.settings))
        except imaging.ImageError as e:
            raise IntakeError("image_invalid", f"{where}: {e.message}", where, e.code) from None
        try:
            return await _offload(
                len(data), functools.partial(self.engine.images.put, content_type=p.content_type,
                                             extension=p.extension, width=p.width, height=p.height, kind="input"),
                data,
            )
        except OSError as e:  # a full disk: the server's fault, retry later
            raise IntakeError("unavailable", f"could not store the image: {e.strerror or e}", where) from None

    def _own_image_id(self, url: str) -> str | None:
        parts = urlsplit(url)
        if parts.netloc.lower() not in self.own_hosts or "/images/" not in parts.path:
            return None
        return parse_image_ref(parts.path)

    def _stored(self, image_id: str, where: str) -> StoredImage:
        rec = self.engine.images.get(image_id)
        if rec is None:
            raise IntakeError("image_missing", f"{where}: image {image_id} is unknown or has expired; upload it "
                              "again", where)
        return rec


def image_intake(conn) -> ImageIntake:
    """The :class:`ImageIntake` of one request or WebSocket (``conn``)."""
    settings = conn.app.state.settings
    hosts = {(conn.headers.get("host") or "").lower()}
    if settings.public_url:
        hosts.add(urlsplit(settings.public_url).netloc.lower())
    return ImageIntake(conn.app.state.engine, settings, conn.app.state.fetch_pool, frozenset(hosts - {""}))


async def submit(engine, spec: JobSpec, who: Principal | None) -> tuple[Job, bool]:
    """Queue ``spec`` for ``who``: the caller's quota is counted by the job store in the same transaction as
    the queue bound (so it holds across replicas and restarts). Raises the engine's neutral errors:
    ``QueueFull`` (``QuotaFull`` for the caller's quota), ``JobConflict``, ``ParamError``."""
    if who is not None:
        spec = dataclasses.replace(spec, owner=who.id, owner_quota=who.quota)
    return await asyncio.to_thread(engine.submit, spec)


def authenticate(conn, key: str | None = None) -> Principal:
    """The caller of ``conn`` under the server's key policy: ``key``, else the ``Authorization`` header. Raises
    :class:`~ccsr.api.auth.Denied` (401). Takes no rate token: that is :func:`admit`."""
    host = conn.client.host if conn.client else None
    return conn.app.state.settings.principal(key if key is not None else request_key(conn), host)


def admit(conn, key: str | None = None) -> Principal:
    """Admission, the same for every protocol and transport: the caller (:func:`authenticate` of ``key``, checked
    on every request and every WebSocket task, so a key revoked in the keys file stops at once) and one token of its
    rate limit, from the one bucket per caller that REST, WebSocket and fal requests all draw on. Raises
    :class:`~ccsr.api.auth.Denied` (401, or 429 with its Retry-After); the caller's queue quota is counted at
    :func:`submit`."""
    who = authenticate(conn, key)
    conn.app.state.settings.admit_principal(who)
    return who


def check_output_size(size: tuple[int, int], scale: float, cap: int | None) -> None:
    """Refuse (``output_too_large``) an input whose ``scale`` x output passes ``cap`` on a side, for a protocol
    that promises the exact size (fal) rather than shrinking the input first (Runware: ``JobSpec.max_output``)."""
    w, h = imaging.output_size(size, scale)
    if cap and (w > cap or h > cap):
        details = {"max_width": cap, "max_height": cap, "input_width": size[0], "input_height": size[1]}
        raise IntakeError("output_too_large", f"The output would be {w}x{h}; this server's limit is {cap}x{cap}",
                          details=details)


def request_key(conn) -> str | None:
    """The API key of ``Authorization: Bearer <key>`` (Runware, fal) or ``Key <key>`` (fal_client)."""
    scheme, _, key = (conn.headers.get("authorization") or "").partition(" ")
    return (key.strip() or None) if scheme.lower() in ("key", "bearer") else None


def check_outbound(url: str | None, settings, where: str) -> None:
    """A URL the server will call back (webhook, upload endpoint) must pass the fetcher's SSRF rules now, at
    submit, not only at delivery: IntakeError ``url_refused`` otherwise. None passes."""
    if url is None:
        return
    try:
        imaging.check_url(url, allow_hosts=frozenset(settings.fetch_allow_hosts))
    except imaging.FetchError as e:
        raise IntakeError("url_refused", f"{where} is not allowed: {e.message}", where, e.code,
                          {"input": url}) from None
