"""The pipeline's result, assembled from blocks of decoded rows in the order the decoder completes them.

``np`` keeps the float32 image (the fixtures' ``output_float``, from which 16-bit and dithered files are
written) beside the 8-bit one. ``pil`` quantises every block into the 8-bit image as it arrives, so that no
full-size float buffer ever exists: 3 bytes per output pixel instead of 16.
"""

from __future__ import annotations

from typing import Literal, Protocol

import numpy as np
from PIL import Image

from ccsr.geometry import Geometry, finish, quantise_into, resize_image

OutputType = Literal["np", "pil"]


class Result(Protocol):
    def __init__(self, g: Geometry) -> None: ...

    def write(self, top: int, rows: np.ndarray) -> None:
        """Rows ``top : top + len(rows)`` of the processed image, float32 HxWx3 in [0, 1], final."""

    def finish(self) -> tuple[Image.Image, np.ndarray | None, np.ndarray | None]:
        """(8-bit image at the target, float image at the target, float image at the processing size)."""


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
        rows = rows[: max(h - top, 0), :w]
        if len(rows):
            quantise_into(self.pixels[top : top + len(rows)], rows)

    def finish(self) -> tuple[Image.Image, None, None]:
        image = Image.fromarray(self.pixels)
        del self.pixels
        return (image if self.crop else resize_image(image, self.g)), None, None


def result_type(output_type: str) -> type[Result]:
    results: dict[str, type[Result]] = {"np": FloatResult, "pil": ImageResult}
    if output_type not in results:
        raise ValueError(f"unknown output_type {output_type!r} (expected one of {', '.join(results)})")
    return results[output_type]
