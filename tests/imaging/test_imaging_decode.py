"""decode(): formats, modes, orientation, alpha split, errors. Each corpus case gives a correct result or a
clear ImageError code."""

from __future__ import annotations

import io

import numpy as np
import pytest
from PIL import Image, ImageOps

from ccsr.imaging import ImageError, Limits, decode, sniff_format
from ccsr.imaging.decode import ORIENTATION_TRANSPOSE, orient_array
from ccsr.imaging.highdepth import write_png16, write_tiff16

from .corpus import animated, exif_with_orientation, pattern, save, soft_rgba

# The transpose that *undoes* each orientation's correction (to build stored images from an upright one).
_T = Image.Transpose
_INVERSE = {
    1: None,
    2: _T.FLIP_LEFT_RIGHT,
    3: _T.ROTATE_180,
    4: _T.FLIP_TOP_BOTTOM,
    5: _T.TRANSPOSE,
    6: _T.ROTATE_90,
    7: _T.TRANSVERSE,
    8: _T.ROTATE_270,
}


def stored_for(upright: Image.Image, o: int) -> Image.Image:
    return upright if _INVERSE[o] is None else upright.transpose(_INVERSE[o])


@pytest.mark.parametrize(
    ("fmt", "kw"),
    [
        ("PNG", {}),
        ("JPEG", {"quality": 95}),
        ("WEBP", {"lossless": True}),
        ("GIF", {}),
        ("TIFF", {}),
        ("AVIF", {"quality": 100}),
    ],
)
def test_formats_sniffed_and_decoded(fmt, kw):
    im = pattern(9, 5).quantize(64).convert("RGB") if fmt == "GIF" else pattern(9, 5)
    d = decode(save(im, fmt, **kw))
    assert d.source_format == fmt and d.size == (9, 5) and d.bit_depth == 8
    assert isinstance(d.rgb, Image.Image) and d.rgb.mode == "RGB" and d.alpha is None
    if fmt in ("PNG", "WEBP", "GIF", "TIFF"):  # lossless
        assert np.array_equal(np.asarray(d.rgb), np.asarray(im))


def test_format_comes_from_bytes_not_names():
    data = save(pattern(4, 4), "PNG")
    assert sniff_format(data) == "PNG"
    assert sniff_format(save(pattern(4, 4), "JPEG")) == "JPEG"
    assert sniff_format(b"GIF89a" + data) == "GIF"  # only the magic decides
    avif = save(pattern(4, 4), "AVIF")
    assert avif[4:12] == b"ftypavif" and b"mif1" in avif[16:40]
    mif1 = avif[:8] + b"mif1" + avif[12:]  # major brand mif1, avif only among the compatible brands
    assert sniff_format(mif1) == "AVIF" and decode(mif1).size == (4, 4)
    heic = avif[:8] + b"heic" + avif[12:16] + b"heic" * 6
    assert sniff_format(heic) is None


@pytest.mark.parametrize(
    "data",
    [
        b"",
        b"hello, world",
        b"%PDF-1.7\n%\xe2\xe3",
        b"<svg xmlns='http://www.w3.org/2000/svg'/>",
        b"\x00" * 64,
        b"RIFF\x00\x00\x00\x00WAVEfmt ",
    ],
    ids=["empty", "text", "pdf", "svg", "zeros", "wav"],
)
def test_non_image_bytes_refused(data):
    with pytest.raises(ImageError) as e:
        decode(data)
    assert e.value.code == "unsupported_format"


def test_format_outside_allow_list_refused():
    bmp = save(pattern(4, 4), "BMP")
    with pytest.raises(ImageError) as e:
        decode(bmp)
    assert e.value.code == "unsupported_format" and "BMP" in e.value.message
    with pytest.raises(ImageError) as e:
        decode(save(pattern(4, 4), "TIFF"), Limits(formats=frozenset({"PNG", "JPEG", "WEBP"})))
    assert e.value.code == "unsupported_format"


