"""decode -> split alpha -> orient -> colour-manage: bytes in, a :class:`DecodedImage` ready for the model.

Each step is a small function of its own. Safety rules (see :mod:`.security`): the format is sniffed from
the bytes and must be on the allow-list; only that one Pillow plugin parses it; the pixel count is checked
from the header before any pixel is decoded, against our limit and against Pillow's ``MAX_IMAGE_PIXELS``
(where Pillow itself would only emit a ``DecompressionBombWarning``): both are errors.
"""

from __future__ import annotations

import io
import re
import struct
from collections.abc import Iterator
from contextlib import contextmanager

import numpy as np
from PIL import Image, ImageFile

from . import color as cms
from .errors import ImageError
from .highdepth import needs_16bit_read, read_16bit
from .security import DEFAULT_LIMITS, Limits
from .sniff import sniff_format
from .values import DecodedImage

_T = Image.Transpose
#: EXIF orientation -> the transpose that makes the image upright (as PIL.ImageOps.exif_transpose).
ORIENTATION_TRANSPOSE = {
    2: _T.FLIP_LEFT_RIGHT,
    3: _T.ROTATE_180,
    4: _T.FLIP_TOP_BOTTOM,
    5: _T.TRANSPOSE,
    6: _T.ROTATE_270,
    7: _T.TRANSVERSE,
    8: _T.ROTATE_90,
}


@contextmanager
def pillow_errors() -> Iterator[None]:
    """Turn whatever Pillow raises on hostile or broken input into an :class:`ImageError` with a code."""
    try:
        yield
    except ImageError:
        raise
    except (Image.DecompressionBombError, Image.DecompressionBombWarning) as e:
        raise ImageError("too_many_pixels", str(e)) from e
    except OSError as e:
        if "truncated" in str(e) or "broken data stream" in str(e):
            raise ImageError("truncated", f"image data is truncated ({e})") from e
        raise ImageError("corrupt", f"cannot decode image ({e})") from e
    except (SyntaxError, ValueError, EOFError, struct.error, IndexError, KeyError, TypeError) as e:
        raise ImageError("corrupt", f"cannot decode image ({type(e).__name__}: {e})") from e


# ------------------------------------------------------------------------------------------------- steps
def open_image(data: bytes, limits: Limits) -> Image.Image:
    """Sniff, allow-list, open lazily (header only) and check the pixel count and frames, before any
    decoding."""
    limits.check_input_bytes(len(data))
    fmt = limits.check_format(sniff_format(data))
    with pillow_errors():
        im = _open_header(data, fmt)
        limits.check_input_pixels(im.size)
        if Image.MAX_IMAGE_PIXELS and im.size[0] * im.size[1] > Image.MAX_IMAGE_PIXELS:
            # Pillow would only *warn* here (DecompressionBombWarning) and error at twice the size.
            raise ImageError(
                "too_many_pixels",
                f"image is {im.size[0]}x{im.size[1]}, above Pillow's "
                f"decompression-bomb threshold of {Image.MAX_IMAGE_PIXELS} pixels",
            )
        limits.check_frames(getattr(im, "n_frames", 1))
        if getattr(im, "n_frames", 1) > 1:
            im.seek(0)
    return im


def _open_header(data: bytes, fmt: str) -> ImageFile.ImageFile:
    """Parse only the header with the one plugin for ``fmt`` (what ``Image.open(formats=[fmt])`` does,
    minus its own bomb check, so that our limit is checked first, with our error, and no warning machinery
    is needed)."""
    Image.init()
    factory, accept = Image.OPEN[fmt]
    if accept is not None and not accept(data[:16]):
        raise ImageError("corrupt", f"not a valid {fmt} header")
    return factory(io.BytesIO(data))


