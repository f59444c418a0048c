"""The pipeline's result, assembled from blocks of decoded rows in the order the decoder completes them.

``np`` keeps the float32 image (the fixtures' ``output_float``) beside the 8-bit one. ``pil`` quantises every
block into the 8-bit image as it arrives, so that no full-size float buffer ever exists: 3 bytes per output pixel
instead of 16. A :class:`RowSink` (``ccsr.imaging.OutputPixels``: the output file's own pixels) takes the rows at
the target size as they complete, resized band by band where the reference resizes the result.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Literal, Protocol, runtime_checkable

import numpy as np
from PIL import Image

from ccsr.geometry import Geometry, finish, quantise_into, resize_image
from ccsr.resample import BandedLanczos


@runtime_checkable
class RowSink(Protocol):
    size: tuple[int, int]  # (w, h) it takes: the output's target size

    def write(self, top: int, rows: np.ndarray) -> None:
        """Rows ``top : top + len(rows)`` of the output, float32 HxWx3 in [0, 1]."""


OutputType = Literal["np", "pil"] | RowSink


class Result(Protocol):
    """Made for one upscale's geometry (``result_type(output_type)(g)``), then fed its decoded rows."""

    def write(self, top: int, rows: np.ndarray) -> None:
        """Rows ``top : top + len(rows)`` of the processed image, float32 HxWx3 in [0, 1], final."""

    def finish(self) -> tuple[Image.Image | None, np.ndarray | None, np.ndarray | None]:
        """(8-bit image at the target, float image at the target, float image at the processing size); None for
        what this result does not keep."""


class FloatResult:
    """The float32 processed image; the 8-bit image is quantised from it at the end, as the reference does."""

    def __init__(self, g: Geometry):
        self.g = g
        self.array: np.ndarray | None = None

    def write(self, top: int, rows: np.ndarray) -> None:
        height = self.g.process[1]
        if self.array is None and top == 0 and len(rows) == height:
            self.array = rows  # the whole image in one block: kept as it is, no copy
            return
        if self.array is None:
            self.array = np.empty((height, rows.shape[1], 3), np.float32)
        self.array[top : top + len(rows)] = rows

    def finish(self) -> tuple[Image.Image, np.ndarray, np.ndarray]:
        assert self.array is not None, "no rows were written"
        image, final = finish(self.array, self.g)
        return image, final, self.array


class ImageResult:
    """Only the 8-bit pixels, quantised block by block into a uint8 array (3 bytes per pixel; PIL's RGB takes 4)
    that becomes the image at the end, when the decoder's memory is free again. In pad mode only the target's
    crop is kept."""

    def __init__(self, g: Geometry):
        self.g = g
        self.crop = g.pad != (0, 0)
        w, h = g.target if self.crop else g.process
        self.pixels = np.empty((h, w, 3), np.uint8)

    def write(self, top: int, rows: np.ndarray) -> None:
        h, w = self.pixels.shape[:2]
        rows = _inside(rows, top, w, h)
        if len(rows):
            quantise_into(self.pixels[top : top + len(rows)], rows)

    def finish(self) -> tuple[Image.Image, None, None]:
        image = Image.fromarray(self.pixels)
        del self.pixels
        return (image if self.crop else resize_image(image, self.g)), None, None


class SinkResult:
    """The target's rows handed on to a :class:`RowSink` as they arrive: pad mode crops them; where the reference
    resizes the processed image back to the target, they go through the same Lanczos resize a band at a time
    (:class:`ccsr.resample.BandedLanczos`, equal to Pillow's)."""

    def __init__(self, g: Geometry, sink: RowSink):
        if tuple(sink.size) != g.target:
            (sw, sh), (tw, th) = sink.size, g.target
            raise ValueError(f"the output takes {sw}x{sh}, the upscale gives {tw}x{th}")
        self.g, self.sink = g, sink
        self.resizer = BandedLanczos(g.process, g.target) if g.pad == (0, 0) and g.process != g.target else None

    def write(self, top: int, rows: np.ndarray) -> None:
        if self.resizer is not None:
            for first, resized in self.resizer.push(top, rows):
                self.sink.write(first, np.clip(resized, 0.0, 1.0, out=resized))
            return
        rows = _inside(rows, top, *self.g.target)
        if len(rows):
            self.sink.write(top, rows)

    def finish(self) -> tuple[None, None, None]:
        return None, None, None


def _inside(rows: np.ndarray, top: int, width: int, height: int) -> np.ndarray:
    """The part of rows ``top ...`` that falls inside ``width`` x ``height`` (pad mode's crop)."""
    return rows[: max(height - top, 0), :width]


def result_type(output_type: OutputType) -> Callable[[Geometry], Result]:
    """What assembles the result for ``output_type``: "np", "pil" or a :class:`RowSink`."""
    if isinstance(output_type, RowSink):
        sink = output_type
        return lambda g: SinkResult(g, sink)
    results: dict[str, type[Result]] = {"np": FloatResult, "pil": ImageResult}
    if output_type not in results:
        raise ValueError(f"unknown output_type {output_type!r} (expected one of np, pil or a row sink)")
    return results[output_type]
