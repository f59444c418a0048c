"""Every limit of the imaging module in one place (imgproxy's ``security.Checker`` idea).

:class:`Limits` is a frozen value; its ``check_*`` methods are the only places that decide whether an input is
too big. The decoder, the pipeline, the server and the URL fetcher all take a ``Limits`` and ask it.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Literal, NamedTuple

from .errors import ImageError
from .formats import DECODABLE


@dataclass(frozen=True)
class Limits:
    """Limits for untrusted input. Defaults follow imgproxy (50 MP, 5 s downloads) and Runware (4096 output).

    - ``max_input_pixels``: width x height of the *encoded* image, read from the header before any pixel is
      decoded (imgproxy ``MAX_SRC_RESOLUTION``).
    - ``max_input_bytes``: size of the encoded input (also the download cap of :func:`fetch_image`).
    - ``max_output_side``: both output sides must be <= this (Runware's 4096x4096 cap); :func:`fit_scale`
      shrinks the input first, as Runware documents.
    - ``formats``: the decoder allow-list.
    - ``animated``: ``"reject"`` (default: an animation is refused with code ``animated``, nothing is dropped
      silently) or ``"first_frame"`` (upscale frame 0 only).
    - ``fetch_timeout`` / ``max_redirects``: for :func:`ccsr.imaging.fetch.fetch` of input URLs.
    """

    max_input_pixels: int = 50_000_000
    max_input_bytes: int = 64 * 1024 * 1024
    max_output_side: int = 4096
    formats: frozenset[str] = DECODABLE  # sniffed from magic bytes, never from a file name or a MIME type
    animated: Literal["reject", "first_frame"] = "reject"
    fetch_timeout: float = 5.0
    max_redirects: int = 5

    def check_input_bytes(self, n: int) -> None:
        if n > self.max_input_bytes:
            raise ImageError("too_large_bytes", f"input is {n} bytes; the limit is {self.max_input_bytes}")
        if n == 0:
            raise ImageError("unsupported_format", "input is empty")

    def check_format(self, fmt: str | None) -> str:
        if fmt is None or fmt not in self.formats:
            allowed = ", ".join(sorted(self.formats))
            what = "not a recognised image" if fmt is None else f"{fmt} is not allowed"
            raise ImageError("unsupported_format", f"{what}; accepted formats: {allowed}")
        return fmt

    def check_input_pixels(self, size: tuple[int, int]) -> None:
        w, h = size
        if w <= 0 or h <= 0:
            raise ImageError("corrupt", f"image header gives an empty size {w}x{h}")
        if w * h > self.max_input_pixels:
            raise ImageError(
                "too_many_pixels", f"image is {w}x{h} = {w * h} pixels; the limit is {self.max_input_pixels}"
            )

    def check_frames(self, n_frames: int) -> None:
        if n_frames > 1 and self.animated == "reject":
            raise ImageError(
                "animated", f"animated images are not supported ({n_frames} frames); send a single frame"
            )

    def check_output(self, size: tuple[int, int]) -> None:
        w, h = size
        if w > self.max_output_side or h > self.max_output_side:
            raise ImageError(
                "too_large_output",
                f"output {w}x{h} exceeds {self.max_output_side}x{self.max_output_side}",
            )


def output_size(size: tuple[int, int], scale: float) -> tuple[int, int]:
    """The exact output size for ``scale``: ``ceil(scale * side)`` per side, as the reference code does.

    The product is rounded to 9 decimals before ``ceil`` so that ``1.1 * 10`` gives 11, not 12.
    """
    return tuple(max(1, math.ceil(round(scale * s, 9))) for s in size)  # type: ignore[return-value]


class Fit(NamedTuple):
    """What :func:`fit_scale` decided: ``shrink`` is None when the input is used as is, else the factor (< 1)
    applied to the input, and ``input_size`` is the size the model must receive."""

    shrink: float | None
    input_size: tuple[int, int]

    def output_size(self, scale: float) -> tuple[int, int]:
        return output_size(self.input_size, scale)


DEFAULT_LIMITS = Limits()


def fit_scale(size: tuple[int, int], scale: float, limits: Limits = DEFAULT_LIMITS) -> Fit:
    """Shrink the input first so the output fits ``max_output_side`` on both sides (Runware's documented rule:
    "a 2048x2048 image with an upscaleFactor of 4 will first be reduced to 1024x1024").

    The aspect ratio is kept (both sides scaled by one factor, floored, at least 1 px), and the result is
    guaranteed to satisfy ``limits.check_output(output_size(input_size, scale))``.
    """
    if scale <= 0:
        raise ImageError("invalid_option", f"scale must be positive, got {scale}")
    w, h = size
    cap = limits.max_output_side
    ow, oh = output_size(size, scale)
    if ow <= cap and oh <= cap:
        return Fit(None, (w, h))
    factor = min(cap / (scale * w), cap / (scale * h))
    # + 1e-6: 512.0 must not become 511 through float error; the loops below undo any overshoot.
    nw, nh = max(1, math.floor(w * factor + 1e-6)), max(1, math.floor(h * factor + 1e-6))
    # Float rounding may leave ceil(scale * n) one pixel over the cap; step down until it fits.
    while output_size((nw, 1), scale)[0] > cap and nw > 1:
        nw -= 1
    while output_size((1, nh), scale)[1] > cap and nh > 1:
        nh -= 1
    fit = Fit(min(nw / w, nh / h), (nw, nh))
    limits.check_output(fit.output_size(scale))  # scale alone too large for a 1-px side
    return fit
