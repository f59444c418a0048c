"""The ``fal-ai/ccsr`` and ``fal-ai/ccsr-v2`` app schemas (input, output, errors, queue status, stream events,
webhook body), independent of HTTP routing and of the job engine: a request body in, a job or a refusal out as
the wire shows it.

Ranges and defaults mirror fal's model page (shared/docs/hosted/001_*.txt); errors mirror what a FastAPI/fal
app answers (protocols.md B.4): HTTP 422 with ``{"detail": [{"loc": ["body", field], "msg", "type", ...}]}`` for
input, ``{"detail": str, "error_type": str}`` plus ``X-Fal-Error-Type`` for the request (:func:`refusal` renders
every neutral refusal of the intake this way).
"""

from __future__ import annotations

import datetime as _dt
import math
import secrets
from dataclasses import dataclass, field
from typing import Any, Literal

from pydantic import BaseModel, ConfigDict, Field, ValidationError

from ccsr.jobs import CANCELLED, PROCESSING, QUEUED, SUCCESS, ErrorCode, Job, QueueFull
from ccsr.params import ParamError, UpscaleParams
from ccsr.presets import V2_DEFAULT_PRESET, V2_PRESETS

from .app import image_url
from .auth import Denied
from .intake import RETRY_AFTER_S, IntakeError, shown

__all__ = [
    "ERROR_DOCS",
    "REFUSALS",
    "Answer",
    "CCSRInput",
    "CCSRv2Input",
    "FalInputError",
    "error_of",
    "fal_error",
    "finite",
    "image_output",
    "job_error",
    "output_of",
    "parse_input",
    "progress_event",
    "refusal",
    "request_urls",
    "status_body",
    "to_params",
    "webhook_payload",
]

ERROR_DOCS = "https://docs.fal.ai/errors"
SEED_RANGE = 2**32  # drawn seeds stay in the 32-bit range every other CCSR front-end accepts


class CCSRInput(BaseModel):
    """Input of ``fal-ai/ccsr``. Unknown fields are ignored, as a FastAPI app does."""

    model_config = ConfigDict(extra="ignore")

    image_url: str = Field(description="The URL or data URI of the image to upscale.")
    scale: float = Field(2, ge=1, le=4, description="The scale of the output image.")
    tile_diffusion: Literal["none", "mix", "gaussian"] = Field(
        "none",
        description="If specified, a patch-based sampling strategy will be used for sampling. (ccsr: when no "
        "tiling field is given, tiling is chosen from free memory: none whenever the image fits.)",
    )
    tile_diffusion_size: int = Field(1024, ge=256, le=2048, description="Size of patch.")
    tile_diffusion_stride: int = Field(512, ge=128, le=1024, description="Stride of sliding patch.")
    tile_vae: bool = Field(False, description="Patch-based VAE decoding.")
    tile_vae_decoder_size: int = Field(226, ge=64, le=2048, description="Size of VAE patch.")
    tile_vae_encoder_size: int = Field(1024, ge=128, le=2048, description="Size of latent image.")
    steps: int = Field(50, ge=10, le=100, description="The number of steps to run the model for.")
    t_max: float = Field(0.6667, ge=0, le=1, description="The ending point of uniform sampling strategy.")
    t_min: float = Field(0.3333, ge=0, le=1, description="The starting point of uniform sampling strategy.")
    color_fix_type: Literal["none", "wavelet", "adain"] = Field(
        "adain", description="Type of color correction for samples."
    )
    seed: int | None = Field(None, description="Seed for reproducibility.")


_V2 = V2_PRESETS[V2_DEFAULT_PRESET]


