"""The web playground at ``/``: one static page (``static/``) that drives the server's own public APIs.

The page uploads with the Runware ``imageUpload`` task, upscales through the fal queue API (or the Runware task
API when prompts, CFG or the ControlNet weight are set, which only Runware accepts) and downloads from
``/images``. What the public protocols lack, this router adds under ``/playground/``:

- ``GET /playground/models``: the models served, each with its fal app id, Runware model, load status (and
  error) and its form: parameters with help text, ranges and the server's defaults. The page has no defaults
  of its own.
- ``GET /playground/config``: server-wide limits and whether a key is needed.
- ``GET /playground/events/{request_id}``: Server-Sent Events with status, percent, queue position, ETA and the
  planned tiling of a fal ``request_id`` or a Runware ``taskUUID``, so the page needs no polling of its own.
- ``POST /playground/cancel/{request_id}``: cancel for Runware tasks (its protocol has no cancel task).

Auth follows the server's key policy (``Authorization: Bearer|Key <key>``; loopback only without keys).
"""

from __future__ import annotations

import json
import time
from collections.abc import AsyncIterator
from pathlib import Path

from fastapi import APIRouter, Request
from fastapi.concurrency import run_in_threadpool
from fastapi.responses import FileResponse, JSONResponse, Response, StreamingResponse

from ccsr.jobs import PROCESSING, QUEUED, SUCCESS, Job, JobEngine
from ccsr.params import UpscaleParams

from .app import get_engine, get_settings, model_readiness
from .auth import Denied
from .fal_schema import CCSRInput, CCSRv2Input
from .intake import MODELS, admit

__all__ = ["router"]

STATIC_DIR = Path(__file__).with_name("static")
STATIC_TYPES = {
    "app.js": "text/javascript; charset=utf-8",
    "favicon.svg": "image/svg+xml",
    "style.css": "text/css; charset=utf-8",
}
POLL_SECONDS = 0.2  # how often a stream looks at a running job (the engine only signals terminal states)
KEEPALIVE_SECONDS = 15.0  # a comment line so proxies do not close an idle stream
PLAN_PREFIX = "plan: "  # how CCSRPipeline.run logs the plan it runs

router = APIRouter(include_in_schema=False)


def _denied(request: Request) -> JSONResponse | None:
    """Admission (:func:`ccsr.api.intake.admit`): None when admitted, else the 401/429 answer."""
    try:
        admit(request)
    except Denied as e:
        detail = "invalid or missing API key (Authorization: Bearer <key>)" if e.status == 401 else e.message
        return JSONResponse({"detail": detail}, e.status, headers=e.headers())
    return None


def _find_job(engine: JobEngine, request_id: str) -> Job | None:
    """A fal ``request_id`` is the job id; a Runware ``taskUUID`` is its idempotency key."""
    return engine.get(request_id) or engine.get_by_key(f"runware:{request_id}")


# ------------------------------------------------------------------------------------------ page


@router.get("/")
async def index() -> FileResponse:
    return FileResponse(
        STATIC_DIR / "index.html", media_type="text/html; charset=utf-8", headers={"Cache-Control": "no-cache"}
    )


@router.get("/playground/static/{name}")
async def static_file(name: str) -> Response:
    media_type = STATIC_TYPES.get(name)
    if media_type is None:
        return JSONResponse({"detail": "not found"}, 404)
    return FileResponse(STATIC_DIR / name, media_type=media_type, headers={"Cache-Control": "no-cache"})


@router.get("/favicon.ico")
async def favicon() -> FileResponse:
    """Browsers ask for ``/favicon.ico`` on every page; the page also links the same icon."""
    return FileResponse(STATIC_DIR / "favicon.svg", media_type=STATIC_TYPES["favicon.svg"])


@router.get("/playground/config")
async def config(request: Request) -> dict:
    """Server-wide facts the page needs: limits and whether requests need a key."""
    settings = get_settings(request)
    return {
        "limits": {"max_input_bytes": settings.max_input_bytes, "max_output_side": settings.max_output_side},
        "keys_required": settings.keys_required(),
    }


