"""The Runware task wire format, independent of HTTP and of the job engine: tasks in, replies out.

Wire rules (protocols.md A.6): every item and error carries its ``taskUUID`` and the request's own ``taskType``;
error codes come from the SDK's families (``invalid*``/``missing*``/``unsupported*`` validation,
``invalidApiKey`` auth, ``rateLimitExceeded``, ``*NotFound``/``*Expired``, ``inferenceError``/``processingFailed``
provider, ``serviceUnavailable`` server); an async ACK is exactly ``{taskType, taskUUID}``; processing items
carry the pre-allocated ``imageUUID`` and ``progress`` but no output.
"""

from __future__ import annotations

import base64
import math
import random
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any

from ccsr.imaging import formats
from ccsr.jobs import CANCELLED, ERROR, SUCCESS, ErrorCode, Job, OutputOptions
from ccsr.params import ParamError, UpscaleParams
from ccsr.presets import V2_PRESETS

from .app import image_url
from .auth import Denied
from .intake import MODELS, IntakeError, Model, served_model
from .settings import Settings

DEFAULT_MODEL = MODELS[0]  # a task without ``model``
UPSCALE_TYPES = frozenset({"upscale", "imageUpscale"})
OUTPUT_TYPES = {"url": "URL", "base64data": "base64Data", "datauri": "dataURI"}
OUTPUT_FORMATS = ("JPG", "PNG", "WEBP")  # outputFormat values: ccsr.imaging.formats by extension (JPEG too)
SETTINGS_MAP = {
    "positivePrompt": "prompt",
    "negativePrompt": "negative_prompt",
    "seed": "seed",
    "steps": "steps",
    "CFGScale": "cfg_scale",
    "controlNetWeight": "controlnet_weight",
}
V2_SETTINGS_MAP = {  # CCSR-v2's own settings (ccsr:2@1); ``settings.preset`` names a starting point (V2_PRESETS)
    "processSize": "process_size",
    "startPoint": "start_point",
    "startSteps": "start_steps",
    "tMax": "t_max",
    "tMin": "t_min",
}
PARAM_TO_FIELD = {v: f"settings.{k}" for k, v in (SETTINGS_MAP | V2_SETTINGS_MAP).items()} | {
    "scale": "upscaleFactor"}
DEFAULT_UPSCALE_FACTOR = 2  # Runware's, for a model without its own default scale

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


def task_ident(task: dict) -> tuple[str | None, str | None]:
    tt = task.get("taskType") if isinstance(task.get("taskType"), str) else None
    tu = task.get("taskUUID") if isinstance(task.get("taskUUID"), str) else None
    return tt, tu


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
    model: Model


def parse_upscale(task: dict, settings: Settings) -> UpscaleRequest:
    """Validate an upscale / imageUpscale task (no I/O); raises RWError on the first bad field."""
    model = _model(task.get("model"), settings)
    inputs = task.get("inputs")
    if inputs is not None and not isinstance(inputs, dict):
        raise RWError("invalidInputs", "inputs must be an object", parameter="inputs")
    if inputs and inputs.get("image") is not None:
        ref, param = inputs.get("image"), "inputs.image"
    elif task.get("inputImage") is not None:
        ref, param = task.get("inputImage"), "inputImage"
    else:
        raise RWError("missingInputImage", "inputs.image (or inputImage) is required", parameter="inputs.image")

    factor = task.get("upscaleFactor", model.defaults.get("scale", DEFAULT_UPSCALE_FACTOR))
    factor = _num(factor, "upscaleFactor", "invalidUpscaleFactor", lo=2, hi=4)

    ot = task.get("outputType", "URL")
    if isinstance(ot, list) and len(ot) == 1:
        ot = ot[0]
    if not isinstance(ot, str) or ot.lower() not in OUTPUT_TYPES:
        raise RWError("invalidOutputType", "outputType must be URL, base64Data or dataURI", parameter="outputType")
    ot = OUTPUT_TYPES[ot.lower()]

    of = task.get("outputFormat", "JPG")
    fmt = formats.find(of) if isinstance(of, str) else None
    if fmt is None or fmt.extension.upper() not in OUTPUT_FORMATS:
        raise RWError("invalidOutputFormat", "outputFormat must be JPG, PNG or WEBP", parameter="outputFormat")
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
    kw: dict[str, Any] = {"scale": float(factor)}
    names = SETTINGS_MAP | (V2_SETTINGS_MAP if model.name == "ccsr-v2" else {})
    for key, fname in names.items():
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
        elif key == "processSize":
            v = _num(v, pname, "invalidProcessSize", integer=True, lo=8, hi=16384)
        elif key == "startSteps":
            v = _num(v, pname, "invalidStartSteps", integer=True, lo=0, hi=999)
        elif key == "startPoint" and v not in ("lr", "noise"):
            raise RWError("invalidStartPoint", f"{pname} must be lr or noise", parameter=pname)
        elif key in ("tMax", "tMin"):
            v = float(_num(v, pname, f"invalid{key[0].upper()}{key[1:]}", lo=0, hi=1))
        kw[fname] = v
    if model.name == "ccsr-v2":
        kw = {**_preset(s.get("preset")), **kw}
    if kw.get("seed") is None:
        kw["seed"] = random.randrange(2**32)  # Runware: a random unsigned 32-bit seed when none is given
    try:
        params = model.params(kw, settings)
    except ParamError as e:
        pname = PARAM_TO_FIELD.get(e.field, e.field)
        raise RWError("invalidParameters", f"{pname}: {e.message}", parameter=pname) from e
    return UpscaleRequest(
        image_ref=ref,
        image_param=param,
        params=params,
        output_type=ot,
        output=OutputOptions(fmt.name.lower(), int(quality), float(ttl) if ttl is not None else None),
        include_cost=include_cost,
        delivery=delivery,
        webhook=urls["webhookURL"],
        upload_endpoint=urls["uploadEndpoint"],
        model=model,
    )


