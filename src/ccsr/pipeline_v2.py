"""CCSRv2Pipeline: CCSR-v2 (one- and two-step) with the reference's pre/post-processing (``test_ccsr_tile.py``).

Same contract as :class:`ccsr.pipeline.CCSRPipeline`: ``run(image, params, progress=, should_cancel=,
output_type=)`` returns an :class:`~ccsr.pipeline.UpscaleOutput`; ``plan`` resolves automatic tiling from free
memory. What differs is the model's own rule set:

* geometry: inputs smaller than ``process_size // scale`` are first enlarged (bicubic, short side to it), then
  bicubic x scale, then floored to multiples of 8; the result goes back to ``scale x`` the input (bicubic);
* the colour fix runs on the 8-bit images and truncates (the reference's ``ToPILImage``), and the result is resized
  with bicubic: :class:`ccsr.finishing.ColourFixAfterRounding`, through the same result machinery as v1
  (:mod:`ccsr.result`: ``"pil"`` keeps only 8-bit pixels, a row sink gets the target's rows band by band);
* tiled diffusion is gaussian only; the tiled VAE decoder is the reference's; the VAE encoder is tiled only when
  a whole encode does not fit (beyond the reference, which always encodes whole).
"""

from __future__ import annotations

import dataclasses
import random
import time
from collections.abc import Callable
from pathlib import Path

import numpy as np
import torch
from PIL import Image

from ccsr import hostmemory
from ccsr.finishing import ColourFixAfterRounding, Finishing, unit_float32
from ccsr.geometry import Geometry, Picture, resize, size_of
from ccsr.model import ModelDescriptor
from ccsr.model.v2 import CCSRv2Model, load_v2
from ccsr.params import ParamError, UpscaleParams
from ccsr.pipeline import Cancelled, UpscaleOutput, default_device, parse_bytes, parse_dtype, working_memory
from ccsr.planning import VAE_TILE_PAD, Plan, Planner, run_with_replanning
from ccsr.result import OutputType, Result, result_type
from ccsr.sampling.ccsr_v1 import Tiling
from ccsr.sampling.ccsr_v2 import StepRecordV2, sample_ccsr_v2, v2_schedule
from ccsr.sampling.denoiser_v2 import CCSRv2Denoiser
from ccsr.vae import lean, tiled_decode, tiled_encode

Tensor = torch.Tensor
Progress = Callable[[int, int], None]
VAE_ENCODER_PAD = 32  # image pixels of context around each encoder tile (beyond the reference)
ENCODER_TILES = (1024, 768, 512, 384, 256, 192, 128)  # encoder tile sizes tried, in image pixels


