"""Image I/O for every surface (library, CLI, server): one pipeline of small, separately testable steps

    decode -> orient -> colour-manage -> split alpha -> [model] -> merge alpha -> restore profile/metadata
    -> encode

(the steps after the model also take the model's rows band by band: :class:`OutputPixels`)

and one place that owns every limit (:class:`Limits`, after imgproxy's ``security.Checker``).

Decisions (each is tested in ``tests/imaging``):

- **Formats**: one table, :mod:`ccsr.imaging.formats`; sniffed from magic bytes only; allow-list PNG, JPEG, WEBP,
  GIF, TIFF, AVIF (``Limits.formats``). Output: PNG, JPG, WEBP (8-bit) and PNG/TIFF (8 or 16-bit).
- **Animated input** (GIF, WebP, APNG, multi-page TIFF) is **refused** with code ``animated`` by default
  (imgproxy's ``MAX_ANIMATION_FRAMES=1``; nothing is dropped silently).
  ``Limits(animated="first_frame")`` upscales frame 0 instead.
- **Bombs**: the pixel count (default 50 MP) is checked from the header before decoding; an image above
  Pillow's ``MAX_IMAGE_PIXELS`` (where Pillow only warns with ``DecompressionBombWarning``) is refused too.
- **Orientation**: EXIF orientation 1-8 is applied before the model; the output's EXIF has no orientation
  tag and XMP ``tiff:Orientation`` is removed.
- **Colour**: pixels reach the model in sRGB. Outputs with ``keep_metadata=True`` are converted back into
  the source's profile and carry it; when that cannot be done (CMYK/Lab/gray sources) they are sRGB with an
  sRGB profile. ``keep_metadata=False`` gives sRGB without a profile. An sRGB-equivalent profile is never
  converted (bit-exact pixels).
- **Alpha**: split before the model, Lanczos-upscaled in float, merged; PNG/WEBP/TIFF keep it, JPG
  flattens it on ``EncodeOptions.background``.
- **Depth**: 16-bit PNG/TIFF input stays float32 end to end and is written as 16-bit PNG/TIFF. 8-bit
  outputs are rounded (or dithered), never truncated, except ``quantize="reference"`` which keeps the
  core's own 8-bit image.
- **Metadata**: EXIF (minus orientation), XMP, ICC kept or stripped; always tagged ``Software: ccsr``.
"""

from __future__ import annotations

from .decode import decode
from .encode import encode, encode_pixels
from .errors import ImageError
from .fetch import FetchError, FetchResult, check_url, fetch
from .output import OutputPixels
from .pipeline import shrink, upscale, upscale_bytes
from .security import DEFAULT_LIMITS, Fit, Limits, fit_scale, output_size
from .sniff import sniff_format
from .values import DecodedImage, EncodedImage, EncodeOptions, UpscaledImage


def fetch_image(
    url: str, limits: Limits = DEFAULT_LIMITS, *, allow_hosts: frozenset[str] = frozenset()
) -> bytes:
    """Download an input image under ``limits`` (byte cap, timeout, redirect limit) with SSRF protection."""
    return fetch(
        url,
        max_bytes=limits.max_input_bytes,
        timeout=limits.fetch_timeout,
        max_redirects=limits.max_redirects,
        allow_hosts=allow_hosts,
    ).content


__all__ = [
    "DecodedImage",
    "EncodeOptions",
    "EncodedImage",
    "FetchError",
    "FetchResult",
    "Fit",
    "ImageError",
    "Limits",
    "OutputPixels",
    "UpscaledImage",
    "check_url",
    "decode",
    "encode",
    "encode_pixels",
    "fetch",
    "fetch_image",
    "fit_scale",
    "output_size",
    "shrink",
    "sniff_format",
    "upscale",
    "upscale_bytes",
]
