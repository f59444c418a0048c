"""16-bit I/O that Pillow lacks: Pillow has no 16-bit-per-channel RGB(A)/LA mode, so it reads 16-bit colour
PNG and TIFF as 8-bit and cannot write them.

- Reading: Pillow's C decoders still do the work (inflate, PNG unfiltering, Adam7, TIFF strips via libtiff).
  We decode the same tile twice with two *raw modes* that pick the high and the low byte of each sample
  ("RGB;16B" vs "RGB;16L"), and join them. LA 16-bit PNG is read through the 4-byte raw mode "RGBA".
- Writing: small PNG (filter "Up", zlib) and TIFF (Adobe Deflate, horizontal predictor) writers in numpy.
"""

from __future__ import annotations

import io
import struct
import zlib

import numpy as np
from PIL import Image

_SWAP = {";16B": ";16L", ";16L": ";16B"}


def _tile_rawmode(im: Image.Image) -> str | None:
    if len(im.tile) != 1:
        return None
    args = im.tile[0].args
    raw = args if isinstance(args, str) else (args[0] if args and isinstance(args[0], str) else None)
    return raw


def needs_16bit_read(im: Image.Image) -> bool:
    """True for a 16-bit-per-sample colour PNG/TIFF that Pillow alone would truncate to 8 bits."""
    raw = _tile_rawmode(im)
    if raw is None or im.format not in ("PNG", "TIFF"):
        return False
    return raw in ("LA;16B",) or (
        raw.split(";")[0] in ("RGB", "RGBA", "RGBX") and raw[-3:] in ("16B", "16L", "16N")
    )


def _decode_with(data: bytes, fmt: str, rawmode: str, replace_args) -> np.ndarray:
    im = Image.open(io.BytesIO(data), formats=[fmt])
    im.tile = [im.tile[0]._replace(args=replace_args(im.tile[0].args, rawmode))]
    im.load()
    return np.asarray(im)


def _replace_raw(args, rawmode):
    if isinstance(args, str):
        return rawmode
    return (rawmode, *args[1:])


def read_16bit(data: bytes, im: Image.Image) -> np.ndarray:
    """Full-precision samples of a 16-bit colour PNG/TIFF as uint16 HxWxC (C = 2 for LA, 3 or 4)."""
    raw = _tile_rawmode(im)
    assert raw is not None
    fmt = im.format
    if raw == "LA;16B":
        x = _decode_with(data, fmt, "RGBA", _replace_raw).astype(np.uint16)
        return np.stack([x[..., 0] << 8 | x[..., 1], x[..., 2] << 8 | x[..., 3]], axis=-1)
    if raw.endswith("16N"):
        raw = raw[:-1] + ("L" if np.little_endian else "B")
    other = raw[:-4] + _SWAP[raw[-4:]]
    hi = _decode_with(data, fmt, raw, _replace_raw).astype(np.uint16)  # Pillow keeps the high byte
    lo = _decode_with(data, fmt, other, _replace_raw).astype(np.uint16)  # read as the other endian: low byte
    out = hi << 8 | lo
    if raw.startswith("RGBX"):
        out = out[..., :3]
    return out


# ---------------------------------------------------------------------------------------------- PNG writer
def _chunk(kind: bytes, payload: bytes) -> bytes:
    return struct.pack(">I", len(payload)) + kind + payload + struct.pack(">I", zlib.crc32(kind + payload))


def write_png16(
    pixels: np.ndarray,
    *,
    icc_profile: bytes | None = None,
    exif: bytes | None = None,
    xmp: bytes | None = None,
    text: dict[str, str] | None = None,
) -> bytes:
    """Encode uint16 HxW (gray), HxWx2 (gray+alpha), HxWx3 (RGB) or HxWx4 (RGBA) as a 16-bit PNG."""
    a = pixels if pixels.ndim == 3 else pixels[..., None]
    h, w, c = a.shape
    color_type = {1: 0, 2: 4, 3: 2, 4: 6}[c]
    raw = np.ascontiguousarray(a, dtype=">u2").view(np.uint8).reshape(h, w * c * 2)
    up = raw.copy()
    up[1:] -= raw[:-1]  # filter 2 ("Up"), wraps mod 256 as the spec requires
    rows = np.concatenate([np.full((h, 1), 2, np.uint8), up], axis=1)
    out = [b"\x89PNG\r\n\x1a\n", _chunk(b"IHDR", struct.pack(">IIBBBBB", w, h, 16, color_type, 0, 0, 0))]
    if icc_profile:
        out.append(_chunk(b"iCCP", b"ICC profile\x00\x00" + zlib.compress(icc_profile)))
    for key, value in (text or {}).items():
        out.append(_chunk(b"tEXt", key.encode("latin-1") + b"\x00" + value.encode("latin-1", "replace")))
    if xmp:
        out.append(_chunk(b"iTXt", b"XML:com.adobe.xmp\x00\x00\x00\x00\x00" + xmp))
    if exif:
        out.append(_chunk(b"eXIf", exif[6:] if exif.startswith(b"Exif\x00\x00") else exif))
    out.append(_chunk(b"IDAT", zlib.compress(rows.tobytes(), 6)))
    out.append(_chunk(b"IEND", b""))
    return b"".join(out)


