"""The pipeline's result, assembled from blocks of decoded rows in the order the decoder completes them.

What happens to the rows on the way is the model's :class:`~ccsr.finishing.Finishing` (CCSR-v1: truncation and
Lanczos; CCSR-v2: rounding, the colour fix on 8-bit values and bicubic); how they are kept is the output type's:

* ``np`` keeps the float32 processed image (the fixtures' ``output_float``) and makes the 8-bit image and the float
  image at the target from it at the end;
* ``pil`` keeps only 8-bit pixels, filled block by block as the rows arrive (3 bytes per pixel instead of 16): the
  float image at the target is never made;
* a :class:`RowSink` (``ccsr.imaging.OutputPixels``: the output file's own pixels) takes the float rows at the
  target size as they complete, resized band by band where the reference resizes the result.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Literal, Protocol, runtime_checkable

import numpy as np
from PIL import Image

from ccsr.finishing import Finishing, Rows
from ccsr.geometry import Geometry
from ccsr.resample import BandedResize


@runtime_checkable
class RowSink(Protocol):
    size: tuple[int, int]  # (w, h) it takes: the output's target size

    def write(self, top: int, rows: np.ndarray) -> None:
        """Rows ``top : top + len(rows)`` of the output, float32 HxWx3 in [0, 1]."""


OutputType = Literal["np", "pil"] | RowSink


class Result(Protocol):
    """Made for one upscale (``result_type(output_type)(geometry, finishing)``), then fed its decoded rows."""

    def write(self, top: int, rows: np.ndarray) -> None:
        """Rows ``top : top + len(rows)`` of the processed image, float32 HxWx3 in [0, 1], top to bottom."""

    def finish(self) -> tuple[Image.Image | None, np.ndarray | None, np.ndarray | None]:
        """(8-bit image at the target, float image at the target, float image at the processing size); None for
        what this result does not keep."""


class FloatResult:
    """The float32 processed image, kept; at the end the 8-bit image and the float image at the target are made
    from it as :class:`ImageResult` and :class:`SinkResult` make theirs (the latter into an array)."""

    def __init__(self, g: Geometry, finishing: Finishing):
        self.g, self.finishing = g, finishing
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
        image, _, _ = _whole(ImageResult(self.g, self.finishing), self.array)
        final = _ArrayRows(self.g.target)
        _whole(SinkResult(self.g, self.finishing, final), self.array)
        return image, final.pixels, self.array


class ImageResult:
    """Only the 8-bit pixels (the finishing's ``bytes`` rows), kept in a uint8 array (3 bytes per pixel; PIL's RGB
    takes 4) that becomes the image at the end, when the decoder's memory is free again, and is resized to the
    target in 8 bits there as the reference does. In pad mode only the target's crop is kept. No float image is
    held beyond what the finishing's stage needs for the rows in flight."""

    def __init__(self, g: Geometry, finishing: Finishing):
        self.g, self.resample, self.stage = g, finishing.resample, finishing.bytes()
        self.crop = g.pad != (0, 0)
        w, h = g.target if self.crop else g.process
        self.pixels = np.empty((h, w, 3), np.uint8)

    def write(self, top: int, rows: np.ndarray) -> None:
        self._take(self.stage.push(top, rows))

    def _take(self, blocks: Rows) -> None:
        h, w = self.pixels.shape[:2]
        for top, block in blocks:
            block = _inside(block, top, w, h)
            self.pixels[top : top + len(block)] = block

    def finish(self) -> tuple[Image.Image, None, None]:
        self._take(self.stage.flush())
        image = Image.fromarray(self.pixels)
        del self.pixels
        if not self.crop and self.g.process != self.g.target:
            image = image.resize(self.g.target, self.resample)
        return image, None, None


class SinkResult:
    """The target's rows (the finishing's ``floats`` rows) handed on to a :class:`RowSink` as they come: pad mode
    crops them; where the reference resizes the processed image back to the target, they go through the same
    resize a band at a time (:class:`ccsr.resample.BandedResize`, equal to Pillow's), so the float image at the
    target is never held."""

    def __init__(self, g: Geometry, finishing: Finishing, sink: RowSink):
        if tuple(sink.size) != g.target:
            (sw, sh), (tw, th) = sink.size, g.target
            raise ValueError(f"the output takes {sw}x{sh}, the upscale gives {tw}x{th}")
        self.g, self.sink, self.stage = g, sink, finishing.floats()
        resized = g.pad == (0, 0) and g.process != g.target
        self.resizer = BandedResize(g.process, g.target, finishing.resample) if resized else None

    def write(self, top: int, rows: np.ndarray) -> None:
        self._hand_on(self.stage.push(top, rows))

    def _hand_on(self, blocks: Rows) -> None:
        for top, block in blocks:
            if self.resizer is not None:
                for first, resized in self.resizer.push(top, block):
                    self.sink.write(first, np.clip(resized, 0.0, 1.0, out=resized))
                continue
            block = _inside(block, top, *self.g.target)
            if len(block):
                self.sink.write(top, block)

    def finish(self) -> tuple[None, None, None]:
        self._hand_on(self.stage.flush())
        return None, None, None


class _ArrayRows:
    """A :class:`RowSink` into a new float32 array (``FloatResult``'s final image)."""

    def __init__(self, size: tuple[int, int]):
        self.size = size
        self.pixels = np.empty((size[1], size[0], 3), np.float32)

    def write(self, top: int, rows: np.ndarray) -> None:
        self.pixels[top : top + len(rows)] = rows


def _whole(result: Result, processed: np.ndarray) -> tuple[Image.Image | None, np.ndarray | None, np.ndarray | None]:
    result.write(0, processed)
    return result.finish()


def _inside(rows: np.ndarray, top: int, width: int, height: int) -> np.ndarray:
    """The part of rows ``top ...`` that falls inside ``width`` x ``height`` (pad mode's crop)."""
    return rows[: max(height - top, 0), :width]


def result_type(output_type: OutputType) -> Callable[[Geometry, Finishing], Result]:
    """What assembles the result for ``output_type`` ("np", "pil" or a :class:`RowSink`), made with the upscale's
    geometry and the model's :class:`~ccsr.finishing.Finishing`."""
    if isinstance(output_type, RowSink):
        sink = output_type
        return lambda g, finishing: SinkResult(g, finishing, sink)
    results: dict[str, Callable[[Geometry, Finishing], Result]] = {"np": FloatResult, "pil": ImageResult}
    if output_type not in results:
        raise ValueError(f"unknown output_type {output_type!r} (expected one of np, pil or a row sink)")
    return results[output_type]
