"""restore profile -> gray -> flatten (JPG) -> quantise: the model's rows made into the output file's pixels.

Every step works on one pixel at a time (the ordered dither knows each block's first row), so the rows may
arrive in bands, as ``CCSRPipeline.run(output_type=pixels)`` hands them out, or as one whole image
(:func:`ccsr.imaging.encode`): either way they are converted a block of about a million pixels at a time, and
what is kept is the integer array the file is written from (3 bytes per pixel for 8-bit RGB, not the 12 of a
float image). The bytes do not depend on how the rows were split.
"""

from __future__ import annotations

from collections.abc import Callable

import numpy as np
from PIL import Image

from . import color as cms
from .errors import ImageError
from .formats import BY_NAME
from .pixels import quantize_array, resize_alpha
from .values import DEFAULT_ENCODE, DecodedImage, EncodeOptions, UpscaledImage

BLOCK_PIXELS = 1 << 20
QUANTIZE_MODES = ("round", "dither", "reference")
_LUMA = np.array([0.299, 0.587, 0.114], dtype=np.float32)  # ITU-R 601, as Pillow's convert("L")

PixelStep = Callable[[np.ndarray], np.ndarray]


Source = DecodedImage | UpscaledImage  # what the output takes its alpha, colour and metadata from


def check_quantize(quantize: str) -> None:
    if quantize not in QUANTIZE_MODES:
        raise ImageError("invalid_option", f"quantize must be one of {', '.join(QUANTIZE_MODES)}")


def _unchanged(x: np.ndarray) -> np.ndarray:
    return x


def _through_8bit(convert: Callable[[Image.Image], Image.Image]) -> PixelStep:
    """A LittleCMS conversion (8-bit only) as a float step."""

    def step(x: np.ndarray) -> np.ndarray:
        return np.asarray(convert(Image.fromarray(quantize_array(x, 8), "RGB")), dtype=np.float32) / 255.0

    return step


def profile_step(source: Source, keep: bool, bits: int) -> tuple[PixelStep, bytes | None, list[str]]:
    """How float pixels in sRGB (or the source space) become pixels in the output space.

    Returns ``(step, icc_to_embed, notes)``.
    """
    icc = source.icc_profile
    if icc is None:
        return _unchanged, None, []
    if not source.rgb_is_srgb:  # 16-bit data left in a LUT/CMYK-profile space by the decoder
        if keep or bits == 16:
            return _unchanged, icc, [] if keep else ["kept the source profile: no 16-bit conversion exists for it"]
        return _through_8bit(lambda im: cms.lcms_to_srgb(im, icc)), None, []
    if not keep:
        return _unchanged, None, []
    matrix = cms.parse_matrix_profile(icc)
    if matrix is not None and matrix.matrix is not None:
        if cms.is_srgb(matrix):
            return _unchanged, icc, []
        return (lambda x: cms.float_from_srgb(x, matrix)), icc, []
    if cms.icc_color_space(icc) == "RGB" and bits == 8:
        return _through_8bit(lambda im: cms.lcms_from_srgb(im, icc)), icc, []
    space = cms.icc_color_space(icc) or "unknown"
    return _unchanged, cms.srgb_profile_bytes(), [f"source profile ({space}) not restorable here: output is sRGB"]


class OutputPixels:
    """The output file's pixels (uint8 or uint16; gray or RGB, with alpha unless flattened for JPG), filled from
    the model's rows: float32 HxWx3 in [0, 1], or uint8 for the model's own 8-bit bytes.

    It is a row sink for ``CCSRPipeline.run(output_type=...)``: ``size`` says what it takes, ``write`` takes
    rows ``top : top + len(rows)``. :func:`ccsr.imaging.encode_pixels` writes the file once every row is there.
    """

    def __init__(
        self,
        source: Source,
        size: tuple[int, int],
        options: EncodeOptions = DEFAULT_ENCODE,
        *,
        quantize: str = "round",
    ):
        o = options.validated()
        check_quantize(quantize)
        self.source, self.size, self.options = source, size, o
        self.bits = o.bit_depth or (16 if source.bit_depth == 16 and BY_NAME[o.format].high_depth else 8)
        self.dither = quantize == "dither" and self.bits == 8
        # "reference": the rows should be the model's own 8-bit bytes (8-bit sources; 16-bit ones always round)
        self.takes_model_bytes = quantize == "reference" and source.bit_depth == 8 and self.bits == 8
        self.to_output, icc, self.notes = profile_step(source, o.keep_metadata, self.bits)
        if source.grayscale and icc is not None and cms.icc_color_space(icc) != "GRAY":
            icc = None  # an RGB profile cannot tag gray pixels; they are in sRGB's tone curve (implied)
        self.icc = icc
        w, h = size
        alpha = source.alpha
        if alpha is not None and alpha.shape[:2] != (h, w):
            alpha = resize_alpha(alpha, size)
        self.background: np.ndarray | None = None
        if o.format == "JPEG" and alpha is not None:
            bg = np.asarray(o.background, dtype=np.float32) / 255.0
            self.background = bg @ _LUMA if source.grayscale else bg
        self.alpha = alpha
        channels = (1 if source.grayscale else 3) + (alpha is not None and self.background is None)
        shape = (h, w) if channels == 1 else (h, w, channels)
        self.pixels = np.empty(shape, np.uint8 if self.bits == 8 else np.uint16)
        self._written = np.zeros(h, bool)

    def write(self, top: int, rows: np.ndarray) -> None:
        w, h = self.size
        if rows.ndim != 3 or rows.shape[1:] != (w, 3) or top < 0 or top + len(rows) > h:
            raise ImageError(
                "model_output", f"rows {top}..{top + len(rows)} of shape {rows.shape[1:]} do not fit a {w}x{h} output"
            )
        step = max(1, BLOCK_PIXELS // w)
        for r in range(0, len(rows), step):
            self._write_block(top + r, rows[r : r + step])
        self._written[top : top + len(rows)] = True

    def write_image(self, image: Image.Image) -> None:
        """The whole output as an 8-bit image, a block of rows at a time."""
        w, h = image.size
        step = max(1, BLOCK_PIXELS // w)
        for r in range(0, h, step):
            self.write(r, np.asarray(image.crop((0, r, w, min(r + step, h))).convert("RGB")))

    def _write_block(self, top: int, rows: np.ndarray) -> None:
        x = rows.astype(np.float32) / np.float32(255.0) if rows.dtype == np.uint8 else rows
        x = self.to_output(x)
        if self.source.grayscale:
            x = x @ _LUMA
        band = slice(top, top + len(rows))
        alpha = None if self.alpha is None else self.alpha[band]
        if alpha is not None and self.background is not None:
            a = alpha if x.ndim == 2 else alpha[..., None]
            x, alpha = x * a + self.background * (1.0 - a), None
        q = quantize_array(x, self.bits, dither=self.dither, top=top)
        out = self.pixels[band]
        if alpha is None:
            out[...] = q
        else:
            out[..., :-1] = q if q.ndim == 3 else q[..., None]
            out[..., -1] = quantize_array(alpha, self.bits)

    def missing_rows(self) -> int:
        return int((~self._written).sum())
