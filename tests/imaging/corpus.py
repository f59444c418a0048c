"""Test corpus, generated in code (no binary blobs), plus a fast deterministic stand-in for the model.

ICC profiles are assembled byte by byte here, because LittleCMS (``ImageCms.createProfile``) only builds
sRGB, Lab and XYZ:

- :func:`display_p3_icc`: an ICC v4 matrix/TRC display profile with Apple's Display P3 primaries (D50-adapted
  colorants as in Apple's "Display P3" profile) and the sRGB parametric tone curve (``para`` type 3).
- :func:`cmyk_icc`: an ICC v2 CMYK output profile whose ``A2B0`` is a ``lut16`` with a 2-point grid per
  ink: each corner maps to a naive ink mix on a deliberately *warm paper* (paper white = sRGB 255,240,220),
  so a test can tell that the profile, not Pillow's naive CMYK formula, did the conversion.
"""

from __future__ import annotations

import io
import itertools
import struct
import zlib
from types import SimpleNamespace

import numpy as np
from PIL import Image

from ccsr.imaging import output_size
from ccsr.imaging.pixels import resize_float

D50 = (0.9642, 1.0, 0.8249)
P3_COLORANTS = (
    (0.515121, 0.241196, -0.001053),
    (0.291977, 0.692245, 0.041885),
    (0.157104, 0.066574, 0.784073),
)
SRGB_PARA = (2.4, 1 / 1.055, 0.055 / 1.055, 1 / 12.92, 0.04045)
PAPER = (255, 240, 220)


# ----------------------------------------------------------------------------------------- ICC assembly
def _s15(v: float) -> bytes:
    return struct.pack(">i", round(v * 65536))


def _xyz(x: float, y: float, z: float) -> bytes:
    return b"XYZ \x00\x00\x00\x00" + _s15(x) + _s15(y) + _s15(z)


def _mluc(text: str) -> bytes:
    s = text.encode("utf-16-be")
    return b"mluc\x00\x00\x00\x00" + struct.pack(">II", 1, 12) + b"enUS" + struct.pack(">II", len(s), 28) + s


def _desc_v2(text: str) -> bytes:
    a = text.encode("ascii") + b"\x00"
    return b"desc\x00\x00\x00\x00" + struct.pack(">I", len(a)) + a + b"\x00" * 12 + b"\x00" * 67


def _text(text: str) -> bytes:
    return b"text\x00\x00\x00\x00" + text.encode("ascii") + b"\x00"


def _para3(params) -> bytes:
    return b"para\x00\x00\x00\x00" + struct.pack(">HH", 3, 0) + b"".join(_s15(p) for p in params)


def _assemble(version: int, klass: bytes, space: bytes, pcs: bytes, tags: list[tuple[bytes, bytes]]) -> bytes:
    offset = 128 + 4 + 12 * len(tags)
    table, data = [struct.pack(">I", len(tags))], b""
    for sig, payload in tags:
        payload += b"\x00" * (-len(payload) % 4)
        table.append(struct.pack(">4sII", sig, offset + len(data), len(payload)))
        data += payload
    body = b"".join(table) + data
    size = 128 + len(body)
    header = (
        struct.pack(">I", size)
        + b"lcms"
        + struct.pack(">I", version)
        + klass
        + space
        + pcs
        + struct.pack(">6H", 2026, 1, 1, 0, 0, 0)
        + b"acsp"
        + b"APPL"
        + b"\x00" * 4
        + b"\x00" * 8
        + b"\x00" * 8
        + struct.pack(">I", 0)
        + _s15(D50[0])
        + _s15(D50[1])
        + _s15(D50[2])
        + b"ccsr"
        + b"\x00" * 16
        + b"\x00" * 28
    )
    assert len(header) == 128
    return header + body


def display_p3_icc() -> bytes:
    tags = [
        (b"desc", _mluc("Display P3 (ccsr test)")),
        (b"cprt", _mluc("No copyright, test data")),
        (b"wtpt", _xyz(*D50)),
    ]
    for sig, xyz in zip((b"rXYZ", b"gXYZ", b"bXYZ"), P3_COLORANTS, strict=True):
        tags.append((sig, _xyz(*xyz)))
    trc = _para3(SRGB_PARA)
    tags += [(b"rTRC", trc), (b"gTRC", trc), (b"bTRC", trc)]
    return _assemble(0x04300000, b"mntr", b"RGB ", b"XYZ ", tags)


def _srgb_to_xyz_d50(rgb) -> np.ndarray:
    c = np.asarray(rgb, dtype=np.float64) / 255.0
    lin = np.where(c <= 0.04045, c / 12.92, ((c + 0.055) / 1.055) ** 2.4)
    m = np.array(P3_SRGB_D50)
    return m @ lin


# sRGB colorants adapted to D50 (as in the ICC sRGB profile), columns r, g, b.
P3_SRGB_D50 = ((0.4360, 0.3851, 0.1431), (0.2225, 0.7169, 0.0606), (0.0139, 0.0971, 0.7141))


