"""CCSRPipeline: image in, image out, with the reference's pre/post-processing around the CCSR-v1 sampler."""

from __future__ import annotations

import os
import random
import time
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import torch
from PIL import Image

from ccsr import hostmemory
from ccsr.colorfix import color_fix
from ccsr.finishing import TRUNCATE_LANCZOS, Finishing
from ccsr.geometry import Geometry, Picture, prepare_compact, size_of
from ccsr.model import CCSRModel, ModelDescriptor, load_model
from ccsr.model.v2 import is_v2_folder
from ccsr.params import UpscaleParams
from ccsr.planning import VAE_TILE_PAD, Plan, Planner, run_with_replanning
from ccsr.result import OutputType, Result, result_type
from ccsr.sampling.ccsr_v1 import StepRecord, Tiling, noise_draws, sample_ccsr_v1
from ccsr.sampling.denoiser import CCSRDenoiser
from ccsr.sampling.schedule import SpacedSchedule, truncated_plan
from ccsr.sampling.tiles import Window
from ccsr.vae import lean

Tensor = torch.Tensor
Progress = Callable[[int, int], None]


class Cancelled(RuntimeError):
    """``should_cancel`` returned True between two network evaluations."""


@dataclass
class UpscaleOutput:
    image: Image.Image | None  # 8-bit RGB at the target size, quantised exactly as the reference (None: rows to a sink)
    final: np.ndarray | None  # float32 HxWx3 in [0, 1] at the target size (None with output_type="pil")
    processed: np.ndarray | None  # float32 HxWx3 in [0, 1] at the processing size (the fixtures' output_float)
    seed: int
    geometry: Geometry
    timings: dict[str, float] = field(default_factory=dict)
    evaluations: int = 0
    plan: Plan | None = None  # the tiling that ran (automatic choices resolved)


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


def parse_bytes(text: str) -> int:
    """``"6G"``, ``"512M"``, ``"1.5GiB"`` or a plain number of bytes."""
    t = text.strip().upper().removesuffix("B").removesuffix("I")
    units = {"K": 2**10, "M": 2**20, "G": 2**30, "T": 2**40}
    try:
        return int(float(t[:-1]) * units[t[-1]]) if t and t[-1] in units else int(float(t))
    except ValueError:
        raise ValueError(f"not a memory size: {text!r} (e.g. 6G, 512M)") from None


def working_memory(max_memory: int | None) -> int | None:
    """``max_memory``, else ``$CCSR_MAX_MEMORY``, else None (the planner then takes 80 % of what is free)."""
    if max_memory is None and os.environ.get("CCSR_MAX_MEMORY"):
        return parse_bytes(os.environ["CCSR_MAX_MEMORY"])
    return max_memory


