"""restore profile/metadata -> encode: an :class:`UpscaledImage` to bytes.

Colour policy (documented in the package docstring): with ``keep_metadata`` the output carries the source's
own ICC profile and the pixels are converted back into it (matrix/TRC profiles in float, LUT RGB profiles
through LittleCMS). Where that is impossible (CMYK or Lab sources, a gray profile, a LUT profile at 16
bits) the output is sRGB and says so with an embedded sRGB profile. Without ``keep_metadata`` the output is
sRGB with no profile.
"""

from __future__ import annotations

import io

import numpy as np
from PIL import ExifTags, Image, PngImagePlugin

from . import color as cms
from .decode import xmp_without_orientation
from .errors import ImageError
from .highdepth import write_png16, write_tiff16
from .pixels import quantize_array
from .sniff import OUTPUT_FORMATS
from .values import DEFAULT_ENCODE, EncodedImage, EncodeOptions, UpscaledImage

SOFTWARE = "ccsr"
_LUMA = np.array([0.299, 0.587, 0.114], dtype=np.float32)  # ITU-R 601, as Pillow's convert("L")


def restore_profile(img: UpscaledImage, base: np.ndarray, keep: bool, bits: int):
    """Float pixels in sRGB (or the source space) -> float pixels in the output space.

    Returns ``(pixels, icc_to_embed, notes)``.
    """
    icc = img.icc_profile
    if icc is None:
        return base, None, []
    if not img.rgb_is_srgb:  # 16-bit data left in a LUT/CMYK-profile space by the decoder
        if keep or bits == 16:
            note = [] if keep else ["kept the source profile: no 16-bit conversion exists for it"]
            return base, icc, note
        back = cms.lcms_to_srgb(Image.fromarray(quantize_array(base, 8), "RGB"), icc)
        return np.asarray(back, dtype=np.float32) / 255.0, None, []
    if not keep:
        return base, None, []
    matrix = cms.parse_matrix_profile(icc)
    if matrix is not None and matrix.matrix is not None:
        if cms.is_srgb(matrix):
            return base, icc, []
        return cms.float_from_srgb(base, matrix), icc, []
    if cms.icc_color_space(icc) == "RGB" and bits == 8:
        back = cms.lcms_from_srgb(Image.fromarray(quantize_array(base, 8), "RGB"), icc)
        return np.asarray(back, dtype=np.float32) / 255.0, icc, []
    space = cms.icc_color_space(icc) or "unknown"
    return base, cms.srgb_profile_bytes(), [f"source profile ({space}) not restorable here: output is sRGB"]


def output_exif(img: UpscaledImage, keep: bool, size: tuple[int, int]) -> bytes:
    """EXIF for the output: the source's (orientation removed, pixel dimensions updated) or a fresh one,
    always tagged ``Software: ccsr``."""
    exif = Image.Exif()
    if keep and img.exif:
        try:
            exif.load(img.exif)
        except Exception:  # damaged EXIF from an untrusted file: start a fresh block rather than fail
            exif = Image.Exif()
    exif.pop(ExifTags.Base.Orientation, None)
    exif[ExifTags.Base.Software] = SOFTWARE
    if ExifTags.IFD.Exif in exif:
        sub = exif.get_ifd(ExifTags.IFD.Exif)
        if ExifTags.Base.ExifImageWidth in sub:
            sub[ExifTags.Base.ExifImageWidth], sub[ExifTags.Base.ExifImageHeight] = size
    return exif.tobytes()


