"""Pixel helpers shared by the steps: float Lanczos resize, alpha upscaling, rounding/dithering
quantisation."""

from __future__ import annotations

import numpy as np
from PIL import Image

_LANCZOS = Image.Resampling.LANCZOS


def resize_float(a: np.ndarray, size: tuple[int, int]) -> np.ndarray:
    """Lanczos-resize float32 HxW or HxWxC to ``size`` = (width, height), per channel in Pillow's "F" mode."""
    if a.ndim == 3:
        return np.stack([resize_float(a[..., i], size) for i in range(a.shape[2])], axis=-1)
    if (a.shape[1], a.shape[0]) == size:
        return a.astype(np.float32, copy=True)
    im = Image.fromarray(np.ascontiguousarray(a, dtype=np.float32), "F")
    return np.asarray(im.resize(size, _LANCZOS), dtype=np.float32)


def resize_alpha(alpha: np.ndarray, size: tuple[int, int]) -> np.ndarray:
    """Alpha resized on its own with Lanczos (in float, so soft edges stay smooth), clipped to [0, 1]."""
    return np.clip(resize_float(alpha, size), 0.0, 1.0)


def _bayer(n: int = 8) -> np.ndarray:
    m = np.zeros((1, 1))
    while m.shape[0] < n:
        m = np.block([[4 * m, 4 * m + 2], [4 * m + 3, 4 * m + 1]])
    return ((m + 0.5) / (n * n)).astype(np.float32)  # thresholds in (0, 1), mean 0.5


_BAYER8 = _bayer(8)


def quantize_array(a: np.ndarray, bits: int = 8, dither: bool = False, top: int = 0) -> np.ndarray:
    """float [0, 1] -> uint8/uint16 by rounding (never truncating), or with an 8x8 ordered dither whose
    thresholds average 0.5, so the mean level is kept and flat gradients do not band. ``top``: the block's first
    row in the whole image, so that blocks quantised one at a time get the whole image's dither pattern."""
    top_value = 255.0 if bits == 8 else 65535.0
    x = np.clip(a, 0.0, 1.0) * np.float32(top_value)
    if dither:
        h, w = a.shape[:2]
        t = _BAYER8[(top + np.arange(h))[:, None] % 8, np.arange(w)[None, :] % 8]
        x = np.floor(x + (t[..., None] if a.ndim == 3 else t), out=x)
    else:
        x = np.rint(x, out=x)
    return np.clip(x, 0, top_value, out=x).astype(np.uint8 if bits == 8 else np.uint16)
