"""What a model does between its decoded image and the output's pixels; :mod:`ccsr.result` assembles the output.

A :class:`Finishing` is the model's rule. It gives two row stages over the processed image (the processing size,
float32 HxWx3 in [0, 1], fed top to bottom) and the filter that takes their rows to the target size:

* ``floats()``: the float image before the resize (what a row sink and ``UpscaleOutput.final`` are made of);
* ``bytes()``: the 8-bit image the reference saves before its own 8-bit resize (what ``UpscaleOutput.image`` is).

CCSR-v1 (:data:`TRUNCATE_LANCZOS`): the pipeline colour-fixes the float rows itself, so they are final; the 8-bit
image truncates them; Lanczos. CCSR-v2 (:class:`ColourFixAfterRounding`): the 8-bit image is the decoder's output
rounded, colour-fixed on 8-bit values and truncated (the reference's ``ToPILImage``); the float image is the same
colour fix without the rounding and the truncation; bicubic.
"""

from __future__ import annotations

from collections.abc import Iterator
from typing import Protocol

import numpy as np
import torch
from PIL import Image

from ccsr.colorfix import WAVELET_HALO, adain_with, mean_std, wavelet

Rows = Iterator[tuple[int, np.ndarray]]  # (first row, rows) blocks, top to bottom
BLOCK_PIXELS = 1 << 20  # pixels per block a stage hands on: bounds its temporaries
# pixels per colour-fixed band (CCSR-v2): the wavelet holds ~8 float planes of a band and its context rows (~100 MB
# here, whatever the image size); 512 rows at 2048 px wide, where the context adds 12 % to its work
BAND_PIXELS = 1 << 20


class RowStage(Protocol):
    def push(self, top: int, rows: np.ndarray) -> Rows:
        """Rows ``top : top + len(rows)`` of the processed image in; out, the finished rows complete so far."""

    def flush(self) -> Rows:
        """The finished rows still held, once every row has been pushed."""


class Finishing(Protocol):
    resample: Image.Resampling  # the filter from the processing size to the target

    def floats(self) -> RowStage:
        """float32 HxWx3 rows in [0, 1]."""

    def bytes(self) -> RowStage:
        """uint8 HxWx3 rows, quantised as the reference."""