class CCSRv2Input(BaseModel):
    """Input of ``fal-ai/ccsr-v2`` (ccsr's own endpoint: fal hosts no CCSR-v2). Defaults are the model's (the
    reference's one-step script); a field left out takes the model's default. Unknown fields are ignored."""

    model_config = ConfigDict(extra="ignore")

    image_url: str = Field(description="The URL or data URI of the image to upscale.")
    scale: int = Field(int(_V2["scale"]), ge=1, le=4, description="The (whole) scale of the output image.")
    steps: int = Field(_V2["steps"], ge=1, le=100, description="Schedule length; 1: one evaluation (one-step). "
                       "The two-step preset: steps 6, t_max 0.6667, t_min 0.5, cfg_scale 4.5.")
    t_max: float = Field(_V2["t_max"], ge=0, le=1, description="The start of the sampled part of the schedule.")
    t_min: float = Field(_V2["t_min"], ge=0, le=1, description="Where sampling stops and x0 is taken.")
    cfg_scale: float = Field(_V2["cfg_scale"], ge=0, le=30, description="Classifier-free guidance; on above 1.")
    prompt: str = Field(_V2["prompt"], max_length=3000, description="Added prompt.")
    negative_prompt: str = Field(_V2["negative_prompt"], max_length=3000, description="Negative prompt (CFG).")
    color_fix_type: Literal["none", "wavelet", "adain"] = Field(
        _V2["color_fix"], description="Type of color correction for samples."
    )
    process_size: int = Field(_V2["process_size"], ge=64, le=4096,
                              description="Inputs below process_size / scale are enlarged first.")
    start_point: Literal["lr", "noise"] = Field(
        _V2["start_point"], description="lr: the input's latent diffused to start_steps; noise: pure noise.")
    start_steps: int = Field(_V2["start_steps"], ge=0, le=999, description="The initial step's timestep.")
    tile_diffusion: Literal["none", "gaussian"] = Field(
        "none", description="Patch-based sampling (ccsr: when no tiling field is given, tiling is chosen from "
        "free memory: none whenever the image fits).")
    tile_diffusion_size: int = Field(1024, ge=256, le=2048, description="Size of patch.")
    tile_diffusion_stride: int = Field(512, ge=128, le=1024, description="Stride of sliding patch.")
    tile_vae: bool = Field(False, description="Patch-based VAE decoding.")
    tile_vae_decoder_size: int = Field(226, ge=64, le=2048, description="Size of VAE patch.")
    tile_vae_encoder_size: int = Field(1024, ge=128, le=2048, description="Size of VAE encoder patch.")
    seed: int | None = Field(None, description="Seed for reproducibility.")


FAL_INPUTS: dict[str, type[BaseModel]] = {"ccsr-v1": CCSRInput, "ccsr-v2": CCSRv2Input}  # by model name
V2_FIELDS = {"steps": "steps", "t_max": "t_max", "t_min": "t_min", "cfg_scale": "cfg_scale", "prompt": "prompt",
             "negative_prompt": "negative_prompt", "color_fix_type": "color_fix", "process_size": "process_size",
             "start_point": "start_point", "start_steps": "start_steps", "scale": "scale"}  # fal -> UpscaleParams


# UpscaleParams field -> fal field, for pointing a ParamError at the name the client sent.
_PARAM_TO_FAL = {"color_fix": "color_fix_type"}


class FalInputError(Exception):
    """A request the app rejects: ``status`` plus a FastAPI-style ``detail`` (a list of error objects)."""

    def __init__(self, detail: list[dict], status: int = 422):
        super().__init__(detail[0].get("msg") if detail else "invalid input")
        self.detail = detail
        self.status = status

    def body(self) -> dict:
        return {"detail": self.detail}


def fal_error(field: str | None, msg: str, type_: str, input_: Any = None, ctx: dict | None = None) -> dict:
    """One fal error object (docs.fal.ai/errors): ``loc``, ``msg``, ``type``, ``url``, ``ctx``, ``input``."""
    err: dict[str, Any] = {
        "loc": ["body", field] if field else ["body"],
        "msg": msg,
        "type": type_,
        "url": f"{ERROR_DOCS}#{type_}",
    }
    if ctx:
        err["ctx"] = ctx
    if input_ is not None:
        err["input"] = input_
    return err


def _jsonable(v: Any) -> Any:
    if v is None or isinstance(v, str | int | float | bool):
        return v
    if isinstance(v, list | tuple):
        return [_jsonable(x) for x in v]
    if isinstance(v, dict):
        return {str(k): _jsonable(x) for k, x in v.items()}
    return str(v)


def _validation_detail(exc: ValidationError) -> list[dict]:
    """pydantic errors the way FastAPI renders them: ``loc`` prefixed with ``"body"``, no pydantic ``url``."""
    out = []
    for e in exc.errors(include_url=False):
        d = {
            "type": e["type"],
            "loc": ["body", *e["loc"]],
            "msg": e["msg"],
            "input": _jsonable(e.get("input")),
        }
        if e.get("ctx"):
            d["ctx"] = _jsonable(e["ctx"])
        out.append(d)
    return out


def parse_input(data: Any, model: str = "ccsr-v1") -> BaseModel:
    """A decoded JSON body (see :func:`ccsr.api.intake.load_json`) -> the ``model``'s input
    (:class:`CCSRInput`, :class:`CCSRv2Input`), else :class:`FalInputError` (422)."""
    if data is None:
        raise FalInputError([{"type": "missing", "loc": ["body"], "msg": "Field required", "input": None}])
    try:
        return FAL_INPUTS[model].model_validate(data)
    except ValidationError as e:
        raise FalInputError(_validation_detail(e)) from None


