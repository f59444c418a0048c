"""Latent tile layout and blending weights for tiled diffusion."""

from __future__ import annotations

import functools
from dataclasses import dataclass
from math import exp, pi, sqrt

import numpy as np
import torch


@dataclass(frozen=True)
class Window:
    """A latent-space tile ``[top:bottom, left:right]``; ``pixels(f)`` gives the same box in image space."""

    top: int
    bottom: int
    left: int
    right: int

    def latent(self) -> tuple[slice, slice]:
        return slice(self.top, self.bottom), slice(self.left, self.right)

    def pixels(self, factor: int) -> tuple[slice, slice]:
        return slice(self.top * factor, self.bottom * factor), slice(self.left * factor, self.right * factor)


def _starts(size: int, tile: int, stride: int) -> list[int]:
    starts = list(range(0, size - tile + 1, stride))
    if (size - tile) % stride:
        starts.append(size - tile)  # one more tile flush with the border
    return starts


def sliding_windows(height: int, width: int, tile: int, stride: int) -> list[Window]:
    """Row-major windows as the reference lays them out; a tile larger than the latent is clamped to it."""
    th, tw = min(tile, height), min(tile, width)
    return [
        Window(top, top + th, left, left + tw)
        for top in _starts(height, th, stride)
        for left in _starts(width, tw, stride)
    ]


@functools.lru_cache(maxsize=16)
def gaussian_weights(height: int, width: int) -> torch.Tensor:
    """Mixture-of-Diffusers tile weights, float64 ``[height, width]``.

    The x midpoint is ``(W-1)/2`` but the y midpoint is ``H/2``: an asymmetry inherited by the reference, kept so
    that fused noise matches it. Cached: every window of every step asks for the same few shapes; callers
    must not modify the returned tensor.
    """
    var = 0.01

    def curve(n: int, mid: float) -> list[float]:
        return [exp(-(p - mid) * (p - mid) / (n * n) / (2 * var)) / sqrt(2 * pi * var) for p in range(n)]

    return torch.from_numpy(np.outer(curve(height, height / 2), curve(width, (width - 1) / 2)))
