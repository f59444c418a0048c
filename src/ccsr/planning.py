"""Tile planning: diffusion tiles and the VAE decode, chosen from the memory the device has free.

Explicit settings are kept; ``"auto"`` / ``None`` ones are resolved here, before the geometry, because the
reference's geometry depends on them. The rule, in order of preference:

* diffusion: the reference's exact untiled path when it fits and the image is at most twice the model's native
  size (beyond that one window costs more than tiles: attention is quadratic); otherwise ``mix`` windows near the
  native size that cover each axis :data:`COVERAGE` times at every size (:func:`balanced_windows`), smaller when a
  window would not fit;
* VAE decode (of the whole latent, or of each ``mix`` window): whole when it fits, else tiled with GroupNorm
  statistics synchronised over all tiles (the reference) when every tile's activations fit, else tiled with
  statistics estimated from a downscaled pass, which holds one tile at a time (bounded for any size).

Estimates come from the model's :class:`~ccsr.model.MemoryProfile`. An out-of-memory error during a run is
answered by planning again with half the budget (:func:`retry_plan`), until nothing is left to shrink.
"""

from __future__ import annotations

import dataclasses
import gc
import math
import os
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Literal, TypeVar

import torch

from ccsr.geometry import REFERENCE_MIN_SIDE as GEOMETRY_MIN_SIDE
from ccsr.geometry import Geometry, plan_geometry
from ccsr.model import ModelDescriptor
from ccsr.params import ParamError, UpscaleParams
from ccsr.sampling.schedule import SpacedSchedule, truncated_plan
from ccsr.sampling.tiles import Window, sliding_windows

Decode = Literal["whole", "tiled", "estimate"]

SAFETY = 0.8  # share of the free memory one upscale may plan to use (allocator slack, other tenants)
BUFFER_PER_PX = 20  # full-size host buffers per output pixel: uint8 condition, float32 result, uint8 copy
VAE_TILE_PAD = 11  # latent pixels of context around each decoder tile (the reference's)
VAE_TILES = (128, 96, 64, 48, 32, 24, 16)  # decoder tile sizes tried, in latent pixels
MIN_TILE = 256  # smallest diffusion tile the planner picks (pixels)
COVERAGE = 1.25  # how many times planned diffusion windows cover each axis (the overlap that is blended)
REFERENCE_WORK_PX = 4096 * 4096  # the processing area of the largest output (imaging.Limits.max_output_side)


class MemoryBudgetError(ParamError):
    """The request, as given, cannot fit in the memory the device has free."""


def free_memory(device: torch.device) -> int:
    """Bytes this process can still allocate on ``device`` (free + what its own allocator holds unused)."""
    if device.type == "cuda":
        free, _ = torch.cuda.mem_get_info(device)
        return int(free + torch.cuda.memory_reserved(device) - torch.cuda.memory_allocated(device))
    if device.type == "mps":
        return int(torch.mps.recommended_max_memory() - torch.mps.driver_allocated_memory())
    return _host_available()


def _host_available() -> int:
    """MemAvailable, capped by a cgroup-v2 limit when the process runs in one (containers)."""
    available = None
    try:
        for line in Path("/proc/meminfo").read_text().splitlines():
            if line.startswith("MemAvailable:"):
                available = int(line.split()[1]) * 1024
    except OSError:
        pass
    if available is None:
        available = os.sysconf("SC_AVPHYS_PAGES") * os.sysconf("SC_PAGE_SIZE")
    try:
        limit = Path("/sys/fs/cgroup/memory.max").read_text().strip()
        used = int(Path("/sys/fs/cgroup/memory.current").read_text())
        if limit != "max":
            available = min(available, int(limit) - used)
    except (OSError, ValueError):
        pass
    return max(int(available), 0)


