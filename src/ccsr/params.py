"""Upscale parameters: the one vocabulary shared by the library, the CLI and both server protocols.

Names and defaults follow the fal ``fal-ai/ccsr`` schema (the reference-compatible surface); the Runware
protocol maps its own field names onto these.
"""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass
from typing import Literal

ColorFix = Literal["adain", "wavelet", "none"]
TileDiffusion = Literal["auto", "none", "mix", "gaussian"]
SizeMode = Literal["reference", "pad"]
StartPoint = Literal["lr", "noise"]

COLOR_FIXES: tuple[str, ...] = ("adain", "wavelet", "none")
TILE_DIFFUSIONS: tuple[str, ...] = ("auto", "none", "mix", "gaussian")
SIZE_MODES: tuple[str, ...] = ("reference", "pad")
START_POINTS: tuple[str, ...] = ("lr", "noise")


class ParamError(ValueError):
    """A parameter is out of range; ``field`` names it so protocols can point at it."""

    def __init__(self, field: str, message: str):
        super().__init__(f"{field}: {message}")
        self.field = field
        self.message = message


@dataclass(frozen=True)
class UpscaleParams:
    """Everything that decides an upscale's pixels (plus the seed, which is drawn if None).

    Tiling left as ``"auto"`` / ``None`` is chosen by :mod:`ccsr.planning` from the memory the device has free:
    no tiles (the reference's exact path) whenever the image fits, otherwise the smallest change that does.
    """

    scale: float = 2.0
    steps: int = 45
    t_max: float = 0.6667
    t_min: float = 0.3333
    seed: int | None = None
    color_fix: ColorFix = "adain"
    tile_diffusion: TileDiffusion = "auto"
    tile_diffusion_size: int | None = None  # pixels; None: chosen with the tiling
    tile_diffusion_stride: int | None = None  # pixels; None: chosen with the tiling
    tile_vae: bool | None = None  # None: tiled only when the whole decode would not fit
    tile_vae_decoder_size: int | None = None  # latent pixels; None: chosen from free memory
    tile_vae_encoder_size: int = 1024
    prompt: str = ""
    negative_prompt: str = ""
    cfg_scale: float = 1.0
    controlnet_weight: float = 1.0
    size_mode: SizeMode = "reference"
    # CCSR-v2 only (CCSR-v1 ignores them): inputs below process_size / scale are enlarged first; the sampler
    # starts from the condition latent diffused to start_steps ("lr") or from pure noise ("noise")
    process_size: int = 512
    start_point: StartPoint = "lr"
    start_steps: int = 999

    def validate(self) -> UpscaleParams:
        """Raise :class:`ParamError` for the first out-of-range field; return self for chaining."""
        if not (self.scale > 0 and self.scale <= 16):
            raise ParamError("scale", "must be in (0, 16]")
        if not (1 <= self.steps <= 1000):
            raise ParamError("steps", "must be in [1, 1000]")
        if not (0.0 <= self.t_min <= 1.0) or not (0.0 < self.t_max <= 1.0):
            raise ParamError("t_max", "t_min and t_max must lie in [0, 1]")
        if self.t_min > self.t_max:
            raise ParamError("t_min", f"t_min ({self.t_min}) must not exceed t_max ({self.t_max})")
        if self.seed is not None and not (0 <= self.seed < 2**63):
            raise ParamError("seed", "must be a non-negative 63-bit integer")
        if self.color_fix not in COLOR_FIXES:
            raise ParamError("color_fix", f"must be one of {', '.join(COLOR_FIXES)}")
        if self.tile_diffusion not in TILE_DIFFUSIONS:
            raise ParamError("tile_diffusion", f"must be one of {', '.join(TILE_DIFFUSIONS)}")
        if self.size_mode not in SIZE_MODES:
            raise ParamError("size_mode", f"must be one of {', '.join(SIZE_MODES)}")
        if self.tile_diffusion_size is not None and (self.tile_diffusion_size < 64 or self.tile_diffusion_size % 8):
            raise ParamError("tile_diffusion_size", "must be a multiple of 8 and at least 64")
        if self.tile_diffusion_stride is not None and (
            self.tile_diffusion_stride < 8 or self.tile_diffusion_stride % 8
        ):
            raise ParamError("tile_diffusion_stride", "must be a multiple of 8 and at least 8")
        if self.tile_diffusion != "none" and (self.tile_diffusion_stride or 0) > (self.tile_diffusion_size or 2**31):
            raise ParamError("tile_diffusion_stride", "must not exceed tile_diffusion_size (the tiles would leave "
                             "pixels between them uncovered)")
        if self.tile_vae_decoder_size is not None and self.tile_vae_decoder_size < 8:
            raise ParamError("tile_vae_decoder_size", "must be at least 8 (latent pixels)")
        if self.tile_vae_encoder_size < 64:
            raise ParamError("tile_vae_encoder_size", "must be at least 64 (image pixels)")
        if not (0.0 <= self.cfg_scale <= 30.0):
            raise ParamError("cfg_scale", "must be in [0, 30]")
        if not (0.0 <= self.controlnet_weight <= 2.0):
            raise ParamError("controlnet_weight", "must be in [0, 2]")
        if not (8 <= self.process_size <= 16384):
            raise ParamError("process_size", "must be in [8, 16384] (pixels)")
        if self.start_point not in START_POINTS:
            raise ParamError("start_point", f"must be one of {', '.join(START_POINTS)}")
        if not (0 <= self.start_steps <= 999):
            raise ParamError("start_steps", "must be in [0, 999]")
        return self

    def replace(self, **changes: object) -> UpscaleParams:
        return dataclasses.replace(self, **changes)

    def to_dict(self) -> dict:
        return dataclasses.asdict(self)