class CCSRPipeline:
    """CCSR-v1 upscaling. ``run`` is the full interface; calling the pipeline returns just the image."""

    def __init__(self, model: CCSRModel, device: str | torch.device | None = None,
                 dtype: str | torch.dtype | None = None, max_memory: int | None = None, compile: bool = False):
        """``max_memory``: bytes of working memory (beyond the weights) automatic tiling may plan for; default
        ``$CCSR_MAX_MEMORY`` or, unset, 80 % of what the device has free at each upscale. ``compile``: run the
        UNet and ControlNet through ``torch.compile`` (off by default: on the CPU the first call compiles for
        minutes, and again for every new latent shape; worth it only for a long-running worker).
        The model is moved to the device and dtype, and its VAE encoder (never run here) is freed."""
        self.device = torch.device(device) if device is not None else default_device()
        self.dtype = parse_dtype(dtype, self.device)  # what the networks run in, per the model's descriptor
        model.release_unused()
        self.model = model.to(self.device, self.dtype)
        if compile:
            self.model.unet = torch.compile(self.model.unet)  # type: ignore[assignment]
            self.model.controlnet = torch.compile(self.model.controlnet)  # type: ignore[assignment]
        self.planner = Planner(model.descriptor, self.device, self.dtype, working_memory(max_memory))

    @classmethod
    def from_single_file(cls, path: str | Path | None = None, config: str | Path | None = None,
                         device: str | torch.device | None = None, dtype: str | torch.dtype | None = None,
                         max_memory: int | None = None, compile: bool = False) -> CCSRPipeline:
        """Load an original CCSR checkpoint (.ckpt / .safetensors, local or ``hf://``) or a converted folder; a
        CCSR-v2 folder gives a :class:`ccsr.pipeline_v2.CCSRv2Pipeline` (same ``run`` contract)."""
        if path is not None and is_v2_folder(Path(path)):
            from ccsr.pipeline_v2 import CCSRv2Pipeline

            return CCSRv2Pipeline.from_pretrained(path, device=device, dtype=dtype, max_memory=max_memory)  # type: ignore[return-value]
        return cls(load_model(path, config), device=device, dtype=dtype, max_memory=max_memory, compile=compile)

    from_pretrained = from_single_file

    @property
    def descriptor(self) -> ModelDescriptor:
        return self.model.descriptor

    def __call__(self, image: Picture, progress: Progress | None = None, **params: object) -> Image.Image:
        return self.run(image, UpscaleParams(**params), progress=progress, output_type="pil").image  # type: ignore[arg-type]

    # -- the upscale ------------------------------------------------------------------------------------------

    def plan(self, size: tuple[int, int], params: UpscaleParams | None = None) -> Plan:
        """Resolve automatic tiling for an input of ``size`` (w, h) against the memory free now."""
        return self.planner.plan(size, params or UpscaleParams())

    @staticmethod
    def tiling(plan: Plan) -> Tiling | None:
        if not plan.tiles:
            return None
        return Tiling(list(plan.tiles), plan.params.tile_diffusion)  # type: ignore[arg-type]

    @torch.no_grad()
    def run(
        self,
        image: Picture,
        params: UpscaleParams | None = None,
        *,
        progress: Progress | None = None,
        should_cancel: Callable[[], bool] | None = None,
        on_step: Callable[[StepRecord], None] | None = None,
        log: Callable[[str], None] | None = None,
        output_type: OutputType = "np",
    ) -> UpscaleOutput:
        """Upscale ``image``. Tiling left automatic is planned from free memory; if the device still runs out
        of memory, the run starts again with a smaller plan (same seed, so the same noise). ``output_type``
        ``"pil"`` returns only the 8-bit image and never holds the whole float result; a row sink (such as
        ``ccsr.imaging.OutputPixels``) takes the target's rows as they are decoded, and the output's image,
        final and processed are None (``ccsr.result``)."""
        p = (params or UpscaleParams()).validate()
        make_result = result_type(output_type)  # an unknown type is refused before any work
        if p.seed is None:
            p = p.replace(seed=random.randrange(2**32))
        size = size_of(image)

        def announce(plan: Plan) -> None:
            if log is not None:
                log(f"plan: {plan.evaluations} network evaluations (tiles x steps); {plan.describe()}")

        return run_with_replanning(
            self.planner, size, self.planner.plan(size, p),
            lambda plan: self._run(image, plan, progress, should_cancel, on_step, make_result),
            device=self.device, announce=announce, log=log)

    def _run(self, image: Picture, plan: Plan, progress: Progress | None,
             should_cancel: Callable[[], bool] | None, on_step: Callable[[StepRecord], None] | None,
             make_result: Callable[[Geometry, Finishing], Result]) -> UpscaleOutput:
        p, g = plan.params, plan.geometry
        seed = int(p.seed or 0)  # run() always sets it
        timings: dict[str, float] = {}
        t0 = time.perf_counter()
        result = make_result(g, TRUNCATE_LANCZOS)  # a sink of the wrong size is refused before any work
        cfg = self.model.config
        # The condition image stays on the host (uint8 for 8-bit input); windows go to the device as needed.
        cond = Condition(prepare_compact(image, g), self.device, self.descriptor.latent_factor)
        f = self.descriptor.latent_factor
        latent_shape = (1, cfg.latent_channels, g.process[1] // f, g.process[0] // f)
        timings["preprocess"] = time.perf_counter() - t0

        noise = PreDrawnNoise(seed, latent_shape, self.device)

        t1 = time.perf_counter()
        text = self.model.text
        context = text.encode(p.prompt)
        uncond = text.encode(p.negative_prompt) if p.cfg_scale != 1.0 else None
        timings["text"] = time.perf_counter() - t1

        schedule = SpacedSchedule.make(p.steps, cfg.linear_start, cfg.linear_end, cfg.num_timesteps)
        sampling_plan = truncated_plan(schedule, p.t_max, p.t_min)
        tiling = self.tiling(plan)
        if self.device.type != "cpu":  # x_T, then the sampler's draws, in one copy to the device
            noise.draw(1 + noise_draws(sampling_plan, tiled=tiling is not None))
        denoiser = CCSRDenoiser(
            self.model.unet, self.model.controlnet, _then_trim(self.model.cond_encoder), cond.window, context,
            uncond_context=uncond, cfg_scale=p.cfg_scale, control_scale=p.controlnet_weight,
        )

        def tick(done: int, total: int) -> None:
            if tiling is not None:
                hostmemory.trim()  # else every window's transients stay in a fragmented heap (RSS grows with area)
            if progress is not None:
                progress(done, total)
            if should_cancel is not None and should_cancel():
                raise Cancelled("cancelled")

        if should_cancel is not None and should_cancel():
            raise Cancelled("cancelled")
        t2 = time.perf_counter()
        x_T = noise()
        with hostmemory.reuse_freed():  # the evaluations re-allocate the same buffers: no page faults for them
            z0 = sample_ccsr_v1(denoiser, x_T, schedule, sampling_plan, noise, tiling=tiling, progress=tick,
                                on_step=on_step)
            del denoiser, noise  # before leaving, which gives the freed pages back
        timings["sample"] = time.perf_counter() - t2

        t3 = time.perf_counter()
        for top, rows in self._decoded_rows(z0, cond, plan, tiling):
            result.write(top, rows[0].permute(1, 2, 0).numpy())  # HWC views of the host tensor
            del rows  # before the next window is decoded: a band may be freed as soon as it is written
        del cond, z0
        hostmemory.trim()
        timings["decode"] = time.perf_counter() - t3
        img8, final, processed = result.finish()
        timings["total"] = time.perf_counter() - t0
        n_eval = sampling_plan.evaluations * plan.windows
        return UpscaleOutput(img8, final, processed, seed, g, timings, n_eval, plan)

    def _decode_latent(self, z: Tensor, plan: Plan) -> Tensor:
        vae, p = self.model.vae, plan.params
        z = (z * (1.0 / self.model.config.scale_factor)).to(next(vae.parameters()).dtype)
        if plan.decode == "whole":
            out = lean.vae_decode(vae, z)
        else:
            from ccsr.vae import tiled_decode

            tile = p.tile_vae_decoder_size
            if plan.decode == "tiled":
                out = tiled_decode(vae, z, tile, VAE_TILE_PAD)
            else:  # the estimating pass decodes a preview no larger than one padded tile: memory stays one tile
                out = tiled_decode(vae, z, tile, VAE_TILE_PAD, stats="estimate", estimate_size=tile + 2 * VAE_TILE_PAD)
        return (out.float() + 1) / 2

    def _decoded_rows(self, z0: Tensor, cond: Condition, plan: Plan, tiling: Tiling | None
                      ) -> Iterator[tuple[int, Tensor]]:
        """The decoded, colour-fixed image in [0, 1] on the host, as (first row, float32 [1, 3, rows, W])
        blocks from top to bottom; a block is valid until the next one is asked for."""
        fix = plan.params.color_fix
        if tiling is None or tiling.blend == "gaussian":
            yield 0, color_fix(self._decode_latent(z0, plan), cond.window(None), fix).cpu().clamp_(0, 1)
            return
        # "mix": every tile decoded and colour-fixed on its own, then averaged in pixel space (on the host).
        # Windows come row-major, so the rows above a window's top are complete when it starts: only the band
        # from there down to the lowest window so far is held in float.
        f, width = self.descriptor.latent_factor, cond.shape[1]
        top = 0  # the band's first row
        acc = torch.zeros((1, 3, 0, width), dtype=torch.float32)
        # Overlap counts are small integers: a uint8 plane divides exactly as the reference's int64 volume.
        count = torch.zeros((1, 1, 0, width), dtype=torch.uint8)
        for win in tiling.windows:
            prow, pcol = win.pixels(f)
            if prow.start > top:
                done = prow.start - top
                yield top, acc[:, :, :done].div_(count[:, :, :done]).clamp_(0, 1)
                # only the overlap with later windows is kept; the rows handed out are freed
                acc, count, top = acc[:, :, done:].clone(), count[:, :, done:].clone(), prow.start
            if prow.stop - top > acc.shape[2]:
                acc, count = _grown(acc, prow.stop - top), _grown(count, prow.stop - top)
            band = slice(prow.start - top, prow.stop - top)
            rows, cols = win.latent()
            tile = self._decode_latent(z0[:, :, rows, cols], plan)
            acc[:, :, band, pcol] += color_fix(tile, cond.window(win), fix).cpu()
            count[:, :, band, pcol] += 1
            del tile
            hostmemory.trim()  # each window's decoder temporaries, before the next window allocates its own
        yield top, acc.div_(count).clamp_(0, 1)


def _then_trim(encoder: Callable[[Tensor], Tensor]) -> Callable[[Tensor], Tensor]:
    """The condition encoder, then its freed transients given back to the OS. Inside ``reuse_freed`` they stay
    resident, and the network evaluation that follows would add its own on top: the peak then depended on how the
    two happened to share the heap, and grew with the number of windows (a hint is encoded per window)."""

    def encode(pixels: Tensor) -> Tensor:
        hint = encoder(pixels)
        hostmemory.trim()
        return hint

    return encode


def _grown(band: Tensor, rows: int) -> Tensor:
    """``band`` extended with zero rows to ``rows`` rows (dim 2), in one allocation."""
    out = band.new_zeros((*band.shape[:2], rows, band.shape[3]))
    out[:, :, : band.shape[2]] = band
    return out


class PreDrawnNoise:
    """The sampler's noise source. Every draw comes from one CPU generator in the reference's order with the full
    latent's shape, so a seed gives the same image on every device (up to kernel differences). For an
    accelerator they are drawn up front and sent in one copy, so the step loop never waits on a host-to-device
    transfer; on the CPU one at a time (up front, every step's full-size noise would be held at once)."""

    def __init__(self, seed: int, shape: tuple[int, ...], device: torch.device):
        self.gen = torch.Generator("cpu").manual_seed(seed)
        self.shape, self.device = shape, device
        self.ready: list[Tensor] = []

    def draw(self, n: int) -> None:
        batch = torch.stack([torch.randn(self.shape, generator=self.gen, dtype=torch.float32) for _ in range(n)])
        self.ready.extend(batch.to(self.device).unbind(0))

    def __call__(self) -> Tensor:
        if not self.ready:
            self.draw(1)
        return self.ready.pop(0)


class Condition:
    """The condition image at the processing size, kept on the host in its compact form (uint8 for 8-bit
    input); ``window`` gives a crop as float32 [1, 3, h, w] in [0, 1] on the device, converted as the reference
    converts the whole image, so tiled and untiled runs see the same values."""

    def __init__(self, pixels: np.ndarray, device: torch.device, latent_factor: int):
        self.pixels = torch.from_numpy(np.require(pixels, requirements=["C", "W"]))  # HWC
        self.device, self.factor = device, latent_factor
        self.shape = tuple(pixels.shape[:2])

    def window(self, win: Window | None) -> Tensor:
        crop = self.pixels if win is None else self.pixels[win.pixels(self.factor)]
        if crop.dtype == torch.uint8:
            crop = crop.double().div_(255.0).float()  # numpy's (x / 255.0).astype(float32), bit for bit
        return crop.permute(2, 0, 1)[None].contiguous().to(self.device)