@router.get("/playground/models")
async def models(request: Request) -> list[dict]:
    """The models this server runs, each with its API names, load status and form parameters (defaults from
    the server): the page builds its form from this, so a second model (one more entry, with its own
    parameter list) needs no page change."""
    settings = get_settings(request)
    engine = get_engine(request)
    readiness = await run_in_threadpool(model_readiness, engine, settings)
    forms = {"ccsr-v1": lambda m: v1_parameters(m.params({}, settings), steps_from_server=bool(settings.default_steps)),
             "ccsr-v2": lambda m: v2_parameters(m.params({}, settings))}
    return [
        {
            "name": m.title,
            "fal_app_id": m.fal_app_id,
            "runware_model": m.runware_ids[0],
            "status": readiness[m.name]["status"],
            "error": engine.load_error,
            "parameters": forms[m.name](m),
        }
        for m in MODELS if m.name in readiness
    ]


def v1_parameters(defaults: UpscaleParams, *, steps_from_server: bool = False) -> list[dict]:
    """The CCSR-v1 form: ranges from the fal schema (the API checks them), defaults from ``defaults``.

    Each entry: ``name`` (the fal field, or the Runware setting), ``api`` (``both``, ``fal`` or ``runware``:
    which API takes it), ``group`` (``main``, ``tiling``, ``advanced``), ``title``, ``help`` (what changing it
    does), ``type``, ``default``; ``null`` as a value means "left out: the server decides". Optional:
    ``minimum``, ``maximum``, ``maxLength``, ``empty`` (what an empty field means), ``options`` (``[{value,
    label}]``) and ``needs`` (``{field: [values]}``: the field only applies, and is only sent, when another field
    has one of those values).
    ``tile_vae_encoder_size`` is left out: CCSR-v1 never runs the VAE encoder (the hint comes from its own
    condition encoder), so the reference ignores it too (model.md section 5).
    """
    fal = CCSRInput.model_json_schema()["properties"]

    def ranged(name: str) -> dict:
        return {k: fal[name][k] for k in ("minimum", "maximum") if k in fal[name]}

    if steps_from_server:
        steps_why = "the one this server was started with (--default-steps)"
    else:
        steps_why = (
            "the reference CCSR's, as in the CLI and the library; fal's hosted API, and this server's fal "
            "endpoint when a request leaves steps out, use 50"
        )
    return [
        {
            "name": "scale", "api": "both", "group": "main", "title": "Scale", "type": "number",
            "default": defaults.scale, **ranged("scale"),
            "help": "How many times larger each side of the output is. Time grows with the output's pixels "
            "(4x takes about 4 times as long as 2x).",
        },
        {
            "name": "steps", "api": "both", "group": "main", "title": "Steps", "type": "integer",
            "default": defaults.steps, **ranged("steps"),
            "help": "Length of the noise schedule; only the steps between t_min and t_max run the network "
            f"(45: 16 evaluations, 100: 35), so time grows with it. The default is {steps_why}.",
        },
        {
            "name": "seed", "api": "both", "group": "main", "title": "Seed", "type": "integer",
            "default": defaults.seed, "minimum": 0, "empty": "random",
            "help": "The same seed with the same settings gives the same image. Empty: a new random seed each "
            "run (shown with the result, to reuse).",
        },
        {
            "name": "color_fix_type", "api": "fal", "group": "main", "title": "Colour correction",
            "type": "string", "default": defaults.color_fix,
            "options": [{"value": v, "label": v} for v in fal["color_fix_type"]["enum"]],
            "help": "Pulls the result's colours back to the input's. adain matches each channel's mean and "
            "contrast; wavelet keeps the input's smooth colour layer (try it if adain shifts colours); none "
            "keeps the model's own colours.",
        },
        {
            "name": "t_max", "api": "fal", "group": "main", "title": "Start of sampling (t_max)",
            "type": "number", "default": defaults.t_max, **ranged("t_max"),
            "help": "How much noise the input is given before sampling (fraction of the schedule). Higher "
            "invents more new detail and strays further from the input; lower stays closer to it.",
        },
        {
            "name": "t_min", "api": "fal", "group": "main", "title": "End of sampling (t_min)",
            "type": "number", "default": defaults.t_min, **ranged("t_min"),
            "help": "Where step-by-step sampling stops and the model jumps to the clean image in one step. "
            "Lower runs more steps (more texture, slower, more variation between seeds); higher is faster "
            "and smoother. At most t_max.",
        },
        {
            "name": "tile_diffusion", "api": "fal", "group": "tiling", "title": "Diffusion tiles",
            "type": "string", "default": None,
            "options": [{"value": None, "label": "automatic"}]
            + [{"value": v, "label": v} for v in fal["tile_diffusion"]["enum"]],
            "help": "Automatic: the server plans tiles from its free memory, none whenever the image fits "
            "(the reference's exact path). mix (tiles averaged) or gaussian (tile centres weigh more) force "
            "overlapping tiles, for large images or little memory; none forces one pass.",
        },
        {
            "name": "tile_diffusion_size", "api": "fal", "group": "tiling", "title": "Tile size",
            "type": "integer", "default": None, **ranged("tile_diffusion_size"),
            "needs": {"tile_diffusion": ["mix", "gaussian"]}, "empty": str(fal["tile_diffusion_size"]["default"]),
            "help": "Side of each tile in output pixels. Larger tiles: fewer seams, more memory. Empty: fal's "
            "default.",
        },
        {
            "name": "tile_diffusion_stride", "api": "fal", "group": "tiling", "title": "Tile stride",
            "type": "integer", "default": None, **ranged("tile_diffusion_stride"),
            "needs": {"tile_diffusion": ["mix", "gaussian"]}, "empty": str(fal["tile_diffusion_stride"]["default"]),
            "help": "Distance between tile starts; below the tile size so that tiles overlap and seams "
            "blend. Smaller: more tiles, slower. Empty: fal's default.",
        },
        {
            "name": "tile_vae", "api": "fal", "group": "tiling", "title": "VAE decode",
            "type": "boolean", "default": None,
            "options": [
                {"value": None, "label": "automatic"},
                {"value": False, "label": "whole"},
                {"value": True, "label": "tiled"},
            ],
            "help": "How the VAE turns the result into pixels. Automatic: whole when it fits, else in tiles. "
            "Tiled needs less memory and takes a little longer.",
        },
        {
            "name": "tile_vae_decoder_size", "api": "fal", "group": "tiling", "title": "VAE decoder tile size",
            "type": "integer", "default": None, **ranged("tile_vae_decoder_size"),
            "needs": {"tile_vae": [True]}, "empty": str(fal["tile_vae_decoder_size"]["default"]),
            "help": "Side of each decoder tile in latent pixels (8 output pixels each: 226 is about 1800 px). "
            "Smaller needs less memory. Empty: fal's default.",
        },
        # Runware only; ranges as ccsr.api.runware checks them
        {
            "name": "positivePrompt", "api": "runware", "group": "advanced", "title": "Prompt", "type": "text",
            "default": defaults.prompt, "maxLength": 3000,
            "help": "Words for what the image shows (e.g. \"sharp photo, detailed fur\") to steer the invented "
            "detail. Empty: the model works from the image alone.",
        },
        {
            "name": "negativePrompt", "api": "runware", "group": "advanced", "title": "Negative prompt",
            "type": "text", "default": defaults.negative_prompt, "maxLength": 3000,
            "help": "What to steer away from (e.g. \"blurry, noisy\"). Only used when CFG scale is not 1.",
        },
        {
            "name": "CFGScale", "api": "runware", "group": "advanced", "title": "CFG scale", "type": "number",
            "default": defaults.cfg_scale, "minimum": 0, "maximum": 30,
            "help": "How hard the prompts steer. 1 turns guidance off; above 1 every step runs the network "
            "twice (about twice the time).",
        },
        {
            "name": "controlNetWeight", "api": "runware", "group": "advanced", "title": "ControlNet weight",
            "type": "number", "default": defaults.controlnet_weight, "minimum": 0, "maximum": 2,
            "help": "How strongly the input image holds the result: lower lets the model invent more, higher "
            "keeps closer to the input. 1 is the reference's.",
        },
    ]  # fmt: skip


