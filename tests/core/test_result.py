"""``output_type``: the 8-bit-only result is the same image, assembled from row blocks without a float copy."""

from __future__ import annotations

import numpy as np
import pytest
from PIL import Image

from ccsr import result
from ccsr.params import ParamError, UpscaleParams

FAST = UpscaleParams(scale=2, steps=6, seed=7, size_mode="pad")
# 48x40 x4 in pad mode: target 192x160, processed at 192x192 (32 rows cropped); 128 px tiles at a 96 px stride
# give two rows of windows that overlap by 64 px, so blocks are handed out before the last window is decoded.
MIX = FAST.replace(scale=4, tile_diffusion="mix", tile_diffusion_size=128, tile_diffusion_stride=96)
CASES = {
    "untiled-pad": FAST,
    "untiled-reference-resize": FAST.replace(size_mode="reference"),
    "mix-bands-pad": MIX,
    "mix-bands-reference": MIX.replace(size_mode="reference"),
    "gaussian": MIX.replace(tile_diffusion="gaussian"),
}


@pytest.fixture(scope="module")
def lq(fixtures) -> Image.Image:
    return Image.open(fixtures / "inputs" / "lq_48x40.png").convert("RGB")


@pytest.mark.parametrize("params", CASES.values(), ids=CASES.keys())
def test_pil_output_is_the_same_image_without_the_float_result(tiny_pipeline, lq, params):
    full = tiny_pipeline.run(lq, params)
    lean = tiny_pipeline.run(lq, params, output_type="pil")
    assert lean.final is None and lean.processed is None
    assert lean.image.size == full.image.size == full.geometry.target
    assert np.array_equal(np.asarray(lean.image), np.asarray(full.image))


def test_calling_the_pipeline_returns_the_same_image(tiny_pipeline, lq):
    image = tiny_pipeline(lq, **MIX.to_dict())
    assert np.array_equal(np.asarray(image), np.asarray(tiny_pipeline.run(lq, MIX).image))


def recorded_writes(monkeypatch, cls) -> list[tuple[int, int]]:
    """(first row, rows) of every ``cls.write`` call from now on."""
    writes: list[tuple[int, int]] = []
    write = cls.write

    def spy(self, top, rows):
        writes.append((top, len(rows)))
        write(self, top, rows)

    monkeypatch.setattr(cls, "write", spy)
    return writes


def test_mix_rows_are_handed_out_in_bands_top_to_bottom(tiny_pipeline, lq, monkeypatch):
    blocks = recorded_writes(monkeypatch, result.ImageResult)
    out = tiny_pipeline.run(lq, MIX, output_type="pil")
    height = out.geometry.process[1]
    assert len(blocks) > 1 and max(n for _, n in blocks) < height  # never the whole image at once
    tops = [t for t, _ in blocks]
    assert tops == sorted(tops) and tops[0] == 0
    assert all(t + n == nxt for (t, n), nxt in zip(blocks, [*tops[1:], height], strict=True))  # each row once


def test_unknown_output_type_is_refused(tiny_pipeline, lq):
    with pytest.raises(ValueError, match="output_type"):
        tiny_pipeline.run(lq, FAST, output_type="tensor")


def test_a_stride_wider_than_the_tile_is_refused(tiny_pipeline, lq):
    with pytest.raises(ParamError) as err:
        UpscaleParams(tile_diffusion="mix", tile_diffusion_size=128, tile_diffusion_stride=136).validate()
    assert err.value.field == "tile_diffusion_stride"
    UpscaleParams(tile_diffusion="none", tile_diffusion_size=128, tile_diffusion_stride=136).validate()  # unused
    with pytest.raises(ParamError) as err:  # the stride alone, wider than any tile the planner may choose
        tiny_pipeline.plan(lq.size, FAST.replace(scale=4, tile_diffusion="mix", tile_diffusion_stride=4096))
    assert err.value.field == "tile_diffusion_stride"


# -- rows streamed into the output file's pixels (the chain of `ccsr upscale` and the server) --------------------


