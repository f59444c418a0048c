"""upscale() / upscale_bytes() / fit_scale(): exact sizes, alpha, orientation, depth, quantisation, output
cap."""

from __future__ import annotations

import io
import math
from types import SimpleNamespace

import numpy as np
import pytest
from PIL import Image, ImageOps

from ccsr.imaging import (
    EncodeOptions,
    ImageError,
    Limits,
    decode,
    fit_scale,
    output_size,
    upscale,
    upscale_bytes,
)
from ccsr.imaging.highdepth import needs_16bit_read, read_16bit, write_png16

from .corpus import LanczosModel, exif_with_orientation, pattern, save, soft_rgba


@pytest.mark.parametrize("size", [(1, 1), (7, 13), (33, 17), (64, 48)])
@pytest.mark.parametrize("scale", [1, 1.5, 2, 3, 4])
def test_output_size_is_exactly_ceil_scale_times_size(size, scale):
    out = upscale_bytes(save(pattern(*size), "PNG"), LanczosModel(scale), encode_options=EncodeOptions("PNG"))
    want = (math.ceil(size[0] * scale), math.ceil(size[1] * scale))
    assert (out.width, out.height) == want == Image.open(io.BytesIO(out.data)).size


def test_output_size_float_safety():
    assert output_size((10, 10), 1.1) == (11, 11)  # not 12 from 11.000000000000002
    assert output_size((3, 7), 2.5) == (8, 18)


@pytest.mark.parametrize("fmt", ["PNG", "WEBP", "TIFF"])
def test_alpha_preserved(fmt):
    src = soft_rgba(40, 30)
    out = upscale_bytes(save(src, "PNG"), LanczosModel(2), encode_options=EncodeOptions(fmt))
    res = Image.open(io.BytesIO(out.data))
    assert res.mode == "RGBA" and res.size == (80, 60)
    a_out = np.asarray(res, dtype=np.float32)[..., 3]
    a_in = np.asarray(src, dtype=np.float32)[..., 3]
    back = a_out.reshape(30, 2, 40, 2).mean(axis=(1, 3))  # box-reduce the 2x alpha to the source grid
    assert np.abs(back - a_in).max() <= 6.0  # max error bound, in 8-bit levels
    assert np.abs(back - a_in).mean() <= 1.0
    assert a_out[30, 40] == 255 and a_out[0, 0] == 0  # opaque centre stays opaque, clear corner clear


def test_palette_trns_alpha_survives_to_png():
    p = Image.new("P", (4, 4), 1)
    p.putpalette([0, 0, 0, 200, 10, 10] + [0] * 762)
    p.paste(0, (0, 0, 2, 4))
    out = upscale_bytes(save(p, "PNG", transparency=0), LanczosModel(2), encode_options=EncodeOptions("PNG"))
    a = np.asarray(Image.open(io.BytesIO(out.data)))[..., 3]
    assert a[:, :2].max() <= 30 and a[:, -2:].min() >= 225  # transparent left half, opaque right half


def test_jpg_flattens_alpha_on_background():
    src = soft_rgba(40, 30)
    out = upscale_bytes(
        save(src, "PNG"), LanczosModel(2), encode_options=EncodeOptions("JPG", background=(0, 0, 255))
    )
    res = np.asarray(Image.open(io.BytesIO(out.data)).convert("RGB")).astype(int)
    assert np.abs(res[1, 1] - (0, 0, 255)).max() <= 8  # transparent corner -> background
    want_centre = np.asarray(src)[15, 20, :3].astype(int)
    assert np.abs(res[30, 40] - want_centre).max() <= 8


def test_orientation_applied_in_output_and_tag_removed():
    upright = Image.new("RGB", (60, 20), (250, 0, 0))
    upright.paste((0, 0, 250), (0, 0, 10, 20))  # blue stripe on the left of the upright image
    stored = upright.transpose(
        Image.Transpose.ROTATE_90
    )  # what a camera held sideways stores (orientation 6)
    data = save(stored, "JPEG", quality=95, exif=exif_with_orientation(6))
    out = upscale_bytes(data, LanczosModel(2), encode_options=EncodeOptions("JPG"))
    res = Image.open(io.BytesIO(out.data))
    assert res.size == (120, 40)
    assert res.getexif().get(0x0112) is None and res.getexif().get(0x010F) == "TestCam"
    assert np.asarray(ImageOps.exif_transpose(res)).shape == np.asarray(res).shape  # a viewer rotates nothing
    px = np.asarray(res.convert("RGB")).astype(int)
    assert px[20, 5, 2] > 200 and px[20, 100, 0] > 200  # blue on the left, red on the right


@pytest.mark.parametrize(("fmt", "channels"), [("PNG", 3), ("PNG", 4), ("PNG", 1), ("TIFF", 3), ("TIFF", 4)])
def test_16bit_depth_kept(fmt, channels):
    rng = np.random.default_rng(channels)
    shape = (12, 10) if channels == 1 else (12, 10, channels)
    a = np.sort(rng.integers(0, 65536, shape, dtype=np.uint16), axis=0)
    out = upscale_bytes(write_png16(a), LanczosModel(2), encode_options=EncodeOptions(fmt))
    res = Image.open(io.BytesIO(out.data))
    assert res.size == (20, 24)
    if channels == 1:
        assert res.mode == "I;16"
        got = np.asarray(res)
    else:
        assert needs_16bit_read(res)
        got = read_16bit(out.data, res)
    # genuinely 16-bit: the low byte carries information, unlike an 8-bit image scaled by 257
    assert np.any(got % 257 != 0)
    d = decode(out.data)
    assert d.bit_depth == 16 and (d.alpha is not None) == (channels == 4)