def v2_parameters(defaults: UpscaleParams) -> list[dict]:
    """The CCSR-v2 form (``fal-ai/ccsr-v2``): ranges from its fal schema, defaults the model's (``defaults``).
    Every field goes to the fal endpoint (it takes prompts and CFG too), so the page never switches to
    Runware for this model. Entries as in :func:`v1_parameters`."""
    fal = CCSRv2Input.model_json_schema()["properties"]

    def ranged(name: str) -> dict:
        return {k: fal[name][k] for k in ("minimum", "maximum", "maxLength") if k in fal[name]}

    def options(name: str) -> list[dict]:
        return [{"value": v, "label": v} for v in fal[name]["enum"]]

    return [
        {
            "name": "scale", "api": "both", "group": "main", "title": "Scale", "type": "integer",
            "default": int(defaults.scale), **ranged("scale"),
            "help": "How many times larger each side of the output is (a whole factor for CCSR-v2).",
        },
        {
            "name": "steps", "api": "both", "group": "main", "title": "Steps", "type": "integer",
            "default": defaults.steps, **ranged("steps"),
            "help": "Schedule length. 1 (the default, one-step): one network evaluation. The two-step preset "
            "is steps 6, t_max 0.6667, t_min 0.5, CFG 4.5: two evaluations.",
        },
        {
            "name": "seed", "api": "both", "group": "main", "title": "Seed", "type": "integer",
            "default": defaults.seed, "minimum": 0, "empty": "random",
            "help": "The same seed with the same settings gives the same image. Empty: a new random seed each "
            "run (shown with the result, to reuse).",
        },
        {
            "name": "color_fix_type", "api": "fal", "group": "main", "title": "Colour correction",
            "type": "string", "default": defaults.color_fix, "options": options("color_fix_type"),
            "help": "Pulls the result's colours back to the input's (adain: each channel's mean and contrast; "
            "wavelet: the input's smooth colour layer; none: the model's own colours).",
        },
        {
            "name": "t_max", "api": "fal", "group": "main", "title": "Start of sampling (t_max)",
            "type": "number", "default": defaults.t_max, **ranged("t_max"),
            "help": "Where the sampled part of the schedule starts (fraction of it); used when steps > 1.",
        },
        {
            "name": "t_min", "api": "fal", "group": "main", "title": "End of sampling (t_min)",
            "type": "number", "default": defaults.t_min, **ranged("t_min"),
            "help": "Where sampling stops and the clean image is taken; higher runs fewer evaluations.",
        },
        {
            "name": "process_size", "api": "fal", "group": "advanced", "title": "Process size",
            "type": "integer", "default": defaults.process_size, **ranged("process_size"),
            "help": "Inputs smaller than process size / scale are enlarged first (more detail, more time).",
        },
        {
            "name": "start_point", "api": "fal", "group": "advanced", "title": "Start point", "type": "string",
            "default": defaults.start_point, "options": options("start_point"),
            "help": "lr: start from the input's latent diffused to the start step (the reference's); noise: "
            "from pure noise.",
        },
        {
            "name": "start_steps", "api": "fal", "group": "advanced", "title": "Start step", "type": "integer",
            "default": defaults.start_steps, **ranged("start_steps"),
            "help": "The timestep of the first evaluation (999: the end of the schedule).",
        },
        {
            "name": "prompt", "api": "fal", "group": "advanced", "title": "Prompt", "type": "text",
            "default": defaults.prompt, **ranged("prompt"),
            "help": "Words that steer the invented detail; the default is the reference's added prompt.",
        },
        {
            "name": "negative_prompt", "api": "fal", "group": "advanced", "title": "Negative prompt",
            "type": "text", "default": defaults.negative_prompt, **ranged("negative_prompt"),
            "help": "What to steer away from; used when CFG scale is above 1.",
        },
        {
            "name": "cfg_scale", "api": "fal", "group": "advanced", "title": "CFG scale", "type": "number",
            "default": defaults.cfg_scale, **ranged("cfg_scale"),
            "help": "How hard the prompts steer; above 1 each evaluation runs the network twice.",
        },
        {
            "name": "tile_diffusion", "api": "fal", "group": "tiling", "title": "Diffusion tiles",
            "type": "string", "default": None,
            "options": [{"value": None, "label": "automatic"}, *options("tile_diffusion")],
            "help": "Automatic: planned from free memory, none whenever the image fits (the reference's path). "
            "gaussian forces overlapping tiles.",
        },
        {
            "name": "tile_vae", "api": "fal", "group": "tiling", "title": "VAE decode", "type": "boolean",
            "default": None,
            "options": [
                {"value": None, "label": "automatic"},
                {"value": False, "label": "whole"},
                {"value": True, "label": "tiled"},
            ],
            "help": "Automatic: whole when it fits, else in tiles.",
        },
    ]  # fmt: skip