def load_pixels(data: bytes, im: Image.Image) -> tuple[Image.Image | np.ndarray, np.ndarray | None, int]:
    """Decode pixels and split off alpha.

    Returns ``(color, alpha, bit_depth)``: ``color`` is a Pillow image in mode "RGB", "L" or "CMYK" (8-bit)
    or a uint16 array HxWx3 / HxW (16-bit); ``alpha`` is float32 HxW in [0, 1] or None. Palette and
    colour-key (tRNS) transparency become alpha; premultiplied modes are un-premultiplied.
    """
    with pillow_errors():
        if needs_16bit_read(im):
            a = read_16bit(data, im)
            if a.shape[-1] in (2, 4):
                return a[..., :-1].squeeze(-1) if a.shape[-1] == 2 else a[..., :3], _alpha16(a[..., -1]), 16
            return a, _color_key_alpha(a, im.info.get("transparency")), 16
        im.load()
        mode = im.mode
        if mode.startswith("I;16") or mode == "I":
            a = np.asarray(im)
            if mode == "I" and (a.min() < 0 or a.max() > 65535):
                raise ImageError("unsupported_mode", "32-bit integer images are not supported")
            a = a.astype(np.uint16)
            return a, _color_key_alpha(a, im.info.get("transparency")), 16
        if mode not in ("1", "L", "LA", "La", "P", "PA", "RGB", "RGBA", "RGBa", "RGBX", "YCbCr", "CMYK"):
            raise ImageError("unsupported_mode", f"{mode} images are not supported")
        keyed = "transparency" in im.info and mode in ("1", "L", "P", "RGB")
        if mode == "1":
            im = im.convert("L")
        if mode in ("P", "PA"):
            im = im.convert("RGBA" if (keyed or mode == "PA") else "RGB")
        elif (mode in ("L", "1") and keyed) or mode == "La":
            im = im.convert("LA")
        elif (mode == "RGB" and keyed) or mode == "RGBa":
            im = im.convert("RGBA")
        elif mode in ("RGBX", "YCbCr"):
            im = im.convert("RGB")
        alpha = None
        if im.mode in ("RGBA", "LA"):
            alpha = np.asarray(im.getchannel("A"), dtype=np.float32) / 255.0
            im = im.convert(im.mode[:-1])
        return im, alpha, 8


def _alpha16(a: np.ndarray) -> np.ndarray:
    return a.astype(np.float32) / 65535.0


def _color_key_alpha(a: np.ndarray, key) -> np.ndarray | None:
    """PNG tRNS colour key on 16-bit gray/RGB data -> alpha (0 where the pixel equals the key)."""
    if key is None or isinstance(key, bytes):
        return None
    hit = (a == key) if a.ndim == 2 else np.all(a == np.asarray(key, dtype=np.uint16), axis=-1)
    return None if not hit.any() else (~hit).astype(np.float32)


def read_metadata(im: Image.Image) -> tuple[bytes | None, bytes | None, bytes | None, int]:
    """``(icc_profile, exif, xmp, orientation)`` of an opened (and loaded) image."""
    icc = im.info.get("icc_profile") or None
    exif_obj = im.getexif()
    orientation = int(exif_obj.get(0x0112, 1) or 1)
    if orientation not in range(1, 9):
        orientation = 1
    exif = None
    if im.format != "TIFF":  # a TIFF's "EXIF" is its own IFD (strip offsets ...), not portable metadata
        exif = im.info.get("exif") or (exif_obj.tobytes() if len(exif_obj) else None)
    xmp = im.info.get("xmp") or im.info.get("XML:com.adobe.xmp") or None
    if isinstance(xmp, str):
        xmp = xmp.encode("utf-8")
    return icc, exif, xmp, orientation


def orient(color, alpha, orientation: int):
    """Apply EXIF orientation 1-8 to the colour (Pillow image or array) and the alpha array."""
    if orientation not in ORIENTATION_TRANSPOSE:
        return color, alpha
    if isinstance(color, Image.Image):
        color = color.transpose(ORIENTATION_TRANSPOSE[orientation])
    else:
        color = orient_array(color, orientation)
    return color, (None if alpha is None else orient_array(alpha, orientation))


def orient_array(a: np.ndarray, orientation: int) -> np.ndarray:
    """numpy twin of :data:`ORIENTATION_TRANSPOSE` for HxW[xC] arrays."""
    t = a.swapaxes(0, 1) if orientation in (5, 6, 7, 8) else a
    flip_y, flip_x = {2: (0, 1), 3: (1, 1), 4: (1, 0), 5: (0, 0), 6: (0, 1), 7: (1, 1), 8: (1, 0)}.get(
        orientation, (0, 0)
    )
    t = t[::-1] if flip_y else t
    t = t[:, ::-1] if flip_x else t
    return np.ascontiguousarray(t)