def draw_seed() -> int:
    return secrets.randbelow(SEED_RANGE)


def _tiling(inp: Any) -> dict[str, object]:
    """Tiling the request chose keeps fal's meaning (and fal's defaults for the sizes it left out); tiling it
    left out entirely is planned from free memory, which is fal's default ("none") whenever that fits."""
    given = inp.model_fields_set
    out: dict[str, object] = {}
    if "tile_diffusion" in given or "tile_diffusion_size" in given or "tile_diffusion_stride" in given:
        out.update(tile_diffusion=inp.tile_diffusion, tile_diffusion_size=inp.tile_diffusion_size // 8 * 8,
                   tile_diffusion_stride=inp.tile_diffusion_stride // 8 * 8)
    if "tile_vae" in given or "tile_vae_decoder_size" in given:
        out.update(tile_vae=inp.tile_vae, tile_vae_decoder_size=inp.tile_vae_decoder_size)
    return out


def to_params(inp: Any, model: Any, settings: Any) -> UpscaleParams:
    """Map a fal input onto the ``model``'s :class:`UpscaleParams` (:meth:`ccsr.api.intake.Model.params`: the
    server's ``--size-mode``/``--default-steps`` under the model's defaults under the request; seed drawn when
    absent); range errors become 422.

    ``fal-ai/ccsr`` sends every field with fal's defaults (``--default-steps`` applies only when the request
    gives no ``steps``); ``fal-ai/ccsr-v2`` sends the fields given, the model's defaults fill the rest.
    Tile sizes/strides are floored to a multiple of 8: the reference divides them by 8 into latent units
    (model.md 4.1), so e.g. 300 and 296 are the same tile, and fal accepts any integer in range.
    """
    given: dict[str, object] = {"seed": inp.seed if inp.seed is not None else draw_seed(),
                                "tile_vae_encoder_size": inp.tile_vae_encoder_size, **_tiling(inp)}
    if isinstance(inp, CCSRv2Input):
        given.update({V2_FIELDS[k]: getattr(inp, k) for k in inp.model_fields_set if k in V2_FIELDS})
    else:
        given.update(scale=float(inp.scale), t_max=inp.t_max, t_min=inp.t_min, color_fix=inp.color_fix_type)
        if not settings.default_steps or "steps" in inp.model_fields_set:
            given["steps"] = inp.steps
    try:
        return model.params(given, settings)
    except ParamError as e:
        field = _PARAM_TO_FAL.get(e.field, e.field)
        value = getattr(inp, field, None)
        raise FalInputError([fal_error(field, e.message, "value_error", value)]) from None


def image_output(
    url: str, content_type: str, file_name: str, file_size: int, width: int, height: int, seed: int
) -> dict:
    """The ``fal-ai/ccsr`` output object."""
    return {
        "image": {
            "url": url,
            "content_type": content_type,
            "file_name": file_name,
            "file_size": int(file_size),
            "width": int(width),
            "height": int(height),
        },
        "seed": int(seed),
    }


# ============================================================================================ job -> wire

LOG_SOURCE = "user"


def finite(value: Any) -> Any:
    """JSON has no NaN/Infinity: an echoed input such as ``"scale": Infinity`` is shown as a string."""
    if isinstance(value, float) and not math.isfinite(value):
        return str(value)
    if isinstance(value, dict):
        return {k: finite(v) for k, v in value.items()}
    if isinstance(value, (list, tuple)):
        return [finite(v) for v in value]
    return value


def iso_time(ts: float | None) -> str | None:
    """fal's timestamps: naive ISO 8601 in UTC."""
    if ts is None:
        return None
    return _dt.datetime.fromtimestamp(ts, _dt.timezone.utc).replace(tzinfo=None).isoformat()


def logs_of(job: Job) -> list[dict]:
    """The job's log lines as fal log entries."""
    return [
        {"message": ln.message, "level": ln.level, "source": LOG_SOURCE, "timestamp": iso_time(ln.timestamp)}
        for ln in job.logs
    ]


def output_of(job: Job) -> dict:
    """A successful job as the app's output object."""
    r = job.result
    assert r is not None
    base = job.meta.get("base") or ""
    name = f"{r.image_id}.{r.extension}"
    seed = r.seed if r.seed is not None else job.params.seed
    return image_output(
        image_url(base, r.image_id, r.extension), r.content_type, name, r.size, r.width, r.height, seed
    )


# neutral ErrorCode -> (HTTP status, fal error type) for request errors (``{"detail": str}``)
REQUEST_ERRORS = {
    ErrorCode.CANCELLED: (499, "client_cancelled"),
    ErrorCode.TIMEOUT: (504, "request_timeout"),
    ErrorCode.INTERRUPTED: (503, "runner_disconnected"),
    ErrorCode.INFERENCE_FAILED: (500, "internal_error"),
    ErrorCode.INTERNAL: (500, "internal_error"),
}


def error_of(job: Job) -> tuple[int, Any, str]:
    """(HTTP status, ``detail`` body value, error_type) of a failed or cancelled job."""
    err = job.error
    code = err.code if err else (ErrorCode.CANCELLED if job.status == CANCELLED else ErrorCode.INTERNAL)
    message = err.message if err else ""
    if job.status == CANCELLED or code == ErrorCode.CANCELLED:
        return 499, "Request cancelled by the client", "client_cancelled"
    if code in (ErrorCode.INVALID_INPUT, ErrorCode.INPUT_MISSING):
        url = job.meta.get("image_url_shown")
        return (
            422,
            [fal_error("image_url", f"Failed to load the image: {message}", "image_load_error", url)],
            "image_load_error",
        )
    if code == ErrorCode.INVALID_PARAMS:
        return 422, [fal_error(None, message, "value_error")], "value_error"
    status, etype = REQUEST_ERRORS.get(code, (500, "internal_error"))
    detail = "Internal Server Error" if status == 500 else message or etype
    return status, detail, etype


def status_body(job: Job, position: int | None, with_logs: bool, urls: dict | None) -> tuple[dict, int]:
    """The queue status of ``job`` (``position``: its place in the queue) and the HTTP status it goes with."""
    logs = logs_of(job) if with_logs else None
    if job.status == QUEUED:
        body: dict[str, Any] = {"status": "IN_QUEUE", "queue_position": 0 if position is None else position}
        code = 202
    elif job.status == PROCESSING:
        body = {"status": "IN_PROGRESS", "logs": logs}
        code = 202
    else:
        body = {"status": "COMPLETED", "logs": logs}
        if job.result is not None:
            body["metrics"] = {"inference_time": job.result.inference_seconds}
        else:
            body["metrics"] = {}
        if job.status != SUCCESS:
            status, detail, etype = error_of(job)
            body["error"] = detail if isinstance(detail, str) else f"Invalid status code: {status}"
            body["error_type"] = etype
        code = 200
    if urls:
        body.update(urls)
    body["request_id"] = job.id
    return body, code


def request_urls(base: str, request_id: str) -> dict:
    """Where a queued request is found again, under ``base`` (``…/queue/<app id>``)."""
    r = f"{base}/requests/{request_id}"
    return {"response_url": r, "status_url": f"{r}/status", "cancel_url": f"{r}/cancel"}


def webhook_payload(job: Job) -> dict:
    """fal's webhook body (protocols.md B.1): OK + output, or ERROR + the error body."""
    base = {"request_id": job.id, "gateway_request_id": job.id}
    if job.status == SUCCESS:
        return {**base, "status": "OK", "payload": output_of(job), "error": None}
    status, detail, etype = error_of(job)
    payload: dict[str, Any] = {"detail": detail}
    if not isinstance(detail, list):
        payload["error_type"] = etype
    return {**base, "status": "ERROR", "error": f"Invalid status code: {status}", "payload": payload}


def progress_event(job: Job, position: int | None) -> dict:
    """A progress event of the stream run mode (``POST /{app}/stream``): the job's queue status, its logs so far
    (queued too) and ``progress``, the percent of the run done."""
    body, _ = status_body(job, position, False, None)
    return {**body, "logs": logs_of(job), "progress": int(job.progress)}


# ============================================================================================ refusals -> wire


@dataclass(frozen=True)
class Answer:
    """One fal answer before routing: HTTP status, JSON body and headers (the router adds the request id)."""

    status: int
    body: Any
    headers: dict[str, str] = field(default_factory=dict)


REFUSALS = (FalInputError, IntakeError, Denied, QueueFull, ParamError)  # what :func:`refusal` renders
INPUT_HEADERS = {"x-fal-billable-units": "0", "x-fal-retryable": "false"}
UNAUTHORIZED = "Unauthorized: invalid or missing key (Authorization: Key <FAL_KEY>)"
REQUEST_REFUSALS = {  # neutral refusal kind -> (HTTP status, fal error type) of a request error
    "model_unknown": (404, "model_not_loaded"),
    "model_not_loaded": (404, "model_not_loaded"),
    "unavailable": (503, "service_unavailable"),
    "timeout": (504, "request_timeout"),
    "start_timeout": (504, "startup_timeout"),
    "client_gone": (499, "client_disconnected"),
    "job_missing": (500, "internal_error"),
}
IMAGE_KINDS = frozenset({"image_unreadable", "image_missing", "image_url_refused", "image_fetch", "image_invalid"})
# image refusal kind -> fal model error type (docs.fal.ai/errors); the imaging code refines image_invalid
IMAGE_ERROR_TYPES = {"image_missing": "file_download_error", "image_url_refused": "file_download_error",
                     "image_fetch": "file_download_error"}
IMAGE_REASON_TYPES = {"too_large_bytes": "file_too_large", "too_many_pixels": "image_too_large"}


def request_error(detail: str, status: int, error_type: str | None, retryable: bool = False,
                  headers: dict[str, str] | None = None) -> Answer:
    """fal "request errors": ``{"detail": str, "error_type": str}`` plus ``X-Fal-Error-Type``."""
    body: dict[str, Any] = {"detail": detail}
    h = {"x-fal-retryable": "true" if retryable else "false", **(headers or {})}
    if error_type:
        body["error_type"] = error_type
        h["x-fal-error-type"] = error_type
    return Answer(status, body, h)


def image_refusal(e: IntakeError, image_url: Any) -> Exception:
    """An input image the intake refused (or whose output would pass the server's cap: fal promises the exact
    ``scale x input`` size) as fal's 422 on ``image_url``; any other refusal unchanged."""
    if e.kind == "output_too_large":
        return FalInputError([fal_error("image_url", e.message, "image_too_large", None, e.details)])
    if e.kind not in IMAGE_KINDS:
        return e
    etype = IMAGE_ERROR_TYPES.get(e.kind) or IMAGE_REASON_TYPES.get(e.reason or "", "image_load_error")
    lead = "Failed to download the file" if etype == "file_download_error" else "Failed to load the image"
    ctx = {"reason": e.reason} if e.reason else None
    shown_url = shown(image_url) if isinstance(image_url, str) else None
    return FalInputError([fal_error("image_url", f"{lead}: {e.message}", etype, shown_url, ctx)])


def refusal(e: Exception) -> Answer:
    """Any of :data:`REFUSALS` (the intake's, admission's, the queue's, the parameters') in fal's shape."""
    if isinstance(e, FalInputError):
        return Answer(e.status, e.body(), dict(INPUT_HEADERS))
    if isinstance(e, ParamError):
        return refusal(FalInputError([fal_error(e.field, e.message, "value_error")]))
    if isinstance(e, Denied):
        if e.status == 429:
            return request_error(e.message, 429, "rate_limited", True, e.headers())
        return request_error(UNAUTHORIZED, 401, None)
    if isinstance(e, QueueFull):  # the queue, or the caller's quota
        return request_error(str(e), 429, "rate_limited", True, {"Retry-After": "1"})
    assert isinstance(e, IntakeError), e
    if e.kind == "url_refused":  # a callback URL (fal_webhook)
        where = ["query", e.where or "fal_webhook"]
        return refusal(FalInputError([{"loc": where, "msg": e.message, "type": "value_error", **e.details}]))
    if (image := image_refusal(e, None)) is not e:
        return refusal(image)
    if e.kind not in REQUEST_REFUSALS:  # the body (the limits middleware answers most of these before any route)
        detail = {"type": "json_invalid", "loc": ["body"], "msg": "JSON decode error", "input": {}}
        return refusal(FalInputError([detail | {"ctx": {"error": e.message}}]))
    status, etype = REQUEST_REFUSALS[e.kind]
    headers = {"Retry-After": str(RETRY_AFTER_S)} if e.kind == "unavailable" else {}
    if e.kind == "start_timeout":
        headers["x-fal-request-timeout-type"] = "user"  # the client's own bound: not retried
    return request_error(e.message, status, etype, e.kind == "unavailable", headers)


def job_error(job: Job) -> Answer:
    """The result answer of a failed or cancelled job."""
    status, detail, etype = error_of(job)
    if isinstance(detail, list):
        return Answer(status, {"detail": detail}, {**INPUT_HEADERS, "x-fal-error-type": etype})
    return request_error(detail, status, etype, status in (503, 504))
