"""Colour management: to sRGB for the model, and back to the source profile for the output.

Two engines, chosen per profile:

- **Matrix/TRC profiles** (sRGB, Display P3, Adobe RGB, ProPhoto, Rec.2020, gray ``kTRC``; almost every
  camera and phone profile) are parsed here and converted in float32 numpy: no intermediate 8-bit rounding,
  and it works on 16-bit data, which Pillow's LittleCMS binding cannot hold for colour images.
- **Everything else** (CMYK, LUT-based RGB, Lab) goes through LittleCMS (``PIL.ImageCms``) on 8-bit data. A
  16-bit image with such a profile is left in its source space and the output re-embeds the unchanged
  profile, so the colours stay right (the model then sees non-sRGB numbers; this is reported in
  ``DecodedImage.notes``).

Both use the relative colorimetric intent, clip out-of-gamut colours (a P3 colour outside sRGB is clipped
on the way in) and treat a profile whose matrix and curves match sRGB as sRGB: no conversion, bit-exact
pixels.
"""

from __future__ import annotations

import io
import struct
from dataclasses import dataclass
from functools import lru_cache

import numpy as np
from PIL import Image, ImageCms

_INTENT = ImageCms.Intent.RELATIVE_COLORIMETRIC


@lru_cache(maxsize=1)
def srgb_profile_bytes() -> bytes:
    """LittleCMS's built-in sRGB profile, embedded when an output is tagged as sRGB."""
    return ImageCms.ImageCmsProfile(ImageCms.createProfile("sRGB")).tobytes()


def icc_color_space(icc: bytes) -> str:
    """The profile's data colour space signature: "RGB", "GRAY", "CMYK", "LAB", ... ("" if unreadable)."""
    return icc[16:20].decode("latin-1").strip() if len(icc) >= 128 else ""


# ------------------------------------------------------------------------------------------- ICC parsing
_GRID = 65536  # uniform table resolution for curve lookups (interpolated: finer than a 16-bit step)


def _lookup(table: np.ndarray, x: np.ndarray) -> np.ndarray:
    """Linear interpolation in a table sampled uniformly on [0, 1] (no binary search: a few vector ops)."""
    n = len(table) - 1
    pos = np.clip(x, 0.0, 1.0, dtype=np.float32) * np.float32(n)
    i = np.minimum(pos.astype(np.int32), n - 1)
    lo = table[i]
    return lo + (pos - i) * (table[i + 1] - lo)


class Curve:
    """A tone reproduction curve (``curv`` or ``para``), as vectorised forward and inverse maps on [0, 1].

    Both directions are tabulated once on a uniform 65537-point grid and applied by interpolation, which
    keeps a 12 MP conversion well under a second.
    """

    def __init__(self, kind: str, params: tuple[float, ...] = (), table: np.ndarray | None = None):
        self.kind, self.params, self.table = kind, params, table
        grid = np.linspace(0.0, 1.0, _GRID + 1)
        fwd = np.maximum.accumulate(self._exact(grid))  # monotone, so it can be inverted
        self._fwd = fwd.astype(np.float32)
        self._inv = np.interp(grid, fwd, grid).astype(np.float32)
        self._fwd8 = self._exact(np.arange(256) / 255.0).astype(np.float32)  # exact, for 8-bit input

    def _exact(self, x: np.ndarray) -> np.ndarray:
        if self.kind == "identity":
            return x
        if self.kind == "table":
            t = self.table
            return np.interp(x, np.linspace(0.0, 1.0, len(t)), t)
        p = self.params
        if self.kind == "gamma":
            return np.power(x, p[0])
        g, a, b = p[0], p[1], p[2]
        # ICC parametricCurveType: Y = (aX+b)^g + e for X >= d, else cX + f (types 1-4 fix some of these)
        if self.kind in ("para1", "para2"):
            d, c, e = (-b / a if a else 0.0), 0.0, (p[3] if self.kind == "para2" else 0.0)
            f = e
        else:
            c, d = p[3], p[4]
            e, f = (p[5], p[6]) if self.kind == "para4" else (0.0, 0.0)
        hi = np.power(np.maximum(a * x + b, 0.0), g) + e
        lo = c * x + f
        return np.clip(np.where(x >= d, hi, lo), 0.0, 1.0)

    def forward(self, x: np.ndarray) -> np.ndarray:
        """Encoded value (float in [0, 1], or uint8) -> linear light (float32)."""
        return self._fwd8[x] if x.dtype == np.uint8 else _lookup(self._fwd, x)

    def inverse(self, y: np.ndarray) -> np.ndarray:
        """Linear light -> encoded value (float32)."""
        return _lookup(self._inv, y)

    def close_to(self, other: Curve, tol: float = 2e-3) -> bool:
        return bool(np.max(np.abs(self._fwd - other._fwd)) <= tol)