def is_out_of_memory(error: BaseException) -> bool:
    """CUDA/MPS out-of-memory, or a host allocation the CPU allocator (or numpy) could not make."""
    if isinstance(error, torch.OutOfMemoryError | MemoryError):
        return True
    text = str(error)
    return isinstance(error, RuntimeError) and ("out of memory" in text.lower() or "can't allocate memory" in text)


@dataclass(frozen=True)
class Plan:
    """A request resolved for one input size: concrete params, the geometry and how the VAE decodes."""

    params: UpscaleParams  # no "auto"/None left in the tiling fields
    geometry: Geometry
    tiles: tuple[Window, ...]  # the diffusion windows, latent pixels (empty when untiled)
    decode: Decode
    estimate: int  # bytes of working memory above the weights
    budget: int  # what it was planned against
    requested: UpscaleParams  # as asked, so a retry can re-plan the automatic parts
    encode: Decode = "whole"  # CCSR-v2's whole-image condition encode: "whole" or "estimate" (tiled, bounded)

    @property
    def windows(self) -> int:
        """Network evaluations per step."""
        return max(1, len(self.tiles))

    @property
    def evaluations(self) -> int:
        """Network evaluations (windows x steps): the progress total."""
        p = self.params
        return truncated_plan(SpacedSchedule.make(p.steps), p.t_max, p.t_min).evaluations * self.windows

    def describe(self) -> str:
        p = self.params
        tiles = "untiled" if p.tile_diffusion == "none" else (
            f"{p.tile_diffusion} tiles {p.tile_diffusion_size}/{p.tile_diffusion_stride} px x {self.windows}")
        vae = {"whole": "whole", "tiled": f"tiled {p.tile_vae_decoder_size}",
               "estimate": f"tiled {p.tile_vae_decoder_size}, estimated statistics"}[self.decode]
        return f"{tiles}; VAE decode {vae}; ~{self.estimate / 2**30:.2f} of {self.budget / 2**30:.2f} GiB"