def v2_geometry(size: tuple[int, int], scale: float, process_size: int) -> Geometry:
    """The reference's sizes: ``auto_resized`` is the input after the small-input enlargement, ``upscaled`` that
    x scale, ``process`` it floored to multiples of 8, ``target`` the input x scale."""
    w0, h0 = size
    if w0 < 1 or h0 < 1:
        raise ValueError(f"image has zero size ({w0}x{h0})")
    s = int(scale)
    w, h = w0, h0
    if w0 < process_size // s or h0 < process_size // s:
        r = (process_size // s) / min(w0, h0)
        w, h = round(r * w0), round(r * h0)
    up = (w * s, h * s)
    process = (up[0] // 8 * 8, up[1] // 8 * 8)
    if min(process) < 8:
        raise ParamError("process_size", f"the processing size {process[0]}x{process[1]} is empty; raise it")
    return Geometry(target=(w0 * s, h0 * s), upscaled=up, auto_resized=(w, h), process=process)


def check_v2(p: UpscaleParams) -> UpscaleParams:
    """What CCSR-v2 cannot do, refused with the field's name."""
    if p.scale != int(p.scale) or p.scale < 1:
        raise ParamError("scale", "CCSR-v2 takes an integer factor (1, 2, 3, 4, ...)")
    if p.tile_diffusion == "mix":
        raise ParamError("tile_diffusion", "CCSR-v2 tiles diffusion with gaussian weights only (gaussian, none, auto)")
    if p.size_mode != "reference":
        raise ParamError("size_mode", "CCSR-v2 has the reference's size rule only")
    return p


class PlanV2(Plan):
    """A :class:`~ccsr.planning.Plan` whose evaluation count is CCSR-v2's (initial step + loop) x windows."""

    @property
    def evaluations(self) -> int:
        p = self.params
        return v2_schedule(p.steps, p.t_max, p.t_min).evaluations * self.windows


class V2Planner(Planner):
    """:class:`~ccsr.planning.Planner` with CCSR-v2's geometry, gaussian windows where v1 would use mix, and the
    whole-image condition encode: whole when it fits, else tiled with estimated GroupNorm statistics (one tile
    in memory at a time)."""

    def _geometry(self, size: tuple[int, int], p: UpscaleParams, tiled_vae: bool) -> Geometry:
        return v2_geometry(size, p.scale, p.process_size)

    def plan(self, size: tuple[int, int], requested: UpscaleParams, budget: int | None = None) -> Plan:
        p = check_v2(requested.validate())
        plan = super().plan(size, p, budget)
        if plan.params.tile_diffusion == "mix":  # v1's automatic choice: the same windows, blended as v2 does
            windows = {k: getattr(plan.params, k) for k in ("tile_diffusion_size", "tile_diffusion_stride")}
            plan = super().plan(size, p.replace(tile_diffusion="gaussian", **windows), budget)
        return dataclasses.replace(plan, requested=requested)

    def _resolve(self, size: tuple[int, int], p: UpscaleParams, budget: int) -> Plan:
        plan = super()._resolve(size, p, budget)
        plan = PlanV2(**{f.name: getattr(plan, f.name) for f in dataclasses.fields(plan)})
        w, h = plan.geometry.process
        room = budget - self._buffers(w * h)
        whole = self._hint(w * h)
        if whole <= room or p.tile_vae is False:  # as asked: the plan says False for a whole decode
            return dataclasses.replace(plan, estimate=max(plan.estimate, int(whole + self._buffers(w * h))))
        tile = next((t for t in ENCODER_TILES if t <= plan.params.tile_vae_encoder_size
                     and self._hint(min(w * h, (t + 2 * VAE_ENCODER_PAD) ** 2)) <= room), ENCODER_TILES[-1])
        cost = self._hint(min(w * h, (tile + 2 * VAE_ENCODER_PAD) ** 2))
        return dataclasses.replace(plan, params=plan.params.replace(tile_vae_encoder_size=tile), encode="estimate",
                                   estimate=max(plan.estimate, int(cost + self._buffers(w * h))))


class CCSRv2Pipeline:
    """CCSR-v2 upscaling. ``run`` is the full interface; calling the pipeline returns just the image."""

    def __init__(self, model: CCSRv2Model, device: str | torch.device | None = None,
                 dtype: str | torch.dtype | None = None, max_memory: int | None = None):
        self.device = torch.device(device) if device is not None else default_device()
        self.dtype = parse_dtype(dtype, self.device)  # what the networks run in, per the model's descriptor
        self.model = model.to(self.device, self.dtype)
        self.vae_dtype = model.descriptor.network_dtypes(self.dtype)["vae"]
        for prompt in (model.descriptor.defaults["prompt"], model.descriptor.defaults["negative_prompt"]):
            model.encode_prompt(str(prompt))
        model.text.release()  # the defaults are cached; another prompt builds the text encoder again
        self.planner = V2Planner(model.descriptor, self.device, self.dtype, working_memory(max_memory))

    @classmethod
    def from_pretrained(cls, folder: str | Path, device: str | torch.device | None = None,
                        dtype: str | torch.dtype | None = None, max_memory: int | str | None = None
                        ) -> CCSRv2Pipeline:
        """Load a CCSR-v2 folder (``stable-diffusion-2-1-base/``, ``controlnet/``, ``vae/``)."""
        if isinstance(max_memory, str):
            max_memory = parse_bytes(max_memory)
        return cls(load_v2(folder), device=device, dtype=dtype, max_memory=max_memory)

    @property
    def descriptor(self) -> ModelDescriptor:
        return self.model.descriptor

    def params(self, preset: str | None = None, **changes: object) -> UpscaleParams:
        """The model's defaults (or a preset: ``"one-step"``, ``"two-step"``) with ``changes`` applied."""
        d = self.descriptor
        if preset is not None and preset not in d.presets:
            raise ParamError("preset", f"unknown preset {preset!r} (expected one of {', '.join(d.presets)})")
        base = d.presets[preset] if preset else d.defaults
        return UpscaleParams(**{**base, **changes}).validate()  # type: ignore[arg-type]

    def __call__(self, image: Picture, progress: Progress | None = None, **params: object) -> Image.Image:
        return self.run(image, self.params(**params), progress=progress, output_type="pil").image  # type: ignore[return-value]

    def plan(self, size: tuple[int, int], params: UpscaleParams | None = None) -> Plan:
        return self.planner.plan(size, params or self.params())

    @torch.no_grad()
    def run(
        self,
        image: Picture,
        params: UpscaleParams | None = None,
        *,
        progress: Progress | None = None,
        should_cancel: Callable[[], bool] | None = None,
        on_step: Callable[[StepRecordV2], None] | None = None,
        log: Callable[[str], None] | None = None,
        output_type: OutputType = "np",
    ) -> UpscaleOutput:
        """Upscale ``image`` (PIL RGB, or float32 HxWx3 in [0, 1]); ``params`` default to the model's."""
        p = check_v2((params or self.params()).validate())
        make_result = result_type(output_type)  # an unknown type is refused before any work
        if p.seed is None:
            p = p.replace(seed=random.randrange(2**32))
        plan = self.planner.plan(size_of(image), p)

        def announce(plan: Plan) -> None:
            if log is not None:
                encode = "" if plan.encode == "whole" else (
                    f"; VAE encode tiled {plan.params.tile_vae_encoder_size}, estimated statistics")
                log(f"plan: {plan.describe()}{encode}")

        return run_with_replanning(
            self.planner, size_of(image), plan,
            lambda plan: self._run(image, plan, progress, should_cancel, on_step, make_result),
            device=self.device, announce=announce, log=log)

    def _run(self, image: Picture, plan: Plan, progress: Progress | None, should_cancel: Callable[[], bool] | None,
             on_step: Callable[[StepRecordV2], None] | None, make_result: Callable[[Geometry, Finishing], Result]
             ) -> UpscaleOutput:
        p, g, m = plan.params, plan.geometry, self.model
        seed = int(p.seed or 0)
        timings: dict[str, float] = {}
        t0 = time.perf_counter()
        lr = preprocess(image, g)  # HWC, uint8 for 8-bit input
        # a sink of the wrong size is refused here, before any network runs
        result = make_result(g, ColourFixAfterRounding(lr, p.color_fix))
        timings["preprocess"] = time.perf_counter() - t0

        def cancel_point() -> None:
            if should_cancel is not None and should_cancel():
                raise Cancelled("cancelled")

        cancel_point()
        cfg = p.cfg_scale > 1.0  # the reference's do_classifier_free_guidance
        t1 = time.perf_counter()
        context = m.encode_prompt(p.prompt)
        if cfg:
            context = torch.cat([m.encode_prompt(p.negative_prompt), context])
        timings["text"] = time.perf_counter() - t1

        # the two streams: the explicit generator (x_T, loop noise) and the reference's global one
        explicit = torch.Generator("cpu").manual_seed(seed)
        rng = torch.Generator("cpu").manual_seed(seed)
        f = self.descriptor.latent_factor
        shape = (1, self.descriptor.latent_channels, g.process[1] // f, g.process[0] // f)
        x_T = torch.randn(shape, generator=explicit, dtype=torch.float32).to(self.device)  # float32 between networks

        t2 = time.perf_counter()
        z = self._condition(lr, context.shape[0], rng, plan)
        del lr  # the finishing keeps its own reference for the colour fix
        hostmemory.trim()  # the encoder's freed activations: not under the sampling's and the decoder's peaks
        timings["condition"] = time.perf_counter() - t2
        cancel_point()

        schedule = v2_schedule(p.steps, p.t_max, p.t_min)
        tiling = Tiling(list(plan.tiles), "gaussian") if plan.tiles else None
        denoiser = CCSRv2Denoiser(m.unet, m.controlnet, context, z)

        # The CFG batch is twice the unguided initial evaluation's: what that one freed does not fit it, so it is
        # given back first rather than kept for reuse beside the larger buffers.
        unguided = plan.windows if schedule.initial and cfg else -1

        def tick(done: int, total: int) -> None:
            if tiling is not None or done == unguided:
                hostmemory.trim()  # each window's transients, before the next window allocates its own
            if progress is not None:
                progress(done, total)
            cancel_point()

        t3 = time.perf_counter()
        with hostmemory.reuse_freed():  # the evaluations re-allocate the same buffers: no page faults for them
            latent = sample_ccsr_v2(
                denoiser, x_T, z[:1], m.alphas_cumprod, schedule, rng,
                lambda: torch.randn(shape, generator=explicit, dtype=torch.float32).to(self.device),
                cfg_scale=p.cfg_scale, start_point=p.start_point, start_steps=p.start_steps,
                tao_channels_last=cfg, tiling=tiling, progress=tick, on_step=on_step,
            )
            del denoiser, z  # before leaving, which gives the freed pages back
        timings["sample"] = time.perf_counter() - t3

        t4 = time.perf_counter()
        processed = self._decode(latent, plan)
        result.write(0, processed)  # the decoders give the whole image: the result streams it on in bands
        del processed, latent
        hostmemory.trim()
        timings["decode"] = time.perf_counter() - t4
        image8, final, processed_out = result.finish()
        timings["total"] = time.perf_counter() - t0
        return UpscaleOutput(image8, final, processed_out, seed, g, timings,
                             schedule.evaluations * plan.windows, plan)

    def _condition(self, lr: np.ndarray, rows: int, rng: torch.Generator, plan: Plan) -> Tensor:
        """The condition latent: ``rows`` samples of the CCSR VAE's posterior (global stream), scaled. On the CPU
        the VAE's encoder is freed after use (read again at the next upscale), so that its weights are not resident
        under the sampling's and the decoder's peaks: the same memory their activations take."""
        encoder, quant_conv = self.model.condition_encoder()
        x = torch.from_numpy(unit_float32(lr)).permute(2, 0, 1)[None].to(self.device, self.vae_dtype) * 2 - 1
        if plan.encode == "estimate":
            moments = tiled_encode(encoder, quant_conv, x, plan.params.tile_vae_encoder_size, VAE_ENCODER_PAD,
                                   stats="estimate")
        else:
            moments = quant_conv(lean.encode(encoder, x))
        del x, encoder, quant_conv
        if self.device.type == "cpu":
            self.model.release_encoder()
        mean, logvar = moments.float().chunk(2, dim=1)
        std = torch.exp(0.5 * torch.clamp(logvar, -30.0, 20.0))
        noise = torch.randn((rows, *mean.shape[1:]), generator=rng, dtype=torch.float32).to(mean.device)
        return (mean + std * noise) * self.model.scale_factor

    def _decode(self, latent: Tensor, plan: Plan) -> np.ndarray:
        """``clamp(decode(latent / s) / 2 + 0.5, 0, 1)`` as HWC float32 (the fixtures' ``output_float``), whole: the
        reference's tiled decoder merges every GroupNorm's statistics over all tiles, so no row is final before
        the last layer of every tile has run. What follows (colour fix, resize, the output) goes band by band."""
        vae = self.model.vae
        z = (latent / self.model.scale_factor).to(self.vae_dtype)
        if plan.decode == "whole":
            out = lean.vae_decode(vae, z)
        else:
            stats = "sync" if plan.decode == "tiled" else "estimate"
            tile = plan.params.tile_vae_decoder_size
            out = tiled_decode(vae, z, tile, VAE_TILE_PAD, stats=stats, estimate_size=tile + 2 * VAE_TILE_PAD)
        return (out.float() / 2 + 0.5).clamp(0, 1)[0].permute(1, 2, 0).cpu().numpy()


def preprocess(image: Picture, g: Geometry) -> np.ndarray:
    """The input at the processing size (HWC; uint8 for 8-bit input), resized with bicubic as ``main()`` does."""
    img = image
    for size in (g.auto_resized, g.upscaled, g.process):
        if size != size_of(img):
            img = resize(img, size, Image.Resampling.BICUBIC)
    if isinstance(img, Image.Image):
        return np.asarray(img.convert("RGB"))
    return np.clip(img, 0.0, 1.0).astype(np.float32)
