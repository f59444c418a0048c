"""Pillow's resize of a float image (Lanczos or bicubic), bit for bit, computed a band of rows at a time.

``Image.resize(size, filter)`` in mode "F" needs the whole image (and per channel, a copy of it). Here the same
arithmetic (Pillow's ``Resample.c``: antialiased filter weights in double, normalised per output pixel; a horizontal
pass, rounded to float32, then a vertical pass; each output a double sum in kernel order) runs on rows as they
arrive, and an output row is handed out once the input rows under its kernel are in. Only those rows are held.
CCSR-v1 resizes its result back to the target with Lanczos, CCSR-v2 with bicubic.
"""

from __future__ import annotations

import math
from collections.abc import Callable, Iterator
from dataclasses import dataclass

import numpy as np
from PIL import Image

BLOCK_ROWS = 64  # rows per pass: bounds the float64 temporaries


@dataclass(frozen=True)
class Filter:
    """One of Pillow's resampling filters: its support (in input pixels at scale 1) and weight function."""

    support: float
    weight: Callable[[float], float]


def _sinc(x: float) -> float:
    if x == 0.0:
        return 1.0
    x *= math.pi
    return math.sin(x) / x


def _lanczos(x: float) -> float:
    """Pillow's ``lanczos_filter`` (Lanczos-3)."""
    if -3.0 <= x < 3.0:
        return _sinc(x) * _sinc(x / 3.0)
    return 0.0


def _bicubic(x: float) -> float:
    """Pillow's ``bicubic_filter`` (Keys' cubic, a = -0.5), in its order of operations."""
    a = -0.5
    if x < 0.0:
        x = -x
    if x < 1.0:
        return ((a + 2.0) * x - (a + 3.0)) * x * x + 1
    if x < 2.0:
        return (((x - 5) * x + 8) * x - 4) * a
    return 0.0


FILTERS = {Image.Resampling.LANCZOS: Filter(3.0, _lanczos), Image.Resampling.BICUBIC: Filter(2.0, _bicubic)}


def coefficients(in_size: int, out_size: int, resample: Image.Resampling = Image.Resampling.LANCZOS
                 ) -> tuple[np.ndarray, np.ndarray]:
    """``(first, weights)``: output pixel ``i`` is ``sum_k in[first[i] + k] * weights[i, k]`` (zero-padded)."""
    f = _filter(resample)
    scale = in_size / out_size
    filterscale = max(scale, 1.0)
    support = f.support * filterscale
    ksize = math.ceil(support) * 2 + 1
    first = np.zeros(out_size, np.int64)
    weights = np.zeros((out_size, ksize), np.float64)
    for i in range(out_size):
        center = (i + 0.5) * scale
        lo = max(int(center - support + 0.5), 0)
        hi = min(int(center + support + 0.5), in_size)
        w = [f.weight((x + lo - center + 0.5) * (1.0 / filterscale)) for x in range(hi - lo)]
        total = 0.0
        for v in w:  # in order, as Pillow (Python 3.12's sum() would compensate)
            total += v
        first[i] = lo
        weights[i, : len(w)] = [v / total if total != 0.0 else v for v in w]
    return first, weights


def _apply(rows: np.ndarray, first: np.ndarray, weights: np.ndarray, axis: int) -> np.ndarray:
    """One pass along ``axis`` (0: rows, 1: columns) of float32 HxWxC, summed in double in kernel order."""
    n = rows.shape[axis]
    acc = None
    for k in range(weights.shape[1]):
        idx = np.minimum(first + k, n - 1)  # past the kernel's end the weight is 0: any index will do
        w = weights[:, k]
        if not w.any():
            continue
        taken = np.take(rows, idx, axis=axis).astype(np.float64)
        term = taken * (w[:, None, None] if axis == 0 else w[None, :, None])
        if acc is None:
            acc = term
        else:
            acc += term
    assert acc is not None
    return acc.astype(np.float32)


def _filter(resample: Image.Resampling) -> Filter:
    if resample not in FILTERS:
        raise ValueError(f"no banded resize for {Image.Resampling(resample).name} (expected LANCZOS or BICUBIC)")
    return FILTERS[resample]


class BandedResize:
    """Resize float32 HxWxC from ``in_size`` to ``out_size`` (w, h) with ``resample`` (Lanczos or bicubic), with
    :meth:`push` fed the input rows top to bottom; it yields ``(first output row, rows)`` as soon as they are
    complete. Equal to Pillow's per-channel mode-"F" resize (a pass is skipped where Pillow skips it: same width,
    or same height)."""

    def __init__(self, in_size: tuple[int, int], out_size: tuple[int, int],
                 resample: Image.Resampling = Image.Resampling.LANCZOS):
        (self.in_w, self.in_h), (self.out_w, self.out_h) = in_size, out_size
        _filter(resample)  # an unknown filter is refused here, not at the first row
        self.horizontal = coefficients(self.in_w, self.out_w, resample) if self.in_w != self.out_w else None
        self.vertical = coefficients(self.in_h, self.out_h, resample) if self.in_h != self.out_h else None
        if self.vertical is not None:
            first, weights = self.vertical
            used = np.array([np.flatnonzero(row).max() if row.any() else 0 for row in weights])
            self.needs = first + used + 1  # input rows needed (exclusive end) for each output row
        self.buffer: np.ndarray | None = None  # horizontally resized input rows, from input row buffer_top
        self.buffer_top = 0
        self.received = 0
        self.done = 0  # output rows handed out

    def push(self, top: int, rows: np.ndarray) -> Iterator[tuple[int, np.ndarray]]:
        if top != self.received:
            raise ValueError(f"rows must come in order: expected row {self.received}, got {top}")
        for r in range(0, len(rows), BLOCK_ROWS):
            part = self._horizontal(rows[r : r + BLOCK_ROWS])
            self.received += len(part)
            if self.vertical is None:
                yield self.done, part
                self.done += len(part)
                continue
            self.buffer = part if self.buffer is None else np.concatenate([self.buffer, part])
            yield from self._vertical()

    def _horizontal(self, rows: np.ndarray) -> np.ndarray:
        if self.horizontal is None:
            return np.array(rows, dtype=np.float32)  # a copy: the caller may reuse its rows
        first, weights = self.horizontal
        return _apply(rows, first, weights, axis=1)

    def _vertical(self) -> Iterator[tuple[int, np.ndarray]]:
        """Every output row whose input rows are all in, a block at a time; then the rows no later one reads go."""
        assert self.vertical is not None and self.buffer is not None
        first, weights = self.vertical
        while self.done < self.out_h and self.needs[self.done] <= self.received:
            end = self.done
            while end < min(self.out_h, self.done + BLOCK_ROWS) and self.needs[end] <= self.received:
                end += 1
            span = slice(self.done, end)
            lo = int(first[self.done]) - self.buffer_top
            window = self.buffer[lo : int(self.needs[end - 1]) - self.buffer_top]
            yield self.done, _apply(window, first[span] - first[self.done], weights[span], axis=0)
            self.done = end
            if self.done < self.out_h:
                keep = int(first[self.done])  # the first rows never decrease
                self.buffer, self.buffer_top = self.buffer[keep - self.buffer_top :], keep
