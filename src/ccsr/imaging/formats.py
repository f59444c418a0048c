"""The one table of image formats: what each is called, its content type and file extensions, and whether
ccsr reads it (the decoder's default allow-list) and writes it (an output format). Every other list of formats
(the decoder's allow-list, the encoder's choices, the CLI's output suffixes, the server's stored extensions, the
protocols' wire names) is derived from :data:`FORMATS` or looked up with :func:`find`.
"""

from __future__ import annotations

from dataclasses import dataclass


@dataclass(frozen=True)
class ImageFormat:
    name: str  # Pillow's name, what sniffing returns: "PNG", "JPEG", ...
    content_type: str
    extensions: tuple[str, ...]  # the first is the one written; every one names the format (".jpeg", "tif")
    decode: bool  # accepted as input by default (``Limits.formats``)
    encode: bool  # written as output
    high_depth: bool = False  # written with 16 bits per sample

    @property
    def extension(self) -> str:
        return self.extensions[0]


FORMATS: tuple[ImageFormat, ...] = (
    ImageFormat("PNG", "image/png", ("png",), decode=True, encode=True, high_depth=True),
    ImageFormat("JPEG", "image/jpeg", ("jpg", "jpeg"), decode=True, encode=True),
    ImageFormat("WEBP", "image/webp", ("webp",), decode=True, encode=True),
    ImageFormat("TIFF", "image/tiff", ("tiff", "tif"), decode=True, encode=True, high_depth=True),
    ImageFormat("GIF", "image/gif", ("gif",), decode=True, encode=False),
    ImageFormat("AVIF", "image/avif", ("avif",), decode=True, encode=False),
    ImageFormat("BMP", "image/bmp", ("bmp",), decode=False, encode=False),  # sniffed so that a refusal names it
)

BY_NAME: dict[str, ImageFormat] = {f.name: f for f in FORMATS}
DECODABLE: frozenset[str] = frozenset(f.name for f in FORMATS if f.decode)
ENCODABLE: tuple[ImageFormat, ...] = tuple(f for f in FORMATS if f.encode)
UNKNOWN_TYPE, UNKNOWN_EXTENSION = "application/octet-stream", "bin"

_BY_WORD = {w: f for f in FORMATS for w in (f.name.lower(), *f.extensions)}
_BY_TYPE = {f.content_type: f for f in FORMATS}


def find(word: str | None) -> ImageFormat | None:
    """The format a name, an extension or a file suffix stands for, in any case: "JPEG", "jpg", ".JPG",
    "tif"; None when it names none."""
    return _BY_WORD.get((word or "").lower().removeprefix("."))


def of_content_type(content_type: str | None) -> ImageFormat | None:
    """The format of a content type (parameters ignored): "image/png; q=1" -> PNG."""
    return _BY_TYPE.get((content_type or "").partition(";")[0].strip().lower())
