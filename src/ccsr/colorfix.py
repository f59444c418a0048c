"""Colour correction of the decoded image against the (upscaled) low-quality input, as CCSR-v1 applies it."""

from __future__ import annotations

import torch
import torch.nn.functional as F

Tensor = torch.Tensor


def _mean_std(x: Tensor, eps: float = 1e-5) -> tuple[Tensor, Tensor]:
    b, c = x.shape[:2]
    flat = x.reshape(b, c, -1)
    return flat.mean(dim=2).reshape(b, c, 1, 1), (flat.var(dim=2) + eps).sqrt().reshape(b, c, 1, 1)


def adain(content: Tensor, style: Tensor) -> Tensor:
    """Per-channel mean/std transfer (unbiased variance + 1e-5): fixes global colour and brightness shifts."""
    s_mean, s_std = _mean_std(style)
    c_mean, c_std = _mean_std(content)
    return (content - c_mean) / c_std * s_std + s_mean


def _blur(x: Tensor, dilation: int) -> Tensor:
    k = torch.tensor([[1.0, 2.0, 1.0], [2.0, 4.0, 2.0], [1.0, 2.0, 1.0]], dtype=x.dtype, device=x.device) / 16
    k = k[None, None].repeat(x.shape[1], 1, 1, 1)
    padded = F.pad(x, (dilation,) * 4, mode="replicate")
    return F.conv2d(padded, k, groups=x.shape[1], dilation=dilation)


def _split(x: Tensor, levels: int = 5) -> tuple[Tensor, Tensor]:
    """A-trous decomposition: (sum of the band-pass levels, final low-pass)."""
    high = torch.zeros_like(x)
    for i in range(levels):
        low = _blur(x, 2**i)
        high += x - low
        x = low
    return high, x


def wavelet(content: Tensor, style: Tensor) -> Tensor:
    """Keep the content's high frequencies, take the style's low frequencies (5 levels, radii 1..16)."""
    return _split(content)[0] + _split(style)[1]


def color_fix(content: Tensor, style: Tensor, kind: str) -> Tensor:
    if kind == "adain":
        return adain(content, style)
    if kind == "wavelet":
        return wavelet(content, style)
    if kind == "none":
        return content
    raise ValueError(f"unknown colour fix {kind!r} (expected adain, wavelet or none)")