def test_16bit_source_to_8bit_format_is_rounded():
    a = np.full((4, 4, 3), 65535 * 254.6 / 255, dtype=np.uint16)
    out = upscale_bytes(write_png16(a), LanczosModel(1), encode_options=EncodeOptions("WEBP", quality=99))
    assert out.content_type == "image/webp"
    assert np.abs(np.asarray(Image.open(io.BytesIO(out.data))).astype(int) - 255).max() <= 2


class ConstModel:
    """Returns final = v everywhere; .image truncates as the reference does."""

    def __init__(self, v: float, size=(64, 64)):
        self.v, self.size = v, size

    def __call__(self, rgb):
        w, h = self.size
        final = np.full((h, w, 3), self.v, np.float32)
        return SimpleNamespace(image=Image.fromarray((final * 255).astype(np.uint8)), final=final)


def test_quantize_modes():
    d = decode(save(pattern(8, 8), "PNG"))
    v = 254.7 / 255
    assert upscale(d, ConstModel(v), quantize="round").image8.min() == 255  # rounded, not truncated
    assert upscale(d, ConstModel(v), quantize="reference").image8.max() == 254  # the model's own bytes
    dithered = upscale(d, ConstModel(100.3 / 255), quantize="dither").image8
    assert set(np.unique(dithered)) == {100, 101} and abs(dithered.mean() - 100.3) < 0.02
    with pytest.raises(ImageError) as e:
        upscale(d, ConstModel(v), quantize="truncate")
    assert e.value.code == "invalid_option"


def test_reference_quantize_is_bit_exact_in_png():
    src = save(pattern(9, 7), "PNG")
    model = LanczosModel(2)
    out = upscale_bytes(src, model, encode_options=EncodeOptions("PNG"), quantize="reference")
    again = model(decode(src).rgb).image
    assert np.array_equal(np.asarray(Image.open(io.BytesIO(out.data))), np.asarray(again))


def test_model_receives_pil_for_8bit_and_float_for_16bit():
    m = LanczosModel(2)
    upscale_bytes(save(pattern(3, 3), "PNG"), m, encode_options=EncodeOptions("PNG"))
    upscale_bytes(write_png16(np.zeros((3, 3, 3), np.uint16)), m, encode_options=EncodeOptions("PNG"))
    assert isinstance(m.calls[0], Image.Image) and isinstance(m.calls[1], np.ndarray)


def test_model_output_of_wrong_size_is_an_error():
    with pytest.raises(ImageError) as e:
        upscale_bytes(save(pattern(8, 8), "PNG"), ConstModel(0.5, (15, 16)), scale=2)
    assert e.value.code == "model_output"


# ------------------------------------------------------------------------------------------ output cap
@pytest.mark.parametrize(
    ("size", "scale", "want"),
    [
        ((2048, 2048), 4, (1024, 1024)),
        ((4000, 3000), 2, (2048, 1536)),
        ((5000, 10), 1, (4096, 8)),
        ((100, 100), 2, None),
        ((2048, 2048), 2, None),
        ((2049, 10), 2, (2048, 9)),
    ],
)
def test_fit_scale_runware_rule(size, scale, want):
    fit = fit_scale(size, scale, Limits())
    if want is None:
        assert fit.shrink is None and fit.input_size == size
    else:
        assert fit.input_size == want and 0 < fit.shrink < 1
    ow, oh = fit.output_size(scale)
    assert ow <= 4096 and oh <= 4096


def test_fit_scale_is_tight_over_many_cases():
    rng = np.random.default_rng(0)
    for _ in range(300):
        size = (int(rng.integers(1, 9000)), int(rng.integers(1, 9000)))
        scale = float(rng.choice([1, 1.5, 2, 2.5, 3, 4, 8]))
        fit = fit_scale(size, scale, Limits())
        ow, oh = fit.output_size(scale)
        assert ow <= 4096 and oh <= 4096
        if fit.shrink is not None:  # tight: the limiting side is within one input pixel of the cap
            w, h = fit.input_size
            assert output_size((w + 1, 1), scale)[0] > 4096 or output_size((1, h + 1), scale)[1] > 4096


def test_upscale_bytes_shrinks_input_first():
    out = upscale_bytes(save(pattern(3000, 60), "PNG"), LanczosModel(2), encode_options=EncodeOptions("PNG"))
    assert (out.width, out.height) == (4096, 80)
    assert any("shrunk" in n for n in out.notes)


def test_output_cap_enforced_without_scale():
    with pytest.raises(ImageError) as e:
        upscale_bytes(save(pattern(8, 8), "PNG"), ConstModel(0.5, (4097, 10)), limits=Limits())
    assert e.value.code == "too_large_output"