def test_truncated_jpeg():
    data = save(pattern(64, 48), "JPEG", quality=90)
    with pytest.raises(ImageError) as e:
        decode(data[: len(data) // 2])
    assert e.value.code == "truncated"


def test_corrupt_png():
    data = bytearray(save(pattern(16, 16), "PNG"))
    data[40:60] = b"\xff" * 20  # inside IDAT: zlib and CRC garbage
    with pytest.raises(ImageError) as e:
        decode(bytes(data))
    assert e.value.code in ("corrupt", "truncated")


@pytest.mark.parametrize("fmt", ["GIF", "WEBP", "PNG"])
def test_animated_refused_by_default(fmt):
    with pytest.raises(ImageError) as e:
        decode(animated(fmt))
    assert e.value.code == "animated" and "3 frames" in e.value.message


@pytest.mark.parametrize("fmt", ["GIF", "WEBP"])
def test_animated_first_frame_when_allowed(fmt):
    d = decode(animated(fmt), Limits(animated="first_frame"))
    assert d.size == (16, 12)
    px = np.asarray(d.rgb)[6, 8]
    assert np.all(np.abs(px.astype(int) - (0, 100, 200)) <= 3)  # frame 0's colour
    assert any("first of 3 frames" in n for n in d.notes)


# ---------------------------------------------------------------------------------------------- orientation
@pytest.mark.parametrize("o", range(1, 9))
def test_exif_orientation_png(o):
    upright = pattern(5, 3, seed=o)
    stored = stored_for(upright, o)
    data = save(stored, "PNG", exif=exif_with_orientation(o))
    d = decode(data)
    assert d.orientation == o and d.size == (5, 3)
    assert np.array_equal(np.asarray(d.rgb), np.asarray(upright))
    # Pillow's own exif_transpose agrees (an independent implementation of the table)
    assert np.array_equal(
        np.asarray(ImageOps.exif_transpose(Image.open(io.BytesIO(data)))), np.asarray(upright)
    )


def test_orientation_6_means_rotate_clockwise():
    """EXIF 6: stored row 0 is the visual right column; the stored top-left pixel ends at the top-right."""
    stored = pattern(4, 6, seed=1)  # 4 wide, 6 high as stored; upright it is 6 wide, 4 high
    d = decode(save(stored, "PNG", exif=exif_with_orientation(6)))
    up = np.asarray(d.rgb)
    st = np.asarray(stored)
    assert up.shape == (4, 6, 3)
    assert np.array_equal(up[0, -1], st[0, 0]) and np.array_equal(up[-1, -1], st[0, -1])


@pytest.mark.parametrize("o", range(1, 9))
def test_exif_orientation_jpeg_and_16bit(o):
    # JPEG (the camera case): big flat quadrants survive compression
    upright = Image.new("RGB", (64, 32), (255, 0, 0))
    upright.paste((0, 0, 255), (32, 0, 64, 16))
    upright.paste((0, 255, 0), (0, 16, 32, 32))
    d = decode(save(stored_for(upright, o), "JPEG", quality=95, exif=exif_with_orientation(o)))
    diff = np.abs(np.asarray(d.rgb).astype(int) - np.asarray(upright).astype(int))
    assert d.size == (64, 32) and np.median(diff) <= 4
    # 16-bit PNG (numpy orientation path) with alpha
    rng = np.random.default_rng(o)
    a = rng.integers(0, 65536, (3, 5, 4), dtype=np.uint16)
    stored = orient_array(a, {2: 2, 3: 3, 4: 4, 5: 5, 6: 8, 7: 7, 8: 6}[o]) if o > 1 else a
    d16 = decode(write_png16(stored, exif=exif_with_orientation(o)))
    assert d16.bit_depth == 16 and d16.size == (5, 3)
    assert np.array_equal(np.rint(d16.rgb * 65535).astype(np.uint16), a[..., :3])
    assert np.array_equal(np.rint(d16.alpha * 65535).astype(np.uint16), a[..., 3])


@pytest.mark.parametrize("o", range(1, 9))
def test_numpy_and_pillow_orientation_agree(o):
    im = pattern(5, 3, seed=11)
    want = im.transpose(ORIENTATION_TRANSPOSE[o]) if o > 1 else im
    assert np.array_equal(orient_array(np.asarray(im), o), np.asarray(want))


# ----------------------------------------------------------------------------------------------- modes
def test_grayscale():
    g = Image.fromarray(np.arange(35, dtype=np.uint8).reshape(5, 7) * 7, "L")
    d = decode(save(g, "PNG"))
    assert d.grayscale and d.rgb.mode == "RGB" and d.alpha is None
    assert np.array_equal(np.asarray(d.rgb)[..., 1], np.asarray(g))


def test_palette_with_trns():
    p = Image.new("P", (6, 4), 0)
    p.putpalette([255, 0, 0, 0, 255, 0, 0, 0, 255] + [0] * 759)
    p.paste(1, (3, 0, 6, 4))
    p.putpixel((0, 0), 2)
    data = save(p, "PNG", transparency=bytes([255, 128, 0]))  # index 0 opaque, 1 half, 2 transparent
    d = decode(data)
    assert d.alpha is not None
    assert d.alpha[1, 1] == 1.0 and abs(d.alpha[0, 4] - 128 / 255) < 1e-6 and d.alpha[0, 0] == 0.0
    assert tuple(np.asarray(d.rgb)[1, 4]) == (0, 255, 0)


def test_la_and_rgba_soft_alpha():
    rgba = soft_rgba()
    d = decode(save(rgba, "PNG"))
    assert np.array_equal(np.rint(d.alpha * 255).astype(np.uint8), np.asarray(rgba)[..., 3])
    assert np.array_equal(np.asarray(d.rgb), np.asarray(rgba)[..., :3])
    la = rgba.convert("LA")
    d = decode(save(la, "PNG"))
    assert d.grayscale and np.array_equal(np.rint(d.alpha * 255).astype(np.uint8), np.asarray(la)[..., 1])


def test_rgb_color_key_trns():
    im = Image.new("RGB", (4, 4), (10, 20, 30))
    im.putpixel((1, 1), (1, 2, 3))
    d = decode(save(im, "PNG", transparency=(1, 2, 3)))
    assert d.alpha is not None and d.alpha[1, 1] == 0 and d.alpha.sum() == 15
    g = Image.new("L", (4, 4), 90)
    g.putpixel((2, 3), 7)
    d = decode(save(g, "PNG", transparency=7))
    assert d.grayscale and d.alpha is not None and d.alpha[3, 2] == 0 and d.alpha.sum() == 15


@pytest.mark.parametrize("channels", [1, 2, 3, 4])
def test_16bit_png_full_precision(channels):
    rng = np.random.default_rng(channels)
    shape = (13, 7) if channels == 1 else (13, 7, channels)
    a = rng.integers(0, 65536, shape, dtype=np.uint16)
    data = write_png16(a)
    # Cross-check the writer with Pillow's own (8-bit, high-byte) reading of it
    pil8 = np.asarray(Image.open(io.BytesIO(data)))
    if channels in (3, 4):
        assert np.array_equal(pil8, (a >> 8).astype(np.uint8))
    d = decode(data)
    assert d.bit_depth == 16 and isinstance(d.rgb, np.ndarray) and d.rgb.dtype == np.float32
    colour = {1: a, 2: a[..., 0], 3: a, 4: a[..., :3]}[channels]
    got = np.rint(d.rgb * 65535).astype(np.uint16)
    want = np.repeat(colour[..., None], 3, -1) if colour.ndim == 2 else colour
    assert np.array_equal(got, want)
    assert (d.alpha is not None) == (channels in (2, 4))
    assert d.grayscale == (channels in (1, 2))


def test_16bit_tiff():
    rng = np.random.default_rng(5)
    a = rng.integers(0, 65536, (9, 11, 3), dtype=np.uint16)
    d = decode(write_tiff16(a))
    assert d.source_format == "TIFF" and d.bit_depth == 16
    assert np.array_equal(np.rint(d.rgb * 65535).astype(np.uint16), a)


def test_cmyk_jpeg_without_profile_uses_naive_conversion():
    cmyk = Image.new("CMYK", (16, 16), (0, 255, 255, 0))  # red ink mix
    d = decode(save(cmyk, "JPEG", quality=95))
    r, g, b = np.asarray(d.rgb)[8, 8].astype(int)
    assert r > 240 and g < 15 and b < 15


@pytest.mark.parametrize("size", [(1, 1), (7, 13)])
def test_tiny_images(size):
    im = pattern(*size)
    d = decode(save(im, "PNG"))
    assert d.size == size and np.array_equal(np.asarray(d.rgb), np.asarray(im))


def test_float_tiff_refused_clearly():
    f = Image.fromarray(np.ones((4, 4), np.float32), "F")
    with pytest.raises(ImageError) as e:
        decode(save(f, "TIFF"))
    assert e.value.code == "unsupported_mode"