def _preset(name: Any) -> dict[str, object]:
    """``settings.preset`` of a CCSR-v2 task: the named starting point's parameters (the task's own fields and its
    ``upscaleFactor`` win), as ``ccsr upscale --preset``; absent, the model's defaults (the one-step preset)."""
    if name is None:
        return {}
    if not isinstance(name, str) or name not in V2_PRESETS:
        raise RWError("invalidPreset", f"settings.preset must be one of {', '.join(V2_PRESETS)}",
                      parameter="settings.preset")
    return dict(V2_PRESETS[name])


def _model(value: Any, settings: Settings) -> Model:
    """The task's ``model`` (absent: CCSR-v1) among the models this server loads; ``unsupportedModel``
    otherwise, naming the ids it does serve."""
    if value is None:
        value = DEFAULT_MODEL.runware_ids[0]
    if not isinstance(value, str):
        raise RWError("unsupportedModel", "model must be a string (an AIR id)", parameter="model")
    try:
        return served_model(settings, runware_id=value)
    except IntakeError as e:
        ids = [m.runware_ids[0] + f" ({m.title})" for m in MODELS if m.name in settings.served_models()]
        raise RWError("unsupportedModel", f"{e.message}; use {' or '.join(ids)}", parameter="model") from None


def result_reply(job: Job, read: Callable[[str], bytes | None], base: str, *, with_status: bool) -> Reply:
    """A terminal (or running) job as a Runware reply; ``read`` fetches an output image's bytes."""
    meta = job.meta
    tt, tu = meta.get("taskType", "upscale"), meta.get("taskUUID")
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
            data = read(r.image_id)
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


def auth_error(message: str) -> dict:
    return {"code": "invalidApiKey", "message": message, "parameter": "apiKey", "taskType": "authentication"}


def denied_error(e: Denied) -> dict:
    if e.status == 429:
        return {"code": "rateLimitExceeded", "message": e.message, "retryAfter": e.headers()["Retry-After"]}
    return auth_error(e.message)


def task_list(body: Any, max_tasks: int) -> list:
    """A request body or frame as its list of tasks (one object alone is a list of one); RWError otherwise.
    Authentication and ping ride along free of the ``max_tasks`` bound."""
    tasks = [body] if isinstance(body, dict) else body
    if not isinstance(tasks, list) or not tasks:
        raise RWError("invalidRequestBody", "the body must be a non-empty JSON array of tasks")
    n = sum(1 for t in tasks if not (isinstance(t, dict) and t.get("taskType") in ("authentication", "ping")))
    if n > max_tasks:
        raise RWError("invalidTaskCount", f"{n} tasks in one request; at most {max_tasks} allowed")
    return tasks


EXAMPLE = [
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
EXAMPLE_V2 = [  # CCSR-v2's two-step preset; settings.tMax / tMin / steps / CFGScale given alone reach any schedule
    {
        "taskType": "upscale",
        "taskUUID": "5c3f7e0a-2d41-4f8e-9b6a-0e7d1c2b3a49",
        "model": "ccsr:2@1",
        "inputs": {"image": "<image UUID | URL | data URI | base64>"},
        "upscaleFactor": 4,
        "outputType": "URL",
        "outputFormat": "PNG",
        "deliveryMethod": "sync",
        "settings": {"preset": "two-step", "seed": 233, "processSize": 512},
    }
]
OPENAPI = {
    "requestBody": {
        "required": True,
        "content": {
            "application/json": {
                "schema": {"type": "array", "items": {"type": "object"}},
                "examples": {"ccsr-v1": {"value": EXAMPLE}, "ccsr-v2 two-step": {"value": EXAMPLE_V2}},
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
