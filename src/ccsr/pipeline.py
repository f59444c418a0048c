"""CCSRPipeline: image in, image out, with the reference's pre/post-processing around the CCSR-v1 sampler."""

from __future__ import annotations

import random
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import torch
from PIL import Image

from ccsr.colorfix import color_fix
from ccsr.geometry import Geometry, Picture, finish, plan_geometry, prepare, size_of
from ccsr.model import CCSRModel, ModelDescriptor, load_model
from ccsr.params import UpscaleParams
from ccsr.sampling.ccsr_v1 import StepRecord, Tiling, sample_ccsr_v1
from ccsr.sampling.denoiser import CCSRDenoiser
from ccsr.sampling.schedule import SpacedSchedule, truncated_plan
from ccsr.sampling.tiles import sliding_windows

Tensor = torch.Tensor
Progress = Callable[[int, int], None]


class Cancelled(RuntimeError):
    """``should_cancel`` returned True between two network evaluations."""


@dataclass
class UpscaleOutput:
    image: Image.Image  # 8-bit RGB at the target size, quantised exactly as the reference
    final: np.ndarray  # float32 HxWx3 in [0, 1] at the target size
    processed: np.ndarray  # float32 HxWx3 in [0, 1] at the processing size (the fixtures' output_float)
    seed: int
    geometry: Geometry
    timings: dict[str, float] = field(default_factory=dict)
    evaluations: int = 0


def default_device() -> torch.device:
    if torch.cuda.is_available():
        return torch.device("cuda")
    if getattr(torch.backends, "mps", None) and torch.backends.mps.is_available():
        return torch.device("mps")
    return torch.device("cpu")


def default_dtype(device: torch.device) -> torch.dtype:
    return torch.float16 if device.type == "cuda" else torch.float32


DTYPES = {"float32": torch.float32, "fp32": torch.float32, "float16": torch.float16, "fp16": torch.float16,
          "bfloat16": torch.bfloat16, "bf16": torch.bfloat16}


def parse_dtype(dtype: str | torch.dtype | None, device: torch.device) -> torch.dtype:
    if dtype is None or dtype == "auto":
        return default_dtype(device)
    if isinstance(dtype, torch.dtype):
        return dtype
    if dtype not in DTYPES:
        raise ValueError(f"unknown dtype {dtype!r} (expected one of {', '.join(DTYPES)})")
    return DTYPES[dtype]