def to_srgb(pixels, icc: bytes | None) -> tuple[Image.Image | np.ndarray, bool, bytes | None, list[str]]:
    """Colour-manage to sRGB. Returns ``(rgb, rgb_is_srgb, icc_kept, notes)``.

    8-bit in -> Pillow "RGB"; 16-bit in -> float32 HxWx3 in [0, 1]; gray is expanded to RGB. A profile that
    does not fit the pixels (wrong colour space, or rejected by LittleCMS) is dropped with a note and the
    pixels are taken as sRGB; a profile equal to sRGB causes no conversion at all (bit-exact pixels).
    """
    notes: list[str] = []
    is_pil = isinstance(pixels, Image.Image)
    mode = pixels.mode if is_pil else ("L" if pixels.ndim == 2 else "RGB")
    matrix = None
    if icc is not None:
        matrix = cms.parse_matrix_profile(icc)
        fits = cms.icc_color_space(icc) == {"RGB": "RGB", "L": "GRAY", "CMYK": "CMYK"}[mode]
        if not fits or (matrix is None and not cms.profile_usable(icc, mode)):
            notes.append("ignored an ICC profile that does not fit the image; pixels taken as sRGB")
            icc, matrix = None, None
    srgb_like = icc is None or (matrix is not None and cms.is_srgb(matrix))
    if is_pil:
        if srgb_like:
            return pixels.convert("RGB"), True, icc, notes
        if matrix is not None:  # float math, one rounding at the end
            arr = cms.float_to_srgb(np.asarray(pixels), matrix)
            return Image.fromarray(np.rint(arr * 255.0).astype(np.uint8), "RGB"), True, icc, notes
        return cms.lcms_to_srgb(pixels, icc), True, icc, notes
    arr = pixels.astype(np.float32) / 65535.0
    if srgb_like:
        return _rgb3(arr), True, icc, notes
    if matrix is not None:
        return cms.float_to_srgb(arr, matrix), True, icc, notes
    notes.append(
        "16-bit image with a LUT/CMYK profile: kept in its own colour space, profile re-embedded as is"
    )
    return _rgb3(arr), False, icc, notes


def _rgb3(a: np.ndarray) -> np.ndarray:
    return np.repeat(a[..., None], 3, axis=-1) if a.ndim == 2 else a


def decode(data: bytes, limits: Limits = DEFAULT_LIMITS) -> DecodedImage:
    """The whole input chain: sniff + limits -> decode -> split alpha -> orient -> to sRGB."""
    im = open_image(data, limits)
    color, alpha, bit_depth = load_pixels(data, im)
    with pillow_errors():
        icc, exif, xmp, orientation = read_metadata(im)
    grayscale = (color.mode == "L") if isinstance(color, Image.Image) else color.ndim == 2
    color, alpha = orient(color, alpha, orientation)
    rgb, rgb_is_srgb, icc, notes = to_srgb(color, icc)
    if getattr(im, "n_frames", 1) > 1:
        notes.append(f"animated image: only the first of {im.n_frames} frames was used")
    return DecodedImage(
        rgb=rgb,
        alpha=alpha,
        icc_profile=icc,
        rgb_is_srgb=rgb_is_srgb,
        exif=exif,
        xmp=xmp,
        orientation=orientation,
        bit_depth=bit_depth,
        source_format=im.format or "",
        grayscale=grayscale,
        notes=tuple(notes),
    )


_XMP_ORIENTATION = (
    re.compile(rb'tiff:Orientation="[0-9]"'),
    re.compile(rb"<tiff:Orientation>[0-9]</tiff:Orientation>"),
)


def xmp_without_orientation(xmp: bytes) -> bytes:
    """XMP without tiff:Orientation (it has been applied to the pixels), as PIL.ImageOps.exif_transpose
    does."""
    for pattern in _XMP_ORIENTATION:
        xmp = pattern.sub(b"", xmp)
    return xmp
