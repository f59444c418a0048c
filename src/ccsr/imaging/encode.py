"""restore profile/metadata -> encode: an :class:`UpscaledImage` or filled :class:`OutputPixels` to bytes.

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

from .decode import xmp_without_orientation
from .errors import ImageError
from .formats import BY_NAME
from .highdepth import write_png16, write_tiff16
from .output import OutputPixels, Source
from .values import DEFAULT_ENCODE, EncodedImage, EncodeOptions, UpscaledImage

SOFTWARE = "ccsr"


def output_exif(img: Source, keep: bool, size: tuple[int, int]) -> bytes:
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
    """The whole upscaled image through :class:`OutputPixels`, then written with metadata kept or stripped."""
    out = OutputPixels(img, img.size, options, quantize=img.quantize)
    out.write(0, img.reference8 if out.bits == 8 and img.reference8 is not None else img.final)
    return encode_pixels(out)


def encode_pixels(out: OutputPixels) -> EncodedImage:
    """Write the file from a completely filled :class:`OutputPixels`."""
    if out.missing_rows():
        raise ImageError("model_output", f"the model left {out.missing_rows()} of {out.size[1]} output rows unwritten")
    o, src = out.options, out.source
    xmp = xmp_without_orientation(src.xmp) if (o.keep_metadata and src.xmp) else None
    exif = output_exif(src, o.keep_metadata, out.size)
    data = _write(out.pixels, out.bits, o, out.icc, exif, xmp)
    fmt = BY_NAME[o.format]
    return EncodedImage(data, fmt.content_type, fmt.extension, out.size[0], out.size[1], (*src.notes, *out.notes))


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
    elif o.format == "JPEG":
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
