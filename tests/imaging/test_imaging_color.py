"""Colour management: Display-P3 and CMYK JPEGs with ICC profiles, 16-bit float conversion, sRGB
pass-through."""

from __future__ import annotations

import io
import struct

import numpy as np
import pytest
from PIL import Image, ImageCms

from ccsr.imaging import EncodeOptions, decode, upscale_bytes
from ccsr.imaging import color as cms
from ccsr.imaging.highdepth import read_16bit, write_png16

from .corpus import D50, LanczosModel, _assemble, _mluc, _xyz, cmyk_icc, display_p3_icc, save

REL = ImageCms.Intent.RELATIVE_COLORIMETRIC
# In-gamut sRGB colours, laid out as 8x8 flat patches (flat, so JPEG keeps them and Lanczos does not mix
# them).
PATCHES = [(200, 30, 30), (30, 160, 60), (40, 60, 200), (230, 200, 40), (128, 128, 128), (250, 250, 250)]


def patch_image(colours=PATCHES, cell=8) -> Image.Image:
    im = Image.new("RGB", (cell * len(colours), cell))
    for i, c in enumerate(colours):
        im.paste(c, (i * cell, 0, (i + 1) * cell, cell))
    return im


def centres(arr: np.ndarray, n: int, cell: int) -> np.ndarray:
    return np.stack([arr[cell // 2, i * cell + cell // 2].astype(int) for i in range(n)])


def lcms(im: Image.Image, src: bytes | None, dst: bytes | None, mode="RGB") -> Image.Image:
    def prof(b):
        return ImageCms.ImageCmsProfile(io.BytesIO(b) if b else ImageCms.createProfile("sRGB"))

    return ImageCms.profileToProfile(im, prof(src), prof(dst), renderingIntent=REL, outputMode=mode)


def test_test_profile_is_display_p3():
    """sRGB red is (234, 51, 35) in Display P3: the hand-built profile has the right primaries and curve."""
    p3 = display_p3_icc()
    assert lcms(Image.new("RGB", (1, 1), (255, 0, 0)), None, p3).getpixel((0, 0)) == (234, 51, 35)
    parsed = cms.parse_matrix_profile(p3)
    assert parsed is not None and not cms.is_srgb(parsed)
    assert cms.is_srgb(cms.parse_matrix_profile(cms.srgb_profile_bytes()))


def test_display_p3_jpeg_decodes_to_srgb():
    p3 = display_p3_icc()
    srgb = patch_image()
    p3_pixels = lcms(srgb, None, p3)
    moved = np.abs(centres(np.asarray(p3_pixels), 6, 8) - np.array(PATCHES)).max()
    assert moved >= 15  # the P3 numbers really differ from the sRGB ones: a dropped profile would show
    d = decode(save(p3_pixels, "JPEG", quality=98, subsampling=0, icc_profile=p3))
    assert d.icc_profile == p3 and d.rgb_is_srgb
    assert np.abs(centres(np.asarray(d.rgb), 6, 8) - np.array(PATCHES)).max() <= 3


@pytest.mark.parametrize("keep", [True, False])
def test_display_p3_round_trip_keeps_or_converts_profile(keep):
    p3 = display_p3_icc()
    p3_pixels = lcms(patch_image(), None, p3)
    data = save(p3_pixels, "PNG", icc_profile=p3)
    out = upscale_bytes(data, LanczosModel(2), encode_options=EncodeOptions("PNG", keep_metadata=keep))
    raw = Image.open(io.BytesIO(out.data))
    assert raw.size == (96, 16)
    got = centres(np.asarray(raw.convert("RGB")), 6, 16)
    if keep:  # original profile, pixels converted back into it
        assert raw.info.get("icc_profile") == p3
        assert np.abs(got - centres(np.asarray(p3_pixels), 6, 8)).max() <= 2
    else:  # stripped: plain sRGB numbers, no profile
        assert raw.info.get("icc_profile") is None
        assert np.abs(got - np.array(PATCHES)).max() <= 2
    # Either way a colour-managed reader sees the same colours
    assert np.abs(centres(np.asarray(decode(out.data).rgb), 6, 16) - np.array(PATCHES)).max() <= 2


def test_16bit_display_p3_float_path():
    p3 = display_p3_icc()
    p3_8 = np.asarray(lcms(patch_image(), None, p3)).astype(np.uint16)
    d = decode(write_png16(p3_8 * 257, icc_profile=p3))
    assert d.bit_depth == 16 and d.rgb_is_srgb
    got = centres(np.rint(d.rgb * 255), 6, 8)
    assert np.abs(got - np.array(PATCHES)).max() <= 2  # numpy engine agrees with LittleCMS
    out = upscale_bytes(
        write_png16(p3_8 * 257, icc_profile=p3), LanczosModel(1), encode_options=EncodeOptions("PNG")
    )
    raw = Image.open(io.BytesIO(out.data))
    assert raw.info.get("icc_profile") == p3
    a16 = read_16bit(out.data, raw)
    assert a16.dtype == np.uint16 and np.abs(a16.astype(int) - p3_8 * 257).max() <= 2  # float round trip


def test_srgb_profile_is_not_converted():
    im = Image.fromarray(np.random.default_rng(3).integers(0, 256, (9, 9, 3), dtype=np.uint8), "RGB")
    d = decode(save(im, "PNG", icc_profile=cms.srgb_profile_bytes()))
    assert np.array_equal(np.asarray(d.rgb), np.asarray(im)) and d.icc_profile == cms.srgb_profile_bytes()


def test_cmyk_jpeg_with_profile():
    icc = cmyk_icc()
    inks = [(255, 0, 0, 0), (0, 255, 0, 0), (0, 0, 255, 0), (0, 0, 0, 255), (255, 255, 0, 0)]
    cmyk = Image.new("CMYK", (8 * len(inks), 8))
    for i, c in enumerate(inks):
        cmyk.paste(c, (i * 8, 0, i * 8 + 8, 8))
    data = save(cmyk, "JPEG", quality=98, icc_profile=icc)
    d = decode(data)
    assert d.icc_profile == icc
    got = centres(np.asarray(d.rgb), len(inks), 8)
    want = centres(np.asarray(lcms(Image.open(io.BytesIO(data)), icc, None)), len(inks), 8)
    assert np.abs(got - want).max() <= 1
    # the warm paper of the profile shows: cyan ink is (0, 240, 220), not the naive (0, 255, 255)
    assert np.abs(got[0] - (0, 240, 220)).max() <= 6
    naive = centres(np.asarray(Image.open(io.BytesIO(data)).convert("RGB")), len(inks), 8)
    assert np.abs(naive[0] - (0, 255, 255)).max() <= 6
    # output: a CMYK profile cannot be put back into RGB pixels: sRGB, tagged as such, with a note
    out = upscale_bytes(data, LanczosModel(2), encode_options=EncodeOptions("JPG"))
    assert Image.open(io.BytesIO(out.data)).info.get("icc_profile") == cms.srgb_profile_bytes()
    assert any("not restorable" in n for n in out.notes)


def gray_icc(gamma: float) -> bytes:
    curv = b"curv\x00\x00\x00\x00" + struct.pack(">IH", 1, round(gamma * 256))
    tags = [(b"desc", _mluc("Gray gamma")), (b"cprt", _mluc("none")), (b"wtpt", _xyz(*D50)), (b"kTRC", curv)]
    return _assemble(0x04300000, b"mntr", b"GRAY", b"XYZ ", tags)


def test_gray_profile():
    icc = gray_icc(1.8)
    g = Image.new("L", (4, 4), 128)
    d = decode(save(g, "PNG", icc_profile=icc))
    want = lcms(g, icc, None).getpixel((0, 0))
    assert abs(int(np.asarray(d.rgb)[0, 0, 0]) - want[0]) <= 1 and want[0] != 128


def test_broken_profile_ignored_with_note():
    im = Image.new("RGB", (4, 4), (10, 200, 30))
    bogus = b"\x00\x00\x00\x80" + b"junk" * 40
    d = decode(save(im, "PNG", icc_profile=bogus))
    assert d.icc_profile is None and np.array_equal(np.asarray(d.rgb), np.asarray(im))
    assert any("ICC" in n for n in d.notes)


def test_parametric_curve_inverse():
    c = cms.Curve("para3", (2.4, 1 / 1.055, 0.055 / 1.055, 1 / 12.92, 0.04045))
    x = np.linspace(0, 1, 1001)
    assert np.abs(c.inverse(c.forward(x)) - x).max() < 1e-4


def test_gray_profile_output_is_gray_and_untagged():
    out = upscale_bytes(save(Image.new("L", (4, 4), 128), "PNG", icc_profile=gray_icc(1.8)), LanczosModel(2))
    res = Image.open(io.BytesIO(out.data))
    assert res.mode == "L" and res.info.get("icc_profile") is None  # never an RGB profile on gray pixels
    assert abs(int(np.asarray(res)[0, 0]) - int(np.asarray(decode(out.data).rgb)[0, 0, 0])) == 0
