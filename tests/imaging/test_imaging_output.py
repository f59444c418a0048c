"""OutputPixels: the model's rows may arrive in bands of any height; the file's pixels are those of the whole
image written at once, in every colour, depth, alpha and quantisation case."""

from __future__ import annotations

import dataclasses
import itertools

import numpy as np
import pytest
from PIL import Image

from ccsr.imaging import EncodeOptions, ImageError, OutputPixels, decode, encode_pixels
from ccsr.imaging import output as output_module
from ccsr.imaging.highdepth import write_png16
from ccsr.imaging.pixels import quantize_array

from .corpus import display_p3_icc, pattern, save, soft_rgba

W, H = 37, 29  # not multiples of the 8x8 dither tile, so band edges fall inside it


def rows(seed: int = 0, dtype=np.float32) -> np.ndarray:
    rng = np.random.default_rng(seed)
    if dtype == np.uint8:
        return rng.integers(0, 256, (H, W, 3), dtype=np.uint8)
    return rng.uniform(-0.05, 1.05, (H, W, 3)).astype(np.float32)  # a little out of range, as a model may give


def bands(heights: list[int]) -> list[slice]:
    edges = np.cumsum([0, *heights])
    assert edges[-1] == H
    return [slice(int(a), int(b)) for a, b in itertools.pairwise(edges)]


SPLITS = {"one-row-bands": [1] * H, "uneven": [3, 8, 5, 1, 12], "whole": [H]}


def sources() -> dict[str, object]:
    p3 = display_p3_icc()
    return {
        "srgb-8": decode(save(pattern(W, H), "PNG")),
        "alpha": decode(save(soft_rgba(W, H), "PNG")),
        "gray-alpha": decode(save(soft_rgba(W, H).convert("LA"), "PNG")),
        "gray": decode(save(pattern(W, H).convert("L"), "PNG")),
        "display-p3": decode(save(pattern(W, H), "PNG", icc_profile=p3)),
        "16-bit": decode(write_png16(np.full((H, W, 3), 30000, np.uint16))),
        "16-bit-p3": decode(write_png16(np.full((H, W, 3), 30000, np.uint16), icc_profile=p3)),
    }


SOURCES = sources()
OPTIONS = {
    "png": EncodeOptions("PNG"),
    "png-stripped": EncodeOptions("PNG", keep_metadata=False),
    "jpg-flattened": EncodeOptions("JPG", background=(10, 200, 30)),
    "tiff-16": EncodeOptions("TIFF", bit_depth=16),
}


def filled(source, options, quantize, split, data) -> OutputPixels:
    out = OutputPixels(source, (W, H), options, quantize=quantize)
    for band in bands(split):
        out.write(band.start, data[band])
    return out


@pytest.mark.parametrize("quantize", ["round", "dither"])
@pytest.mark.parametrize("options", OPTIONS.values(), ids=OPTIONS.keys())
@pytest.mark.parametrize("source", SOURCES.values(), ids=SOURCES.keys())
def test_bands_give_the_whole_image_pixels(source, options, quantize):
    data = rows()
    whole = filled(source, options, quantize, SPLITS["whole"], data)
    for split in ("one-row-bands", "uneven"):
        banded = filled(source, options, quantize, SPLITS[split], data)
        assert banded.pixels.dtype == whole.pixels.dtype and np.array_equal(banded.pixels, whole.pixels), split
    assert encode_pixels(whole).data == encode_pixels(filled(source, options, quantize, SPLITS["uneven"], data)).data


def test_the_8bit_lut_profile_path_is_banded_too(monkeypatch):
    """LUT RGB profiles go through LittleCMS in 8 bits; forced here with a profile it can convert."""
    monkeypatch.setattr(output_module.cms, "parse_matrix_profile", lambda icc: None)
    source = SOURCES["display-p3"]
    data = rows(1)
    whole = filled(source, EncodeOptions("PNG"), "round", SPLITS["whole"], data)
    assert whole.to_output is not output_module._unchanged
    assert np.array_equal(filled(source, EncodeOptions("PNG"), "round", SPLITS["uneven"], data).pixels, whole.pixels)


def test_dither_blocks_know_their_first_row():
    x = np.random.default_rng(2).uniform(0, 1, (H, W, 3)).astype(np.float32)
    whole = quantize_array(x, 8, dither=True)
    for band in bands(SPLITS["uneven"]):
        assert np.array_equal(quantize_array(x[band], 8, dither=True, top=band.start), whole[band])
    assert not np.array_equal(quantize_array(x[3:11], 8, dither=True), whole[3:11])  # the offset matters
    gray = x[..., 0]
    assert np.array_equal(quantize_array(gray[5:], 8, dither=True, top=5), quantize_array(gray, 8, dither=True)[5:])


def test_model_bytes_pass_through_exactly():
    data = rows(3, np.uint8)
    out = filled(SOURCES["srgb-8"], EncodeOptions("PNG"), "reference", SPLITS["uneven"], data)
    assert out.takes_model_bytes and np.array_equal(out.pixels, data)
    image = OutputPixels(SOURCES["srgb-8"], (W, H), EncodeOptions("PNG"), quantize="reference")
    image.write_image(Image.fromarray(data))
    assert np.array_equal(image.pixels, data)
    sixteen = OutputPixels(SOURCES["16-bit"], (W, H), EncodeOptions("PNG"), quantize="reference")
    assert not sixteen.takes_model_bytes  # a 16-bit source has no 8-bit reference: it rounds


def test_alpha_is_upscaled_to_the_output_size():
    source = SOURCES["alpha"]
    small = dataclasses.replace(source, alpha=source.alpha[::2, ::2])
    out = OutputPixels(small, (W, H), EncodeOptions("PNG"))
    assert out.alpha is not None and out.alpha.shape == (H, W) and out.pixels.shape == (H, W, 4)


def test_rows_that_do_not_fit_are_refused():
    out = OutputPixels(SOURCES["srgb-8"], (W, H), EncodeOptions("PNG"))
    for top, block in [(0, rows()[:, :-1]), (H - 2, rows()[:3]), (-1, rows()[:2]), (0, rows()[..., :2])]:
        with pytest.raises(ImageError) as e:
            out.write(top, block)
        assert e.value.code == "model_output"


def test_an_unknown_quantisation_is_refused_before_any_rows():
    with pytest.raises(ImageError) as e:
        OutputPixels(SOURCES["srgb-8"], (W, H), EncodeOptions("PNG"), quantize="truncate")
    assert e.value.code == "invalid_option"


def test_an_output_with_rows_missing_is_not_written():
    out = OutputPixels(SOURCES["srgb-8"], (W, H), EncodeOptions("PNG"))
    out.write(0, rows()[:10])
    out.write(12, rows()[12:])
    with pytest.raises(ImageError, match="2 of 29 output rows"):
        encode_pixels(out)
    out.write(10, rows()[10:12])
    assert encode_pixels(out).width == W
