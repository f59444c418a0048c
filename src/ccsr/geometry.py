"""Processing geometry: which sizes the image passes through, and the resizes between them.

Two modes:

* ``reference``: CCSR-v1's own path. Bicubic pre-upscale to ``ceil(scale * size)``, short side raised to 512 (or to
  the diffusion tile size when tiling) with bicubic, Lanczos to a multiple of 64 (floored by ``inference_ccsr.py``;
  one block *added* by ``inference_ccsr_tile.py``, whose rule applies with gaussian tiling or the tiled VAE), then
  the result is Lanczos-resized back to the target. Output pixels equal the reference's.
* ``pad``: bicubic pre-upscale to the target, reflect-pad to the size multiple, crop back: no second resampling.

Resizes work on 8-bit PIL images exactly as the reference (PIL's integer paths) and on float32 arrays (16-bit
sources) through PIL's float mode, one channel at a time.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import numpy as np
from PIL import Image

Picture = Image.Image | np.ndarray  # PIL RGB (8-bit) or float32 HxWx3 in [0, 1]

REFERENCE_MIN_SIDE = 512


def size_of(img: Picture) -> tuple[int, int]:
    """(width, height)."""
    return img.size if isinstance(img, Image.Image) else (img.shape[1], img.shape[0])


def resize(img: Picture, size: tuple[int, int], resample: Image.Resampling) -> Picture:
    """PIL's own resize; a float array goes through PIL's "F" mode one channel at a time, each written straight into
    the result (no list of channels, no stacked copy)."""
    if isinstance(img, Image.Image):
        return img.resize(size, resample)
    out = np.empty((size[1], size[0], img.shape[2]), np.float32)
    for c in range(img.shape[2]):
        out[..., c] = Image.fromarray(np.ascontiguousarray(img[..., c]), mode="F").resize(size, resample)
    return out


def to_float(img: Picture) -> np.ndarray:
    """HWC float32 in [0, 1]; 8-bit values are divided in float64 then rounded, as the reference does."""
    if isinstance(img, Image.Image):
        return (np.asarray(img.convert("RGB")) / 255.0).astype(np.float32)
    return np.clip(img, 0.0, 1.0).astype(np.float32)


@dataclass(frozen=True)
class Geometry:
    target: tuple[int, int]  # (w, h) of the output: ceil(scale * input)
    upscaled: tuple[int, int]  # after the bicubic pre-upscale (== target)
    auto_resized: tuple[int, int]  # after raising the short side (reference mode)
    process: tuple[int, int]  # what the model sees (multiple of the size multiple)
    pad: tuple[int, int] = (0, 0)  # (right, bottom) reflect padding in pad mode


def plan_geometry(
    size: tuple[int, int],
    scale: float,
    *,
    mode: str = "reference",
    min_side: int = REFERENCE_MIN_SIDE,
    add_block: bool = False,
    multiple: int = 64,
    min_pad_size: int = 0,
) -> Geometry:
    """Sizes for an input of ``size`` (w, h). ``add_block`` selects the tile script's always-round-up rule;
    ``min_pad_size`` is the smallest processing side the model can run at (pad mode pads up to it)."""
    w, h = size
    if w < 1 or h < 1:
        raise ValueError(f"image has zero size ({w}x{h})")
    target = (math.ceil(w * scale), math.ceil(h * scale)) if scale != 1 else (w, h)
    if mode == "pad":
        proc = tuple(max(math.ceil(s / multiple) * multiple, min_pad_size) for s in target)
        return Geometry(target, target, target, proc, (proc[0] - target[0], proc[1] - target[1]))  # type: ignore[arg-type]
    short = min(target)
    auto = target
    if short < min_side:
        r = min_side / short
        auto = (math.ceil(target[0] * r), math.ceil(target[1] * r))
    if add_block:
        proc = tuple((s // multiple + 1) * multiple for s in auto)
    else:
        proc = tuple(max(s // multiple, 1) * multiple for s in auto)
    return Geometry(target, target, auto, proc)  # type: ignore[arg-type]


def prepare_compact(img: Picture, g: Geometry) -> np.ndarray:
    """Input picture -> HWC condition image at the processing size, uint8 for 8-bit input (a quarter of the
    memory; :func:`unit` gives the float values the reference uses) or float32 in [0, 1] for high-depth input."""
    if g.upscaled != size_of(img):
        img = resize(img, g.upscaled, Image.Resampling.BICUBIC)
    if g.pad != (0, 0):
        arr = np.asarray(img.convert("RGB")) if isinstance(img, Image.Image) else to_float(img)
        mode = "reflect" if g.pad[0] < arr.shape[1] and g.pad[1] < arr.shape[0] else "symmetric"
        return np.pad(arr, ((0, g.pad[1]), (0, g.pad[0]), (0, 0)), mode=mode)
    if g.auto_resized != g.upscaled:
        img = resize(img, g.auto_resized, Image.Resampling.BICUBIC)
    if g.process != g.auto_resized:
        img = resize(img, g.process, Image.Resampling.LANCZOS)
    return np.asarray(img.convert("RGB")) if isinstance(img, Image.Image) else to_float(img)


def unit(pixels: np.ndarray) -> np.ndarray:
    """uint8 -> float32 in [0, 1] exactly as the reference (float64 division, then rounding); float unchanged."""
    return (pixels / 255.0).astype(np.float32) if pixels.dtype == np.uint8 else pixels


def prepare(img: Picture, g: Geometry) -> np.ndarray:
    """Input picture -> HWC float32 condition image in [0, 1] at the processing size."""
    return unit(prepare_compact(img, g))


def _row_blocks(pixels: np.ndarray):  # type: ignore[no-untyped-def]
    """(first row, uint8 block) pairs truncated as the reference (``(x * 255).clip(0, 255).astype(uint8)``)."""
    rows = max(1, (1 << 20) // max(1, pixels[0].size))
    for r in range(0, pixels.shape[0], rows):
        yield r, (pixels[r : r + rows] * np.float32(255)).clip(0, 255).astype(np.uint8)


def quantise_into(out: np.ndarray, pixels: np.ndarray) -> None:
    """float [0, 1] -> the uint8 array ``out`` of the same shape, as the reference, a block of rows at a time."""
    for r, block in _row_blocks(pixels):
        out[r : r + len(block)] = block


def quantise_image(pixels: np.ndarray) -> Image.Image:
    """Like ``Image.fromarray`` of the :func:`quantise_into` pixels but pasted block by block: no full-size uint8
    array beside the image (PIL keeps RGB at 4 bytes per pixel, so that copy would be most of the output's memory)."""
    img = Image.new("RGB", (pixels.shape[1], pixels.shape[0]))
    for r, block in _row_blocks(pixels):
        img.paste(Image.fromarray(block), (0, r))
    return img


def resize_image(processed8: Image.Image, g: Geometry) -> Image.Image:
    """8-bit model output at the processing size -> the target size, Lanczos in 8 bits as the reference (pad mode
    crops instead, before quantising)."""
    return processed8 if g.process == g.target else processed8.resize(g.target, Image.Resampling.LANCZOS)


def finish_float(processed: np.ndarray, g: Geometry) -> np.ndarray:
    """Float model output at the processing size -> float image at the target (a view when no resize)."""
    if g.pad != (0, 0):
        return processed[: g.target[1], : g.target[0]]
    if g.process == g.target:
        return processed
    final = resize(processed, g.target, Image.Resampling.LANCZOS)
    return np.clip(final, 0.0, 1.0, out=final)


def finish(processed: np.ndarray, g: Geometry) -> tuple[Image.Image, np.ndarray]:
    """Model output at the processing size -> (8-bit image quantised as the reference, float image), both at target.

    The reference truncates to uint8 at the processing size, then Lanczos-resizes the 8-bit image.
    """
    final = finish_float(processed, g)
    if g.pad != (0, 0):
        return quantise_image(final), final  # only the crop is quantised
    return resize_image(quantise_image(processed), g), final