def _parse_curve(buf: bytes) -> Curve | None:
    sig = buf[:4]
    if sig == b"curv":
        (n,) = struct.unpack(">I", buf[8:12])
        if n == 0:
            return Curve("identity")
        if n == 1:
            return Curve("gamma", (struct.unpack(">H", buf[12:14])[0] / 256.0,))
        table = np.frombuffer(buf[12 : 12 + 2 * n], dtype=">u2").astype(np.float64) / 65535.0
        return Curve("table", table=table) if len(table) == n else None
    if sig == b"para":
        (ftype,) = struct.unpack(">H", buf[8:10])
        count = {0: 1, 1: 3, 2: 4, 3: 5, 4: 7}.get(ftype)
        if count is None or len(buf) < 12 + 4 * count:
            return None
        params = tuple(v / 65536.0 for v in struct.unpack(f">{count}i", buf[12 : 12 + 4 * count]))
        return Curve("gamma" if ftype == 0 else f"para{ftype}", params)
    return None


@dataclass(frozen=True)
class MatrixProfile:
    """A matrix/TRC ICC profile: ``matrix`` maps linear device RGB to PCS XYZ (D50); gray has
    ``matrix=None``."""

    curves: tuple[Curve, ...]
    matrix: np.ndarray | None


@lru_cache(maxsize=32)
def parse_matrix_profile(icc: bytes) -> MatrixProfile | None:
    """Parse an RGB matrix/TRC or a gray TRC profile; None for anything else (LUT, CMYK, Lab, damaged)."""
    try:
        if len(icc) < 132 or icc[36:40] != b"acsp":
            return None
        (count,) = struct.unpack(">I", icc[128:132])
        tags = {}
        for i in range(min(count, 256)):
            sig, off, size = struct.unpack(">4sII", icc[132 + 12 * i : 144 + 12 * i])
            tags[sig] = icc[off : off + size]
        space = icc_color_space(icc)
        if space == "GRAY" and b"kTRC" in tags:
            curve = _parse_curve(tags[b"kTRC"])
            return MatrixProfile((curve,), None) if curve else None
        if space != "RGB" or any(t in tags for t in (b"A2B0", b"A2B1", b"B2A0")):
            return None  # LUT-based profiles are LittleCMS's job
        cols, curves = [], []
        for c in "rgb":
            xyz = tags.get(f"{c}XYZ".encode())
            trc = _parse_curve(tags.get(f"{c}TRC".encode(), b""))
            if xyz is None or xyz[:4] != b"XYZ " or trc is None:
                return None
            cols.append([v / 65536.0 for v in struct.unpack(">3i", xyz[8:20])])
            curves.append(trc)
        matrix = np.array(cols, dtype=np.float64).T
        if abs(np.linalg.det(matrix)) < 1e-6:
            return None
        return MatrixProfile(tuple(curves), matrix)
    except (struct.error, ValueError, ZeroDivisionError):
        return None


@lru_cache(maxsize=1)
def _srgb() -> MatrixProfile:
    p = parse_matrix_profile(srgb_profile_bytes())
    assert p is not None and p.matrix is not None
    return p