@pytest.fixture(scope="module")
def lq_decoded(fixtures):
    from ccsr import imaging

    return imaging.decode((fixtures / "inputs" / "lq_48x40.png").read_bytes())


def whole_image_chain(pipe, decoded, params, options, quantize="round"):
    """The chain as it was: the float result held whole, then encoded."""
    from ccsr import imaging

    return imaging.encode(imaging.upscale(decoded, lambda rgb: pipe.run(rgb, params), quantize=quantize), options)


CHAIN_CASES = [
    *((name, "round") for name in CASES),
    ("mix-bands-pad", "dither"),  # the dither pattern continues across bands
    ("untiled-reference-resize", "reference"),  # the reference's own 8-bit bytes, resized in 8 bits
    ("mix-bands-reference", "reference"),
]


@pytest.mark.parametrize(("case", "quantize"), CHAIN_CASES, ids=[f"{c}-{q}" for c, q in CHAIN_CASES])
def test_streamed_chain_writes_the_same_file(tiny_pipeline, lq_decoded, case, quantize):
    params = CASES[case]
    from ccsr import imaging
    from ccsr.jobs.chain import upscale_encode

    options = imaging.EncodeOptions("PNG")
    streamed, out = upscale_encode(tiny_pipeline, lq_decoded, params, options, quantize=quantize)
    assert out.image is None if quantize != "reference" else out.image is not None
    assert out.final is None and out.processed is None and "encode" in out.timings
    assert streamed.data == whole_image_chain(tiny_pipeline, lq_decoded, params, options, quantize).data


@pytest.mark.parametrize("size_mode", ["pad", "reference"])
def test_streamed_rows_arrive_in_bands(tiny_pipeline, lq_decoded, monkeypatch, size_mode):
    """Pad mode crops the bands; the reference mode's resize back to the target runs on the bands too."""
    from ccsr import imaging
    from ccsr.jobs.chain import upscale_encode

    writes = recorded_writes(monkeypatch, imaging.OutputPixels)
    _, out = upscale_encode(tiny_pipeline, lq_decoded, MIX.replace(size_mode=size_mode), imaging.EncodeOptions("PNG"))
    g = out.geometry
    assert (g.pad != (0, 0)) if size_mode == "pad" else (g.process != g.target)  # both geometries are exercised
    height = g.target[1]
    assert len(writes) > 1 and max(n for _, n in writes) < height
    tops = [t for t, _ in writes]
    assert tops[0] == 0 and all(t + n == nxt for (t, n), nxt in zip(writes, [*tops[1:], height], strict=True))


def test_keep_float_also_returns_the_float_result(tiny_pipeline, lq_decoded):
    from ccsr import imaging
    from ccsr.jobs.chain import upscale_encode

    options = imaging.EncodeOptions("PNG")
    kept, out = upscale_encode(tiny_pipeline, lq_decoded, FAST, options, keep_float=True)
    assert out.processed is not None
    assert np.array_equal(out.processed, tiny_pipeline.run(lq_decoded.rgb, FAST).processed)
    assert kept.data == upscale_encode(tiny_pipeline, lq_decoded, FAST, options)[0].data


def test_a_sink_of_another_size_is_refused_before_any_work(tiny_pipeline, lq_decoded):
    from ccsr import imaging
    from ccsr.jobs.chain import upscale_encode

    target = tiny_pipeline.plan(lq_decoded.size, FAST).geometry.target
    sink = imaging.OutputPixels(lq_decoded, (target[0] + 1, target[1]), imaging.EncodeOptions("PNG"))
    calls: list[int] = []
    with pytest.raises(ValueError, match="the output takes"):
        tiny_pipeline.run(lq_decoded.rgb, FAST, output_type=sink, progress=lambda done, total: calls.append(done))
    assert calls == [] and sink.missing_rows() == target[1]
    with pytest.raises(imaging.ImageError) as err:  # the chain says so in the imaging layer's terms
        upscale_encode(tiny_pipeline, lq_decoded, FAST, imaging.EncodeOptions("PNG"), expected=(1, 1))
    assert err.value.code == "model_output"