# ------------------------------------------------------------------------------------------ progress


def snapshot(job: Job, engine: JobEngine, now: float | None = None) -> dict:
    """What the page shows of a job: status, percent, queue position, elapsed and remaining seconds, and the
    tiling the server planned (from the job's log: ``CCSRPipeline.run`` logs each plan it runs)."""
    now = time.time() if now is None else now
    snap: dict = {"status": job.status, "progress": 100 if job.status == SUCCESS else int(job.progress)}
    if job.status == QUEUED:
        snap["queue_position"] = engine.queue_position(job.id)
    if job.started_at is not None:
        elapsed = (job.finished_at or now) - job.started_at
        snap["elapsed"] = round(max(0.0, elapsed), 1)
        if job.status == PROCESSING and job.progress > 0:
            snap["eta"] = round(elapsed * (100 - job.progress) / job.progress, 1)
    if job.logs:
        snap["message"] = job.logs[-1].message
    plans = [line.message for line in job.logs if line.message.startswith(PLAN_PREFIX)]
    if plans:  # the last one ran (the pipeline plans again after running out of memory)
        snap["plan"] = plans[-1].removeprefix(PLAN_PREFIX)
    if job.error is not None:
        snap["error"] = {"code": job.error.code, "message": job.error.message}
    return snap


