"""The ``fal-ai/ccsr`` app schema (input, output, errors), independent of HTTP routing and of the job engine.

Ranges and defaults mirror fal's model page (shared/docs/hosted/001_*.txt); errors mirror what a FastAPI/fal
app answers (protocols.md B.4): HTTP 422 with ``{"detail": [{"loc": ["body", field], "msg", "type", ...}]}``.
"""

from __future__ import annotations

import secrets
from typing import Any, Literal

from pydantic import BaseModel, ConfigDict, Field, ValidationError

from ccsr.params import ParamError, UpscaleParams

__all__ = [
    "ERROR_DOCS",
    "CCSRInput",
    "FalInputError",
    "fal_error",
    "image_output",
    "parse_input",
    "to_params",
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


def parse_input(data: Any) -> CCSRInput:
    """A decoded JSON body (see :func:`ccsr.api.intake.load_json`) -> :class:`CCSRInput`, else
    :class:`FalInputError` (422)."""
    if data is None:
        raise FalInputError([{"type": "missing", "loc": ["body"], "msg": "Field required", "input": None}])
    try:
        return CCSRInput.model_validate(data)
    except ValidationError as e:
        raise FalInputError(_validation_detail(e)) from None


def draw_seed() -> int:
    return secrets.randbelow(SEED_RANGE)


def _tiling(inp: CCSRInput) -> dict[str, object]:
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


def to_params(
    inp: CCSRInput, *, size_mode: str = "reference", default_steps: int | None = None
) -> UpscaleParams:
    """Map the fal input onto :class:`UpscaleParams` (seed drawn when absent); range errors become 422.

    ``size_mode`` and ``default_steps`` are server-wide options (``ccsr serve --size-mode/--default-steps``);
    ``default_steps`` applies only when the request gives no ``steps``.
    Tile sizes/strides are floored to a multiple of 8: the reference divides them by 8 into latent units
    (model.md 4.1), so e.g. 300 and 296 are the same tile, and fal accepts any integer in range.
    """
    seed = inp.seed if inp.seed is not None else draw_seed()
    steps = inp.steps if default_steps is None or "steps" in inp.model_fields_set else default_steps
    params = UpscaleParams(
        scale=float(inp.scale),
        steps=steps,
        size_mode=size_mode,  # type: ignore[arg-type]
        t_max=inp.t_max,
        t_min=inp.t_min,
        seed=seed,
        color_fix=inp.color_fix_type,
        tile_vae_encoder_size=inp.tile_vae_encoder_size,
        **_tiling(inp),
    )
    try:
        return params.validate()
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