def balanced_windows(length: int, native: int, cap: int, floor: int) -> tuple[int, int]:
    """(tile, stride) for windows along an axis of ``length`` (all in latent pixels) that cover it about
    :data:`COVERAGE` times at every size, so the cost per output pixel does not depend on the image size (a fixed
    stride would cost 25-50 % more per pixel at 1 MP than at 16 MP, from rounding the window count up). Tiles
    stay near the model's ``native`` size, within ``[floor, cap]``, and overlap by at least an eighth."""
    if length <= cap:
        return length, length  # one window fits
    n = max(2, round(COVERAGE * length / native))
    tile = max(floor, min(cap, math.ceil(COVERAGE * length / n)))
    n = max(n, math.ceil((length - tile) / (tile - tile // 8)) + 1)
    return tile, math.ceil((length - tile) / (n - 1))


class Planner:
    """Resolves :class:`UpscaleParams` for a model, a device and a memory budget."""

    def __init__(self, descriptor: ModelDescriptor, device: torch.device, dtype: torch.dtype,
                 max_memory: int | None = None):
        self.d, self.device, self.max_memory = descriptor, device, max_memory
        dtypes = descriptor.network_dtypes(dtype)  # the memory profile is fp32's: scale by each network's size
        self.net_bytes = torch.finfo(dtypes["unet"]).bits / 32
        self.hint_bytes = torch.finfo(dtypes["cond_encoder"]).bits / 32
        self.vae_bytes = torch.finfo(dtypes["vae"]).bits / 32

    def budget(self) -> int:
        free = int(free_memory(self.device) * SAFETY)
        return free if self.max_memory is None else min(free, self.max_memory)

    # -- estimates (bytes) -------------------------------------------------------------------------------------
    def _eval(self, latent_px: int, p: UpscaleParams) -> float:
        batch = 2 if p.cfg_scale != 1.0 else 1
        return self.d.memory.eval_per_latent_px * latent_px * batch * self.net_bytes

    def _hint(self, px: int) -> float:
        return self.d.memory.hint_per_px * px * self.hint_bytes

    def _decode(self, px: int, decode: Decode, vae_tile: int) -> float:
        if decode == "estimate":
            side = (vae_tile + 2 * VAE_TILE_PAD) * self.d.latent_factor
            px = min(px, side * side)
        return self.d.memory.decode_per_px * px * self.vae_bytes

    def _buffers(self, px: int) -> float:
        return BUFFER_PER_PX * px if self.device.type == "cpu" else 0.0

    # -- the plan ------------------------------------------------------------------------------------------------
    def plan(self, size: tuple[int, int], requested: UpscaleParams, budget: int | None = None) -> Plan:
        """Resolve ``requested`` for an input of ``size``. Without ``budget`` (the free memory now), a plan that
        cannot fit at all raises :class:`MemoryBudgetError`; with one, the best effort is returned."""
        p = self._bounded(size, requested.validate())
        check = budget is None
        budget = self.budget() if budget is None else budget
        native = self.d.native_size
        if p.tile_diffusion == "auto":
            untiled = self._resolve(size, p.replace(tile_diffusion="none"), budget)
            if max(untiled.geometry.process) <= 2 * native and untiled.estimate <= budget:
                return self._checked(untiled, requested, check)
            p = p.replace(tile_diffusion="mix")
        if p.tile_diffusion != "none" and p.tile_diffusion_size is None:
            f = self.d.latent_factor
            floor = max(MIN_TILE, self.d.min_tile_latent * f)
            cap = native * 5 // 4 // 64 * 64
            while cap > floor and self._resolve(size, p.replace(tile_diffusion_size=cap), budget).estimate > budget:
                cap -= 64
            cap = max(cap, floor)
            w, h = self._geometry(size, p.replace(tile_diffusion_size=cap), tiled_vae=bool(p.tile_vae)).process
            tile, stride = balanced_windows(max(w, h) // f, native // f, cap // f, floor // f)
            # validated again: a stride set alone must not exceed the tile chosen here
            p = p.replace(tile_diffusion_size=tile * f, tile_diffusion_stride=p.tile_diffusion_stride or stride * f
                          ).validate()
        return self._checked(self._resolve(size, p, budget), requested, check)

    def _bounded(self, size: tuple[int, int], p: UpscaleParams) -> UpscaleParams:
        """The reference stretches the short side to the model's minimum, so a degenerate aspect ratio (a 1x256
        image) would be processed at 512x131072. Such inputs are planned in ``pad`` mode instead: the reference's
        geometry is kept only while it costs no more than the larger of the target and the largest output."""
        if p.size_mode != "reference":
            return p
        min_side = max(GEOMETRY_MIN_SIDE, p.tile_diffusion_size or 0)
        g = plan_geometry(size, p.scale, mode="reference", min_side=min_side)
        w, h = g.auto_resized
        target = math.ceil(size[0] * p.scale) * math.ceil(size[1] * p.scale)
        return p if w * h <= max(target, REFERENCE_WORK_PX) else p.replace(size_mode="pad")

    def _checked(self, plan: Plan, requested: UpscaleParams, check: bool) -> Plan:
        """Refuse what cannot fit even in all the free memory (automatic choices shrink to fit first)."""
        free = plan.budget / SAFETY if self.max_memory is None else plan.budget
        if check and plan.estimate > free:
            raise MemoryBudgetError(
                "tile_vae" if plan.decode == "whole" and requested.tile_vae is False else "tile_diffusion",
                f"this upscale needs about {plan.estimate / 2**30:.1f} GiB of working memory and "
                f"{free / 2**30:.1f} GiB is available; leave tile_diffusion and tile_vae unset to have them chosen, "
                "or use smaller tiles",
            )
        return dataclasses.replace(plan, requested=requested)

    def _resolve(self, size: tuple[int, int], p: UpscaleParams, budget: int) -> Plan:
        """Fill the stride and the VAE choice for a fixed diffusion tiling; estimate the peak."""
        if p.tile_diffusion != "none" and p.tile_diffusion_stride is None:
            stride = p.tile_diffusion_size - p.tile_diffusion_size // 4
            p = p.replace(tile_diffusion_stride=max(stride // 8 * 8, 8))
        f = self.d.latent_factor
        g = self._geometry(size, p, tiled_vae=bool(p.tile_vae))
        w, h = g.process
        if p.tile_diffusion == "none":
            win_px, tiles = w * h, ()
        else:
            tile = p.tile_diffusion_size
            win_px = min(tile, w) * min(tile, h)
            tiles = tuple(sliding_windows(h // f, w // f, max(tile // f, 1), max(p.tile_diffusion_stride // f, 1)))
        sampling = max(self._eval(win_px // (f * f), p), self._hint(win_px))
        # mix decodes window by window; none/gaussian decode the whole latent
        decode_px = win_px if p.tile_diffusion == "mix" else w * h
        room = budget - self._buffers(w * h)
        vae_tile = p.tile_vae_decoder_size
        if p.tile_vae is False or (p.tile_vae is None and self._decode(decode_px, "whole", 0) <= room):
            decode: Decode = "whole"
        else:
            if vae_tile is None:
                vae_tile = next((t for t in VAE_TILES if self._decode(decode_px, "estimate", t) <= room), VAE_TILES[-1])
            # the synchronised (reference) decoder keeps every tile's activations: about a whole decode
            decode = "tiled" if self._decode(decode_px, "whole", 0) <= room else "estimate"
            if p.tile_vae is None:
                g = self._geometry(size, p, tiled_vae=True)  # the reference's tiled-VAE size rule
        p = p.replace(tile_vae=decode != "whole", tile_vae_decoder_size=vae_tile or 226)
        estimate = int(max(sampling, self._decode(decode_px, decode, p.tile_vae_decoder_size)) + self._buffers(w * h))
        return Plan(p, g, tiles, decode, estimate, budget, requested=p)

    def _geometry(self, size: tuple[int, int], p: UpscaleParams, tiled_vae: bool) -> Geometry:
        tiled = p.tile_diffusion != "none"
        return plan_geometry(
            size, p.scale, mode=p.size_mode,
            min_side=p.tile_diffusion_size if tiled else 512,
            add_block=p.tile_diffusion == "gaussian" or tiled_vae,
            multiple=self.d.size_multiple,
            min_pad_size=self.d.min_tile_latent * self.d.latent_factor,
        )


def retry_plan(planner: Planner, size: tuple[int, int], failed: Plan) -> Plan | None:
    """After an out-of-memory error: the same request planned against half the budget, if that changes it."""
    try:
        smaller = planner.plan(size, failed.requested, budget=max(failed.estimate // 2, 1))
    except MemoryBudgetError:
        return None
    changed = (smaller.params, smaller.decode, smaller.encode) != (failed.params, failed.decode, failed.encode)
    return smaller if changed and smaller.estimate < failed.estimate else None


T = TypeVar("T")


def run_with_replanning(planner: Planner, size: tuple[int, int], plan: Plan, attempt: Callable[[Plan], T], *,
                        device: torch.device, announce: Callable[[Plan], None] | None = None,
                        log: Callable[[str], None] | None = None) -> T:
    """``attempt(plan)``; when the device runs out of memory, again with the plan for half the budget (the same
    seed, so the same noise), until one fits or nothing smaller exists. One loop for every model's pipeline."""
    while True:
        if announce is not None:
            announce(plan)
        try:
            return attempt(plan)
        except (RuntimeError, MemoryError) as e:
            smaller = retry_plan(planner, size, plan) if is_out_of_memory(e) else None
            if smaller is None:
                raise
        # outside the handler, so the failed attempt's frames and tensors are already released
        gc.collect()
        if device.type == "cuda":
            torch.cuda.empty_cache()
        if log is not None:
            log("out of memory: planning again with smaller tiles")
        plan = smaller
