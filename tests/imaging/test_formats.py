"""The one format table (``ccsr.imaging.formats``): each format's name, content type and extensions are what the
bytes really are, and every consumer (decoder allow-list, encoder, CLI, bench, job runner, Runware's wire names,
the server's stored extensions) follows it rather than a list of its own."""

from __future__ import annotations

import argparse
import io

import numpy as np
import pytest
from PIL import Image

from ccsr import imaging
from ccsr.imaging import formats
from ccsr.imaging.formats import DECODABLE, ENCODABLE, FORMATS, find

from .corpus import LanczosModel


def _picture(fmt: str) -> bytes:
    """A small file written by Pillow in ``fmt`` (what a client would upload)."""
    rgb = np.random.default_rng(3).integers(0, 256, (10, 14, 3), dtype=np.uint8)
    buf = io.BytesIO()
    Image.fromarray(rgb).save(buf, fmt)
    return buf.getvalue()


@pytest.mark.parametrize("fmt", [f for f in FORMATS if f.decode or f.name == "BMP"], ids=lambda f: f.name)
def test_each_format_is_sniffed_under_its_table_name(fmt):
    data = _picture(fmt.name)
    assert imaging.sniff_format(data) == fmt.name
    if fmt.decode:
        assert imaging.decode(data).size == (14, 10)
    else:
        with pytest.raises(imaging.ImageError) as e:
            imaging.decode(data)
        assert e.value.code == "unsupported_format" and fmt.name in e.value.message


@pytest.mark.parametrize("fmt", ENCODABLE, ids=lambda f: f.name)
def test_each_output_format_writes_what_the_table_says(fmt):
    decoded = imaging.decode(_picture("PNG"))
    for word in (fmt.name, *fmt.extensions, "." + fmt.extension.upper()):
        options = imaging.EncodeOptions(word)
        assert options.validated().format == fmt.name
        enc = imaging.encode(imaging.upscale(decoded, LanczosModel(2)), options)
        assert imaging.sniff_format(enc.data) == fmt.name
        assert (enc.content_type, enc.extension) == (fmt.content_type, fmt.extension)
        assert Image.open(io.BytesIO(enc.data)).size == (28, 20)


def test_lookups_and_refusals_follow_the_table():
    assert find("JPG") is find(".jpeg") is find("jpeg") is formats.BY_NAME["JPEG"]
    assert find("tif") is formats.BY_NAME["TIFF"] and find("") is None and find("heic") is None
    assert formats.of_content_type("image/WEBP; q=1") is formats.BY_NAME["WEBP"]
    assert imaging.Limits().formats == DECODABLE == {"PNG", "JPEG", "WEBP", "TIFF", "GIF", "AVIF"}
    for word in ("GIF", "avif", "bmp", "nope"):  # read, or not even that, but never written
        with pytest.raises(imaging.ImageError) as e:
            imaging.EncodeOptions(word).validated()
        assert "PNG, JPG, WEBP, TIFF" in e.value.message
    with pytest.raises(imaging.ImageError) as e:
        imaging.EncodeOptions("webp", bit_depth=16).validated()
    assert "PNG or TIFF" in e.value.message


def test_consumers_offer_the_tables_output_formats():
    from ccsr.bench import FILE_OUTPUTS
    from ccsr.cli import build_parser

    extensions = [f.extension for f in ENCODABLE]
    sub = next(a for a in build_parser()._actions if isinstance(a, argparse._SubParsersAction))
    choices = next(a.choices for a in sub.choices["upscale"]._actions if a.dest == "format")
    assert list(choices) == extensions and list(FILE_OUTPUTS) == extensions


def test_runware_output_formats_map_into_the_table():
    from ccsr.api.runware_schema import OUTPUT_FORMATS, parse_upscale
    from ccsr.api.settings import Settings

    def output_format(value: str) -> str:
        task = {"taskType": "upscale", "taskUUID": "u", "inputImage": "x", "outputFormat": value}
        return parse_upscale(task, Settings()).output.format

    for wire in (*OUTPUT_FORMATS, "jpeg"):
        fmt = find(output_format(wire))
        assert fmt is find(wire) and fmt.encode
