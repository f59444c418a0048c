"""Colour correction of the decoded image against the (upscaled) low-quality input, as CCSR-v1 applies it."""

from __future__ import annotations

import torch
import torch.nn.functional as F

Tensor = torch.Tensor


Stats = tuple[Tensor, Tensor]  # per-channel (mean, std), [B, C, 1, 1]


def mean_std(x: Tensor, eps: float = 1e-5) -> Stats:
    """Per-channel mean and sqrt(unbiased variance + eps), reduced over the tensor's memory as laid out (a
    contiguous [B, C, H, W] is what the reference's ``ToTensor`` gives)."""
    b, c = x.shape[:2]
    flat = x.reshape(b, c, -1)
    return flat.mean(dim=2).reshape(b, c, 1, 1), (flat.var(dim=2) + eps).sqrt().reshape(b, c, 1, 1)


def adain_with(content: Tensor, content_stats: Stats, style_stats: Stats) -> Tensor:
    """:func:`adain` given both images' statistics: element by element, so any crop of ``content`` gives the same
    values as the whole."""
    (c_mean, c_std), (s_mean, s_std) = content_stats, style_stats
    return (content - c_mean) / c_std * s_std + s_mean


def adain(content: Tensor, style: Tensor) -> Tensor:
    """Per-channel mean/std transfer (unbiased variance + 1e-5): fixes global colour and brightness shifts."""
    return adain_with(content, mean_std(content), mean_std(style))


def _blur(x: Tensor, dilation: int) -> Tensor:
    k = torch.tensor([[1.0, 2.0, 1.0], [2.0, 4.0, 2.0], [1.0, 2.0, 1.0]], dtype=x.dtype, device=x.device) / 16
    k = k[None, None].repeat(x.shape[1], 1, 1, 1)
    padded = F.pad(x, (dilation,) * 4, mode="replicate")
    return F.conv2d(padded, k, groups=x.shape[1], dilation=dilation)


WAVELET_LEVELS = 5
WAVELET_HALO = sum(2**i for i in range(WAVELET_LEVELS))  # 31: how far (in pixels) a wavelet output pixel reads


def _split(x: Tensor, levels: int = WAVELET_LEVELS) -> tuple[Tensor, Tensor]:
    """A-trous decomposition: (sum of the band-pass levels, final low-pass)."""
    high = torch.zeros_like(x)
    for i in range(levels):
        low = _blur(x, 2**i)
        high += x - low
        x = low
    return high, x


def wavelet(content: Tensor, style: Tensor) -> Tensor:
    """Keep the content's high frequencies, take the style's low frequencies (5 levels, radii 1..16). An output
    pixel reads the inputs up to :data:`WAVELET_HALO` pixels away (replicate padding at the image's edges only), so
    a band of rows computed with that many rows of context on each side equals the same rows of the whole."""
    return _split(content)[0] + _split(style)[1]


def color_fix(content: Tensor, style: Tensor, kind: str) -> Tensor:
    if kind == "adain":
        return adain(content, style)
    if kind == "wavelet":
        return wavelet(content, style)
    if kind == "none":
        return content
    raise ValueError(f"unknown colour fix {kind!r} (expected adain, wavelet or none)")