class CCSRPipeline:
    """CCSR-v1 upscaling. ``run`` is the full interface; calling the pipeline returns just the image."""

    def __init__(self, model: CCSRModel, device: str | torch.device | None = None,
                 dtype: str | torch.dtype | None = None):
        self.device = torch.device(device) if device is not None else default_device()
        self.dtype = parse_dtype(dtype, self.device)
        # The SD VAE overflows in fp16 at large sizes; bf16 has fp32's range and is safe.
        self.vae_dtype = torch.float32 if self.dtype == torch.float16 else self.dtype
        self.model = model.to(self.device, self.dtype, self.vae_dtype)

    @classmethod
    def from_single_file(cls, path: str | Path | None = None, config: str | Path | None = None,
                         device: str | torch.device | None = None,
                         dtype: str | torch.dtype | None = None) -> CCSRPipeline:
        """Load an original CCSR checkpoint (.ckpt / .safetensors, local or ``hf://``) or a converted folder."""
        return cls(load_model(path, config), device=device, dtype=dtype)

    from_pretrained = from_single_file

    @property
    def descriptor(self) -> ModelDescriptor:
        return self.model.descriptor

    def __call__(self, image: Picture, progress: Progress | None = None, **params: object) -> Image.Image:
        return self.run(image, UpscaleParams(**params), progress=progress).image  # type: ignore[arg-type]

    # -- the upscale ------------------------------------------------------------------------------------------

    def geometry(self, size: tuple[int, int], p: UpscaleParams) -> Geometry:
        tiled = p.tile_diffusion != "none"
        return plan_geometry(
            size, p.scale, mode=p.size_mode,
            min_side=p.tile_diffusion_size if tiled else 512,
            add_block=p.tile_diffusion == "gaussian" or p.tile_vae,
            multiple=self.descriptor.size_multiple,
            min_pad_size=self.descriptor.min_tile_latent * self.descriptor.latent_factor,
        )

    def tiling(self, latent_hw: tuple[int, int], p: UpscaleParams) -> Tiling | None:
        if p.tile_diffusion == "none":
            return None
        f = self.descriptor.latent_factor
        tile = max(p.tile_diffusion_size // f, 1)
        stride = max(p.tile_diffusion_stride // f, 1)
        return Tiling(sliding_windows(*latent_hw, tile, stride), p.tile_diffusion)  # type: ignore[arg-type]

    def evaluations(self, size: tuple[int, int], p: UpscaleParams) -> int:
        """Network evaluations (tiles x steps) an upscale of ``size`` will make: the progress total."""
        g = self.geometry(size, p)
        f = self.descriptor.latent_factor
        tiling = self.tiling((g.process[1] // f, g.process[0] // f), p)
        plan = truncated_plan(SpacedSchedule.make(p.steps), p.t_max, p.t_min)
        return plan.evaluations * (1 if tiling is None else len(tiling.windows))

    @torch.no_grad()
    def run(
        self,
        image: Picture,
        params: UpscaleParams | None = None,
        *,
        progress: Progress | None = None,
        should_cancel: Callable[[], bool] | None = None,
        on_step: Callable[[StepRecord], None] | None = None,
    ) -> UpscaleOutput:
        p = (params or UpscaleParams()).validate()
        seed = p.seed if p.seed is not None else random.randrange(2**32)
        timings: dict[str, float] = {}
        t0 = time.perf_counter()
        cfg = self.model.config
        g = self.geometry(size_of(image), p)
        cond_np = prepare(image, g)
        cond = torch.from_numpy(cond_np).permute(2, 0, 1)[None].contiguous().to(self.device)
        f = self.descriptor.latent_factor
        latent_shape = (1, cfg.latent_channels, g.process[1] // f, g.process[0] // f)
        timings["preprocess"] = time.perf_counter() - t0

        # Every random draw comes from one CPU generator in the reference's order, with the full latent's shape,
        # so a seed gives the same image on every device (up to kernel differences).
        gen = torch.Generator("cpu").manual_seed(seed)

        def noise() -> Tensor:
            return torch.randn(latent_shape, generator=gen, dtype=torch.float32).to(self.device)

        t1 = time.perf_counter()
        text = self.model.text
        context = text.encode(p.prompt).to(self.dtype)
        uncond = text.encode(p.negative_prompt).to(self.dtype) if p.cfg_scale != 1.0 else None
        timings["text"] = time.perf_counter() - t1

        schedule = SpacedSchedule.make(p.steps, cfg.linear_start, cfg.linear_end, cfg.num_timesteps)
        plan = truncated_plan(schedule, p.t_max, p.t_min)
        tiling = self.tiling(latent_shape[2:], p)
        denoiser = CCSRDenoiser(
            self.model.unet, self.model.controlnet, self.model.cond_encoder, cond, context,
            uncond_context=uncond, cfg_scale=p.cfg_scale, control_scale=p.controlnet_weight, latent_factor=f,
        )

        def tick(done: int, total: int) -> None:
            if progress is not None:
                progress(done, total)
            if should_cancel is not None and should_cancel():
                raise Cancelled("cancelled")

        if should_cancel is not None and should_cancel():
            raise Cancelled("cancelled")
        t2 = time.perf_counter()
        x_T = noise()
        z0 = sample_ccsr_v1(denoiser, x_T, schedule, plan, noise, tiling=tiling, progress=tick, on_step=on_step)
        denoiser.drop_hints()
        timings["sample"] = time.perf_counter() - t2

        t3 = time.perf_counter()
        pixels = self._decode(z0, cond, p, tiling)
        processed = pixels.clamp(0, 1)[0].permute(1, 2, 0).float().cpu().numpy()
        timings["decode"] = time.perf_counter() - t3
        img8, final = finish(processed, g)
        timings["total"] = time.perf_counter() - t0
        n_eval = plan.evaluations * (1 if tiling is None else len(tiling.windows))
        return UpscaleOutput(img8, final, processed, seed, g, timings, n_eval)

    def _decode_latent(self, z: Tensor, p: UpscaleParams) -> Tensor:
        vae = self.model.vae
        z = (z * (1.0 / self.model.config.scale_factor)).to(self.vae_dtype)
        if p.tile_vae:
            from ccsr.vae import tiled_decode

            out = tiled_decode(vae, z, p.tile_vae_decoder_size)
        else:
            out = vae.decode(z).sample
        return (out.float() + 1) / 2

    def _decode(self, z0: Tensor, cond: Tensor, p: UpscaleParams, tiling: Tiling | None) -> Tensor:
        if tiling is None or tiling.blend == "gaussian":
            return color_fix(self._decode_latent(z0, p), cond, p.color_fix)
        # "mix": every tile decoded and colour-fixed on its own, then averaged in pixel space.
        f = self.descriptor.latent_factor
        acc = torch.zeros_like(cond)
        # Overlap counts are small integers: one float32 plane divides exactly as the reference's int64 volume.
        count = torch.zeros((1, 1, *cond.shape[2:]), dtype=torch.float32, device=cond.device)
        for win in tiling.windows:
            rows, cols = win.latent()
            prow, pcol = win.pixels(f)
            tile = self._decode_latent(z0[:, :, rows, cols], p)
            acc[:, :, prow, pcol] += color_fix(tile, cond[:, :, prow, pcol], p.color_fix)
            count[:, :, prow, pcol] += 1
        return acc.div_(count)