# --------------------------------------------------------------------------------------------- TIFF writer
_BYTE, _ASCII, _SHORT, _LONG, _UNDEFINED = 1, 2, 3, 4, 7
_TYPE_SIZE = {_BYTE: 1, _ASCII: 1, _SHORT: 2, _LONG: 4, _UNDEFINED: 1}


def write_tiff16(
    pixels: np.ndarray,
    *,
    icc_profile: bytes | None = None,
    xmp: bytes | None = None,
    software: str | None = None,
) -> bytes:
    """Encode uint16 HxW[xC] (C in 1..4; 2 and 4 carry unassociated alpha) as a little-endian baseline TIFF
    with Adobe Deflate compression and the horizontal predictor."""
    a = pixels if pixels.ndim == 3 else pixels[..., None]
    h, w, c = a.shape
    pred = a.astype(np.uint16, copy=True)
    pred[:, 1:] -= a[:, :-1].astype(np.uint16)  # predictor 2: differences along x, per channel, mod 2**16
    row_bytes = w * c * 2
    rows_per_strip = max(1, (256 * 1024) // row_bytes)
    strips = [
        zlib.compress(np.ascontiguousarray(pred[y : y + rows_per_strip], dtype="<u2").tobytes(), 6)
        for y in range(0, h, rows_per_strip)
    ]
    entries: list[tuple[int, int, bytes]] = []  # (tag, type, little-endian payload)

    def add(tag: int, typ: int, values) -> None:
        if typ in (_BYTE, _UNDEFINED, _ASCII):
            payload = bytes(values)
        else:
            payload = struct.pack(f"<{len(values)}{'H' if typ == _SHORT else 'I'}", *values)
        entries.append((tag, typ, payload))

    offsets, pos = [], 8
    for s in strips:
        offsets.append(pos)
        pos += len(s) + (len(s) & 1)
    add(256, _LONG, [w])
    add(257, _LONG, [h])
    add(258, _SHORT, [16] * c)
    add(259, _SHORT, [8])
    add(262, _SHORT, [2 if c >= 3 else 1])
    add(273, _LONG, offsets)
    add(277, _SHORT, [c])
    add(278, _LONG, [rows_per_strip])
    add(279, _LONG, [len(s) for s in strips])
    add(284, _SHORT, [1])
    if software:
        add(305, _ASCII, software.encode("ascii", "replace") + b"\x00")
    add(317, _SHORT, [2])
    if c in (2, 4):
        add(338, _SHORT, [2])
    if xmp:
        add(700, _BYTE, xmp)
    if icc_profile:
        add(34675, _UNDEFINED, icc_profile)
    entries.sort()

    ifd_offset = pos
    extra_offset = ifd_offset + 2 + 12 * len(entries) + 4
    ifd, extra = [struct.pack("<H", len(entries))], []
    for tag, typ, payload in entries:
        count = len(payload) // _TYPE_SIZE[typ]
        if len(payload) <= 4:
            ifd.append(struct.pack("<HHI", tag, typ, count) + payload.ljust(4, b"\x00"))
        else:
            ifd.append(struct.pack("<HHII", tag, typ, count, extra_offset))
            padded = payload + b"\x00" * (len(payload) & 1)
            extra.append(padded)
            extra_offset += len(padded)
    ifd.append(struct.pack("<I", 0))
    body = b"".join(s + b"\x00" * (len(s) & 1) for s in strips)
    return b"II*\x00" + struct.pack("<I", ifd_offset) + body + b"".join(ifd) + b"".join(extra)