def is_srgb(p: MatrixProfile) -> bool:
    s = _srgb()
    if p.matrix is None:
        return False
    return bool(np.max(np.abs(p.matrix - s.matrix)) <= 2e-3) and all(
        a.close_to(b) for a, b in zip(p.curves, s.curves, strict=True)
    )


# ---------------------------------------------------------------------------------------- float engine
def _chunks(rgb: np.ndarray, rows: int = 256):
    for y in range(0, rgb.shape[0], rows):
        yield y, min(rgb.shape[0], y + rows)


def _matrix_convert(rgb: np.ndarray, src: MatrixProfile, dst: MatrixProfile) -> np.ndarray:
    """Curves to linear light, one 3x3 matrix through PCS XYZ, the destination's inverse curves."""
    m = (np.linalg.inv(dst.matrix) @ src.matrix).astype(np.float32)
    out = np.empty(rgb.shape, np.float32)
    for y0 in range(0, rgb.shape[0], 256):  # row blocks: bounded temporaries on big images
        blk = rgb[y0 : y0 + 256]
        lin = np.stack([c.forward(blk[..., i]) for i, c in enumerate(src.curves)], axis=-1)
        lin = np.clip(lin @ m.T, 0.0, 1.0)
        out[y0 : y0 + 256] = np.stack([c.inverse(lin[..., i]) for i, c in enumerate(dst.curves)], axis=-1)
    return out


def float_to_srgb(rgb: np.ndarray, p: MatrixProfile) -> np.ndarray:
    """float32 in [0, 1] or uint8, HxWx3 (or HxW gray), in profile ``p`` -> float32 HxWx3 sRGB in [0, 1]."""
    s = _srgb()
    if p.matrix is None:  # gray: one curve to linear luminance, then the sRGB curve (neutral axis)
        g = s.curves[0].inverse(p.curves[0].forward(rgb))
        return np.repeat(g[..., None], 3, axis=-1) if g.ndim == 2 else g
    return _matrix_convert(rgb, p, s)


def float_from_srgb(rgb: np.ndarray, p: MatrixProfile) -> np.ndarray:
    """float32 HxWx3 sRGB -> float32 HxWx3 in RGB profile ``p`` (clipped to [0, 1])."""
    assert p.matrix is not None
    return _matrix_convert(rgb, _srgb(), p)


# ----------------------------------------------------------------------------------------- lcms engine
def _lcms_profile(icc: bytes) -> ImageCms.ImageCmsProfile:
    return ImageCms.ImageCmsProfile(io.BytesIO(icc))


def lcms_to_srgb(im: Image.Image, icc: bytes) -> Image.Image:
    """8-bit RGB / L / CMYK image in profile ``icc`` -> 8-bit sRGB "RGB" image (raises
    ImageCms.PyCMSError)."""
    srgb = _lcms_profile(srgb_profile_bytes())
    return ImageCms.profileToProfile(im, _lcms_profile(icc), srgb, renderingIntent=_INTENT, outputMode="RGB")


def lcms_from_srgb(im: Image.Image, icc: bytes) -> Image.Image:
    """8-bit sRGB "RGB" image -> 8-bit "RGB" image in RGB profile ``icc``."""
    srgb = _lcms_profile(srgb_profile_bytes())
    return ImageCms.profileToProfile(im, srgb, _lcms_profile(icc), renderingIntent=_INTENT, outputMode="RGB")


def profile_usable(icc: bytes, mode: str) -> bool:
    """Whether LittleCMS accepts the profile for pixels of this 8-bit Pillow ``mode``."""
    want = {"RGB": "RGB", "L": "GRAY", "CMYK": "CMYK"}.get(mode)
    if want is None or icc_color_space(icc) != want:
        return False
    try:
        _lcms_profile(icc)
    except (ImageCms.PyCMSError, OSError, ValueError):
        return False
    return True
