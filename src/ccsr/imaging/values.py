"""The values that flow through the imaging pipeline (all immutable)."""

from __future__ import annotations

from dataclasses import dataclass, field
from functools import cached_property

import numpy as np
from PIL import Image

from .errors import ImageError
from .formats import ENCODABLE, find
from .pixels import quantize_array


@dataclass(frozen=True, eq=False)
class DecodedImage:
    """An input image made ready for the model.

    - ``rgb``: what the model receives, already oriented and in sRGB (see ``rgb_is_srgb``): a Pillow "RGB"
      image for 8-bit sources, float32 HxWx3 in [0, 1] for 16-bit sources. Grayscale sources are expanded
      to RGB.
    - ``alpha``: float32 HxW in [0, 1], or None when the source had no transparency.
    - ``icc_profile``: the source's original profile bytes (kept for the output), or None.
    - ``rgb_is_srgb``: False only when a 16-bit image carries a profile we cannot convert in float (CMYK/LUT);
      ``rgb`` is then in the source space and the output re-embeds the profile unchanged.
    - ``exif``: the source EXIF block (bytes, orientation still inside; the encoder drops it), ``xmp``: bytes.
    - ``orientation``: the EXIF orientation (1-8) that was applied.
    - ``bit_depth``: 8 or 16 (bits per sample of the source), ``source_format``: "PNG", "JPEG", ...
    - ``grayscale``: the source had no colour (outputs are then written as gray).
    - ``notes``: human lines about anything the decoder had to decide (ignored broken profile, first frame
      ...).
    """

    rgb: Image.Image | np.ndarray
    alpha: np.ndarray | None
    icc_profile: bytes | None
    rgb_is_srgb: bool
    exif: bytes | None
    xmp: bytes | None
    orientation: int
    bit_depth: int
    source_format: str
    grayscale: bool = False
    notes: tuple[str, ...] = ()

    @property
    def size(self) -> tuple[int, int]:
        """(width, height) after orientation."""
        if isinstance(self.rgb, Image.Image):
            return self.rgb.size
        return (self.rgb.shape[1], self.rgb.shape[0])


@dataclass(frozen=True, eq=False)
class UpscaledImage:
    """The model's output with everything the encoder needs.

    - ``final``: float32 HxWx3 in [0, 1], the model's unquantised output.
    - ``reference8``: uint8 HxWx3, the model's own 8-bit ``.image`` when ``quantize == "reference"`` (8-bit
      sources only), else None.
    - ``alpha``: float32 HxW in [0, 1] (Lanczos-upscaled source alpha) or None.
    The metadata fields are carried over from :class:`DecodedImage`.
    """

    final: np.ndarray
    reference8: np.ndarray | None
    alpha: np.ndarray | None
    icc_profile: bytes | None
    rgb_is_srgb: bool
    exif: bytes | None
    xmp: bytes | None
    bit_depth: int
    source_format: str
    grayscale: bool = False
    quantize: str = "round"
    notes: tuple[str, ...] = ()

    @property
    def size(self) -> tuple[int, int]:
        return (self.final.shape[1], self.final.shape[0])

    @cached_property
    def image8(self) -> np.ndarray:
        """uint8 HxWx3 as ``quantize`` asks: the reference bytes, or ``final`` rounded / dithered."""
        if self.reference8 is not None:
            return self.reference8
        return quantize_array(self.final, 8, dither=self.quantize == "dither")


@dataclass(frozen=True)
class EncodeOptions:
    """How to write the output.

    - ``format``: an output format of :data:`ccsr.imaging.formats.FORMATS` by name or extension ("PNG",
      "JPG"/"JPEG", "WEBP", "TIFF"); :meth:`validated` gives its name.
    - ``quality``: 20-99 (Runware's range), default 95; JPG and WEBP only.
    - ``keep_metadata``: True keeps EXIF (orientation removed, it has been applied), XMP and the ICC
      profile (the pixels are converted back to the source profile); False strips them, converts to sRGB
      and embeds no profile (imgproxy's ``STRIP_METADATA`` + ``STRIP_COLOR_PROFILE``). Either way the
      output is tagged
      ``Software: ccsr``.
    - ``background``: RGB colour that transparent pixels are flattened onto for JPG (the only format without
      alpha).
    - ``bit_depth``: None = automatic (16 for a 16-bit source written as PNG/TIFF, else 8); 16 may be forced
      for PNG/TIFF; 8 always works.
    """

    format: str = "PNG"
    quality: int = 95
    keep_metadata: bool = True
    background: tuple[int, int, int] = (255, 255, 255)
    bit_depth: int | None = None

    def validated(self) -> EncodeOptions:
        fmt = find(self.format)
        if fmt is None or not fmt.encode:
            names = ", ".join(f.extension.upper() for f in ENCODABLE)
            raise ImageError("invalid_option", f"output format {self.format!r}: use one of {names}")
        if not (20 <= self.quality <= 99):
            raise ImageError("invalid_option", f"quality {self.quality} must be in 20-99")
        if self.bit_depth not in (None, 8, 16):
            raise ImageError("invalid_option", f"bit_depth {self.bit_depth} must be 8 or 16")
        if self.bit_depth == 16 and not fmt.high_depth:
            deep = " or ".join(f.name for f in ENCODABLE if f.high_depth)
            raise ImageError("invalid_option", f"16-bit output needs {deep}, not {fmt.name}")
        if len(self.background) != 3 or not all(0 <= int(c) <= 255 for c in self.background):
            raise ImageError("invalid_option", "background must be three values in 0-255")
        bg = tuple(int(c) for c in self.background)
        return EncodeOptions(fmt.name, self.quality, self.keep_metadata, bg, self.bit_depth)  # type: ignore[arg-type]


DEFAULT_ENCODE = EncodeOptions()


@dataclass(frozen=True)
class EncodedImage:
    data: bytes
    content_type: str
    extension: str
    width: int
    height: int
    notes: tuple[str, ...] = field(default=())