def _blocks(rows: np.ndarray, top: int) -> Rows:
    step = max(1, BLOCK_PIXELS // max(1, rows.shape[1]))
    for r in range(0, len(rows), step):
        yield top + r, rows[r : r + step]


class _Final:
    """The rows are final: handed on as they are."""

    def push(self, top: int, rows: np.ndarray) -> Rows:
        yield top, rows

    def flush(self) -> Rows:
        return iter(())


class _Truncated:
    """``(x * 255).clip(0, 255).astype(uint8)`` (the reference v1's quantisation), a block of rows at a time."""

    def push(self, top: int, rows: np.ndarray) -> Rows:
        for first, block in _blocks(rows, top):
            yield first, (block * np.float32(255)).clip(0, 255).astype(np.uint8)

    def flush(self) -> Rows:
        return iter(())


class TruncateFinishing:
    """CCSR-v1's rule (see the module docstring)."""

    resample = Image.Resampling.LANCZOS

    def floats(self) -> RowStage:
        return _Final()

    def bytes(self) -> RowStage:
        return _Truncated()


TRUNCATE_LANCZOS = TruncateFinishing()


def unit_float32(pixels: np.ndarray) -> np.ndarray:
    """uint8 -> float32 in [0, 1] as CCSR-v2's reference converts (``np.float32(u8) / 255.0``, divided in float32;
    here in place of the converted copy); float input unchanged."""
    if pixels.dtype != np.uint8:
        return pixels
    out = pixels.astype(np.float32)
    return np.divide(out, np.float32(255.0), out=out)


def _chw(pixels: np.ndarray) -> torch.Tensor:
    """HxWx3 -> a contiguous [1, 3, H, W] float32 tensor (the reference's ``ToTensor`` layout)."""
    return torch.from_numpy(unit_float32(pixels)).permute(2, 0, 1)[None].contiguous()


class ColourFixAfterRounding:
    """CCSR-v2's rule (see the module docstring) against ``lr``, the input at the processing size (HxWx3, uint8
    for 8-bit input, else float32 in [0, 1]).

    ``adain`` needs the statistics of the whole image, so its rows come out at :meth:`RowStage.flush`, once every
    row is in; its 8-bit statistics are the reference's float32 reductions, which take one float copy of the
    8-bit image at the processing size while they run (the decoder's float output has been released by then).
    ``wavelet`` reads :data:`ccsr.colorfix.WAVELET_HALO` rows around each one: a band comes out as soon as the rows
    below it are in, computed with that context, and equals the same rows of the whole-image fix. ``none`` hands
    each row on as it comes. Either way the bands are bounded (:data:`BAND_PIXELS`)."""

    resample = Image.Resampling.BICUBIC

    def __init__(self, lr: np.ndarray, fix: str):
        if fix not in ("adain", "wavelet", "none"):
            raise ValueError(f"unknown colour fix {fix!r} (expected adain, wavelet or none)")
        self.lr, self.fix = lr, fix
        self.style_stats = mean_std(_chw(lr)) if fix == "adain" else None

    def floats(self) -> RowStage:
        return _ColourFixed(self, eight_bit=False)

    def bytes(self) -> RowStage:
        return _ColourFixed(self, eight_bit=True)


class _ColourFixed:
    """One of :class:`ColourFixAfterRounding`'s stages. The processed image is kept as it arrives (the pushed array
    itself when it comes whole; the 8-bit stage keeps its rounded values, planar, 3 bytes a pixel)."""

    def __init__(self, rule: ColourFixAfterRounding, eight_bit: bool):
        self.rule, self.eight_bit = rule, eight_bit
        self.height, self.width = rule.lr.shape[:2]
        self.image: np.ndarray | None = None  # HxWx3 float32, or 3xHxW uint8 when eight_bit
        self.received = 0  # rows pushed
        self.done = 0  # rows handed out

    def push(self, top: int, rows: np.ndarray) -> Rows:
        if top != self.received:
            raise ValueError(f"rows must come in order: expected row {self.received}, got {top}")
        self.received += len(rows)
        if self.rule.fix == "none":
            yield from (_rounded(rows, top) if self.eight_bit else _Final().push(top, rows))
            return
        self._keep(top, rows)
        if self.rule.fix == "wavelet":
            complete = self.height if self.received == self.height else self.received - WAVELET_HALO
            yield from self._bands(complete)

    def flush(self) -> Rows:
        if self.received != self.height:
            raise ValueError(f"{self.height - self.received} rows of the processed image never came")
        if self.rule.fix != "none":
            yield from self._bands(self.height)
        self.image = None

    def _keep(self, top: int, rows: np.ndarray) -> None:
        if self.eight_bit:
            if self.image is None:
                self.image = np.empty((3, self.height, self.width), np.uint8)
            for first, block in _rounded(rows, top):
                self.image[:, first : first + len(block)] = block.transpose(2, 0, 1)
        elif top == 0 and len(rows) == self.height:
            self.image = rows  # the whole image in one block: kept as it is, no copy
        else:
            if self.image is None:
                self.image = np.empty((self.height, self.width, 3), np.float32)
            self.image[top : top + len(rows)] = rows

    def _content(self, lo: int, hi: int) -> torch.Tensor:
        """Rows ``lo:hi`` as the colour fix's content: contiguous [1, 3, rows, W] float32."""
        assert self.image is not None
        if self.eight_bit:
            return torch.from_numpy(unit_float32(self.image[:, lo:hi]))[None].contiguous()
        return torch.from_numpy(self.image[lo:hi]).permute(2, 0, 1)[None].contiguous()

    def _bands(self, end: int) -> Rows:
        """The fixed rows ``done:end``, a band at a time, clamped (and truncated to 8 bits)."""
        rule = self.rule
        stats = None
        if rule.fix == "adain" and self.done < end:
            assert end == self.height
            stats = mean_std(self._content(0, self.height))  # the whole image's: one float copy while it runs
        halo = WAVELET_HALO if rule.fix == "wavelet" else 0
        step = max(1, BAND_PIXELS // self.width)
        while self.done < end:
            a, b = self.done, min(self.done + step, end)
            lo, hi = max(a - halo, 0), min(b + halo, self.height)
            content = self._content(lo, hi)
            if stats is not None:
                assert rule.style_stats is not None
                fixed = adain_with(content, stats, rule.style_stats)
            else:
                fixed = wavelet(content, _chw(rule.lr[lo:hi]))
            del content
            fixed = fixed[:, :, a - lo : b - lo].clamp_(0, 1)
            if self.eight_bit:
                fixed = fixed.mul_(255).byte()  # truncation, as ToPILImage
            self.done = b
            yield a, np.ascontiguousarray(fixed[0].permute(1, 2, 0).numpy())


def _rounded(rows: np.ndarray, top: int) -> Rows:
    """``round(x * 255)`` to uint8 (numpy's round: half to even), as the reference's pipeline output."""
    for first, block in _blocks(rows, top):
        yield first, (block * np.float32(255)).round().astype(np.uint8)