def _event(name: str, data: dict) -> str:
    return f"event: {name}\ndata: {json.dumps(data)}\n\n"


async def _events(request: Request, engine: JobEngine, job_id: str) -> AsyncIterator[str]:
    last: dict | None = None
    quiet_since = time.monotonic()
    while True:
        job = await run_in_threadpool(engine.get, job_id)
        if job is None:
            yield _event("gone", {"detail": "the request no longer exists"})
            return
        snap = await run_in_threadpool(snapshot, job, engine)
        # elapsed/eta change every tick; send when what the user reads changes
        key = {k: v for k, v in snap.items() if k not in ("elapsed", "eta")}
        if key != last:
            last = key
            quiet_since = time.monotonic()
            yield _event("done" if job.done else "progress", snap)
        elif time.monotonic() - quiet_since > KEEPALIVE_SECONDS:
            quiet_since = time.monotonic()
            yield ": keep-alive\n\n"
        if job.done or await request.is_disconnected():
            return
        await engine.wait(job_id, timeout=POLL_SECONDS, poll=POLL_SECONDS)


@router.get("/playground/events/{request_id}")
async def events(request: Request, request_id: str) -> Response:
    """``text/event-stream`` of ``progress`` events, then one ``done`` event (or ``gone``)."""
    if (denied := _denied(request)) is not None:
        return denied
    engine = get_engine(request)
    job = await run_in_threadpool(_find_job, engine, request_id)
    if job is None:
        return JSONResponse({"detail": "Request not found"}, 404)
    return StreamingResponse(
        _events(request, engine, job.id),
        media_type="text/event-stream",
        headers={"Cache-Control": "no-cache", "X-Accel-Buffering": "no"},
    )


@router.post("/playground/cancel/{request_id}")
async def cancel(request: Request, request_id: str) -> JSONResponse:
    if (denied := _denied(request)) is not None:
        return denied
    engine = get_engine(request)
    job = await run_in_threadpool(_find_job, engine, request_id)
    if job is None:
        return JSONResponse({"detail": "Request not found"}, 404)
    job = await run_in_threadpool(engine.cancel, job.id)
    return JSONResponse({"status": job.status, "cancel_requested": job.cancel_requested})
