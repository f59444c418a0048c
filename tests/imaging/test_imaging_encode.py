"""encode(): formats, quality, metadata kept or stripped, Software tag, gray outputs, option validation."""

from __future__ import annotations

import io

import numpy as np
import pytest
from PIL import Image

from ccsr.imaging import EncodeOptions, ImageError, decode, encode, upscale, upscale_bytes
from ccsr.imaging.highdepth import write_png16

from .corpus import LanczosModel, display_p3_icc, exif_with_orientation, pattern, save

XMP = (
    b'<x:xmpmeta xmlns:x="adobe:ns:meta/"><rdf:RDF xmlns:rdf="http://www.w3.org/1999/02/22-rdf-syntax-ns#">'
    b'<rdf:Description xmlns:tiff="http://ns.adobe.com/tiff/1.0/" tiff:Orientation="6" '
    b'xmlns:dc="http://purl.org/dc/elements/1.1/" dc:creator="Ada"/></rdf:RDF></x:xmpmeta>'
)


def camera_jpeg() -> bytes:
    return save(
        pattern(12, 8),
        "JPEG",
        quality=95,
        exif=exif_with_orientation(6),
        xmp=XMP,
        icc_profile=display_p3_icc(),
    )


def software(im: Image.Image) -> str | None:
    return im.info.get("Software") or im.getexif().get(0x0131)


@pytest.mark.parametrize("fmt", ["JPG", "PNG", "WEBP", "TIFF"])
def test_metadata_kept(fmt):
    out = upscale_bytes(camera_jpeg(), LanczosModel(2), encode_options=EncodeOptions(fmt, keep_metadata=True))
    res = Image.open(io.BytesIO(out.data))
    assert res.size == (16, 24)  # oriented: 8x12 upright, doubled
    assert res.info.get("icc_profile") == display_p3_icc()
    assert software(res) == "ccsr"
    if fmt != "TIFF":  # TIFF carries ICC, XMP and Software, not the EXIF block
        ex = res.getexif()
        assert ex.get(0x010F) == "TestCam" and 0x0112 not in ex
    xmp = res.info.get("xmp") or res.info.get("XML:com.adobe.xmp")
    xmp = xmp.encode() if isinstance(xmp, str) else xmp
    assert b'dc:creator="Ada"' in xmp and b"tiff:Orientation" not in xmp


@pytest.mark.parametrize("fmt", ["JPG", "PNG", "WEBP", "TIFF"])
def test_metadata_stripped(fmt):
    out = upscale_bytes(
        camera_jpeg(), LanczosModel(2), encode_options=EncodeOptions(fmt, keep_metadata=False)
    )
    res = Image.open(io.BytesIO(out.data))
    assert res.size == (16, 24)  # orientation is applied to the pixels either way
    assert res.info.get("icc_profile") is None
    assert not (res.info.get("xmp") or res.info.get("XML:com.adobe.xmp"))
    assert software(res) == "ccsr"
    if fmt != "TIFF":
        assert res.getexif().get(0x010F) is None


def test_exif_pixel_dimensions_updated():
    ex = Image.Exif()
    ex.get_ifd(0x8769)[0xA002] = 12
    ex.get_ifd(0x8769)[0xA003] = 8
    out = upscale_bytes(
        save(pattern(12, 8), "JPEG", exif=ex.tobytes()), LanczosModel(2), encode_options=EncodeOptions("JPG")
    )
    sub = Image.open(io.BytesIO(out.data)).getexif().get_ifd(0x8769)
    assert (sub[0xA002], sub[0xA003]) == (24, 16)


def test_quality_changes_jpeg_and_webp_size():
    d = upscale(decode(save(pattern(64, 64), "PNG")), LanczosModel(2))
    for fmt in ("JPG", "WEBP"):
        lo = encode(d, EncodeOptions(fmt, quality=20)).data
        hi = encode(d, EncodeOptions(fmt, quality=99)).data
        assert len(lo) < len(hi)


@pytest.mark.parametrize(
    "opts",
    [
        EncodeOptions("GIF"),
        EncodeOptions("PNG", quality=19),
        EncodeOptions("JPG", quality=100),
        EncodeOptions("JPG", bit_depth=16),
        EncodeOptions("PNG", bit_depth=12),
        EncodeOptions("JPG", background=(0, 0)),
    ],
)
def test_bad_options(opts):
    d = upscale(decode(save(pattern(4, 4), "PNG")), LanczosModel(1))
    with pytest.raises(ImageError) as e:
        encode(d, opts)
    assert e.value.code == "invalid_option"


def test_content_type_and_extension():
    d = upscale(decode(save(pattern(4, 4), "PNG")), LanczosModel(1))
    got = {
        f: (encode(d, EncodeOptions(f)).content_type, encode(d, EncodeOptions(f)).extension)
        for f in ("PNG", "JPEG", "WEBP", "TIFF")
    }
    assert got == {
        "PNG": ("image/png", "png"),
        "JPEG": ("image/jpeg", "jpg"),
        "WEBP": ("image/webp", "webp"),
        "TIFF": ("image/tiff", "tiff"),
    }


def test_gray_stays_gray():
    g = Image.fromarray(np.tile(np.arange(0, 250, 10, dtype=np.uint8), (6, 1)), "L")
    out = upscale_bytes(save(g, "PNG"), LanczosModel(2), encode_options=EncodeOptions("PNG"))
    res = Image.open(io.BytesIO(out.data))
    assert res.mode == "L" and res.size == (50, 12)
    g16 = upscale_bytes(
        write_png16(np.full((3, 3), 1000, np.uint16)), LanczosModel(2), encode_options=EncodeOptions("PNG")
    )
    res16 = Image.open(io.BytesIO(g16.data))
    assert res16.mode == "I;16" and int(np.asarray(res16).max()) == 1000


def test_8bit_source_may_be_written_as_16bit():
    d = upscale(decode(save(pattern(6, 6), "PNG")), LanczosModel(2))
    res = Image.open(io.BytesIO(encode(d, EncodeOptions("PNG", bit_depth=16)).data))
    assert res.mode == "RGB" and decode(encode(d, EncodeOptions("PNG", bit_depth=16)).data).bit_depth == 16