def naive_cmyk_to_rgb(cmyk) -> tuple[int, int, int]:
    """The CMYK -> sRGB rendering the test profile encodes (ink mix on PAPER)."""
    c, m, y, k = (v / 255.0 for v in cmyk)
    return tuple(round(p * (1 - ink) * (1 - k)) for p, ink in zip(PAPER, (c, m, y), strict=True))


def cmyk_icc() -> bytes:
    grid = list(itertools.product((0, 255), repeat=4))  # C slowest, K fastest (ICC CLUT order)
    clut = []
    for cmyk in grid:
        xyz = _srgb_to_xyz_d50(naive_cmyk_to_rgb(cmyk))
        clut += [min(65535, round(v * 32768)) for v in xyz]  # PCS XYZ in lut16: u1Fixed15
    ident = list(range(0, 65536, 65535))  # 2-entry identity curves
    lut = (
        b"mft2\x00\x00\x00\x00"
        + struct.pack(">BBBB", 4, 3, 2, 0)
        + b"".join(_s15(v) for v in (1, 0, 0, 0, 1, 0, 0, 0, 1))
        + struct.pack(">HH", 2, 2)
        + struct.pack(">8H", *(ident * 4))
        + struct.pack(f">{len(clut)}H", *clut)
        + struct.pack(">6H", *(ident * 3))
    )
    tags = [
        (b"desc", _desc_v2("CMYK warm paper (ccsr test)")),
        (b"cprt", _text("No copyright, test data")),
        (b"wtpt", _xyz(*D50)),
        (b"A2B0", lut),
    ]
    return _assemble(0x02100000, b"prtr", b"CMYK", b"XYZ ", tags)


# ------------------------------------------------------------------------------------------------ images
def save(im: Image.Image, fmt: str, **kw) -> bytes:
    buf = io.BytesIO()
    im.save(buf, fmt, **kw)
    return buf.getvalue()


def pattern(w: int, h: int, seed: int = 0) -> Image.Image:
    """An RGB image with no symmetry, so every orientation is distinguishable."""
    rng = np.random.default_rng(seed)
    return Image.fromarray(rng.integers(0, 256, (h, w, 3), dtype=np.uint8), "RGB")


def soft_rgba(w: int = 40, h: int = 30) -> Image.Image:
    """RGBA with a smooth radial alpha (opaque centre, transparent corners) over a colour gradient."""
    y, x = np.mgrid[0:h, 0:w].astype(np.float32)
    r = np.hypot((x - w / 2) / (w / 2), (y - h / 2) / (h / 2))
    alpha = np.clip(1.5 - 1.5 * r, 0, 1)
    rgb = np.stack([x / w, y / h, np.full_like(x, 0.5)], axis=-1)
    a = np.concatenate([rgb, alpha[..., None]], axis=-1)
    return Image.fromarray(np.rint(a * 255).astype(np.uint8), "RGBA")


def exif_with_orientation(o: int) -> bytes:
    ex = Image.Exif()
    ex[0x0112] = o
    ex[0x010F] = "TestCam"  # Make, to check EXIF survives
    return ex.tobytes()


def png_bomb(side: int = 14000) -> bytes:
    """A flat gray PNG of side x side pixels (about 190 kB), streamed so building it needs no big buffer."""

    def chunk(kind: bytes, payload: bytes) -> bytes:
        return (
            struct.pack(">I", len(payload)) + kind + payload + struct.pack(">I", zlib.crc32(kind + payload))
        )

    z = zlib.compressobj(9)
    row = b"\x00" * (side + 1)
    idat = b"".join(z.compress(row) for _ in range(side)) + z.flush()
    ihdr = struct.pack(">IIBBBBB", side, side, 8, 0, 0, 0, 0)
    return b"\x89PNG\r\n\x1a\n" + chunk(b"IHDR", ihdr) + chunk(b"IDAT", idat) + chunk(b"IEND", b"")


def animated(fmt: str, frames: int = 3) -> bytes:
    ims = [Image.new("RGB", (16, 12), (60 * i, 100, 200 - 50 * i)) for i in range(frames)]
    return save(ims[0], fmt, save_all=True, append_images=ims[1:], duration=100, loop=0)


# --------------------------------------------------------------------------------------------- the model
class LanczosModel:
    """Deterministic stand-in for the core: Lanczos to ceil(scale x size), returning ``.image`` and ``.final``
    like the real pipeline (``.image`` with the reference's truncating quantisation)."""

    def __init__(self, scale: float):
        self.scale = scale
        self.calls: list = []

    def __call__(self, rgb):
        self.calls.append(rgb)
        if isinstance(rgb, Image.Image):
            assert rgb.mode == "RGB"
            arr = np.asarray(rgb, dtype=np.float32) / 255.0
        else:
            assert rgb.dtype == np.float32 and rgb.ndim == 3 and rgb.shape[2] == 3
            arr = rgb
        size = output_size((arr.shape[1], arr.shape[0]), self.scale)
        final = np.clip(resize_float(arr, size), 0.0, 1.0)
        image = Image.fromarray((final * 255.0).astype(np.uint8), "RGB")  # truncation, as the reference does
        return SimpleNamespace(image=image, final=final)