def encode(img: UpscaledImage, options: EncodeOptions = DEFAULT_ENCODE) -> EncodedImage:
    """restore profile -> gray -> flatten (JPG) -> quantise -> write, with metadata kept or stripped."""
    o = options.validated()
    bits = o.bit_depth or (16 if img.bit_depth == 16 and o.format in ("PNG", "TIFF") else 8)
    base = img.final
    if bits == 8 and img.reference8 is not None:
        base = img.reference8.astype(np.float32) / 255.0  # exact reference bytes unless converted below
    pixels, icc, notes = restore_profile(img, base, o.keep_metadata, bits)
    if img.grayscale:
        pixels = pixels @ _LUMA
        if icc is not None and cms.icc_color_space(icc) != "GRAY":
            icc = None  # an RGB profile cannot tag gray pixels; they are in sRGB's tone curve (implied)
    alpha = img.alpha
    if o.format == "JPG" and alpha is not None:
        bg = np.asarray(o.background, dtype=np.float32) / 255.0
        if pixels.ndim == 2:
            bg = bg @ _LUMA
        a = alpha if pixels.ndim == 2 else alpha[..., None]
        pixels = pixels * a + bg * (1.0 - a)
        alpha = None
    q = quantize_array(pixels, bits, dither=img.quantize == "dither" and bits == 8)
    if alpha is not None:
        q = np.concatenate(
            [q if q.ndim == 3 else q[..., None], quantize_array(alpha, bits)[..., None]], axis=-1
        )
    xmp = xmp_without_orientation(img.xmp) if (o.keep_metadata and img.xmp) else None
    exif = output_exif(img, o.keep_metadata, img.size)
    data = _write(q, bits, o, icc, exif, xmp)
    _, content_type, ext = OUTPUT_FORMATS[o.format]
    return EncodedImage(data, content_type, ext, img.size[0], img.size[1], (*img.notes, *notes))


def _write(q: np.ndarray, bits: int, o: EncodeOptions, icc, exif: bytes, xmp: bytes | None) -> bytes:
    channels = 1 if q.ndim == 2 else q.shape[2]
    if bits == 16:
        if o.format == "PNG":
            return write_png16(q, icc_profile=icc, exif=exif, xmp=xmp, text={"Software": SOFTWARE})
        if channels == 2:  # Pillow/libtiff readers lack 16-bit gray+alpha TIFF: write it as RGBA
            q = np.concatenate([np.repeat(q[..., :1], 3, axis=-1), q[..., 1:]], axis=-1)
        return write_tiff16(q, icc_profile=icc, xmp=xmp, software=SOFTWARE)
    mode = {1: "L", 2: "LA", 3: "RGB", 4: "RGBA"}[channels]
    if o.format == "WEBP" and mode in ("L", "LA"):  # WebP has no gray mode
        mode, q = ("RGB", np.repeat(q[..., None], 3, -1)) if mode == "L" else ("RGBA", _la_to_rgba(q))
    im = Image.fromarray(np.ascontiguousarray(q), mode)
    buf = io.BytesIO()
    kw: dict = {}
    if icc:
        kw["icc_profile"] = icc
    if o.format == "PNG":
        info = PngImagePlugin.PngInfo()
        info.add_text("Software", SOFTWARE)
        if xmp:
            info.add_itxt("XML:com.adobe.xmp", xmp.decode("utf-8", "replace"))
        im.save(buf, "PNG", pnginfo=info, exif=exif, compress_level=6, **kw)
    elif o.format == "JPG":
        im.save(
            buf,
            "JPEG",
            quality=o.quality,
            subsampling=0 if o.quality >= 90 else 2,
            exif=exif,
            xmp=xmp or b"",
            **kw,
        )
    elif o.format == "WEBP":
        im.save(buf, "WEBP", quality=o.quality, method=4, exact=True, exif=exif, xmp=xmp or b"", **kw)
    elif o.format == "TIFF":
        tags = {305: SOFTWARE}
        if xmp:
            tags[700] = xmp
        im.save(buf, "TIFF", compression="tiff_adobe_deflate", tiffinfo=tags, **kw)
    else:  # pragma: no cover - validated() rejects it
        raise ImageError("invalid_option", o.format)
    return buf.getvalue()


def _la_to_rgba(q: np.ndarray) -> np.ndarray:
    return np.concatenate([np.repeat(q[..., :1], 3, axis=-1), q[..., 1:]], axis=-1)
