"""CCSR-v2 through the shared result machinery (``ccsr.result``): a row sink gets the target's rows band by band,
equal to the ``np`` result; ``pil`` is the reference's 8-bit image and never makes a float image at the target."""

from __future__ import annotations

import numpy as np
import pytest
import torch
from PIL import Image
from tests.v2.conftest import V2_FIXTURES

from ccsr import finishing, resample, result
from ccsr.colorfix import color_fix
from ccsr.geometry import resize
from ccsr.pipeline_v2 import preprocess

ONE_STEP = dict(scale=4, process_size=128, seed=5)
GEOMETRIES = {
    # 61x47 x4: target 244x188, processed at 240x184 (floored to multiples of 8), bicubic up to the target
    "floored-up": ((61, 47), ONE_STEP),
    # 27x21 x2 below 128 // 2: enlarged to 82x64, x2, floored to 160x128, bicubic down to 54x42
    "enlarged-down": ((27, 21), dict(ONE_STEP, scale=2)),
}
BAND_ROWS = 16  # colour-fix bands in these tests (the default is a whole small image)


@pytest.fixture(scope="module")
def photo() -> Image.Image:
    return Image.open(V2_FIXTURES / "inputs" / "lq_64x64.png").convert("RGB")


class Rows:
    """A row sink (``ccsr.result.RowSink``) that records every write."""

    def __init__(self, size: tuple[int, int]):
        self.size = size
        self.pixels = np.full((size[1], size[0], 3), np.nan, np.float32)
        self.writes: list[tuple[int, int]] = []

    def write(self, top: int, rows: np.ndarray) -> None:
        assert rows.dtype == np.float32 and rows.shape[1:] == (self.size[0], 3)
        self.writes.append((top, len(rows)))
        self.pixels[top : top + len(rows)] = rows


def chw(pixels: np.ndarray) -> torch.Tensor:
    x = pixels.astype(np.float32) / np.float32(255.0) if pixels.dtype == np.uint8 else pixels
    return torch.from_numpy(x).permute(2, 0, 1)[None].contiguous()


def reference_png(processed: np.ndarray, lr: np.ndarray, fix: str, target: tuple[int, int]) -> np.ndarray:
    """The reference's ``main()`` on the whole image: round, 8-bit colour fix, truncate, Pillow bicubic."""
    pipeline8 = (processed * np.float32(255)).round().astype(np.uint8)
    fixed = pipeline8 if fix == "none" else (
        color_fix(chw(pipeline8), chw(lr), fix).clamp(0, 1).mul(255).byte()[0].permute(1, 2, 0).numpy())
    return np.asarray(Image.fromarray(fixed).resize(target, Image.Resampling.BICUBIC))


def float_target(processed: np.ndarray, lr: np.ndarray, fix: str, target: tuple[int, int]) -> np.ndarray:
    """The same without the two quantisations, whole image, Pillow's float bicubic."""
    fixed = color_fix(chw(processed), chw(lr), fix).clamp(0, 1)[0].permute(1, 2, 0).numpy()
    return np.clip(resize(np.ascontiguousarray(fixed), target, Image.Resampling.BICUBIC), 0, 1)


@pytest.mark.parametrize("fix", ["adain", "wavelet", "none"])
@pytest.mark.parametrize("geometry", GEOMETRIES, ids=GEOMETRIES.keys())
def test_a_row_sink_gets_bands_equal_to_the_whole_result(v2_pipeline, photo, geometry, fix, monkeypatch):
    size, changes = GEOMETRIES[geometry]
    image = photo.crop((0, 0, *size))
    params = v2_pipeline.params("one-step", color_fix=fix, **changes)
    whole = v2_pipeline.run(image, params)  # "np": every colour-fix band is the whole image here
    g = whole.geometry
    assert g.process != g.target and g.target[1] > BAND_ROWS

    monkeypatch.setattr(finishing, "BAND_PIXELS", BAND_ROWS * g.process[0])
    sink = Rows(g.target)
    streamed = v2_pipeline.run(image, params, output_type=sink)
    assert (streamed.image, streamed.final, streamed.processed) == (None, None, None)
    tops = [t for t, _ in sink.writes]
    assert len(sink.writes) > 1 and max(n for _, n in sink.writes) < g.target[1]  # bands, never the whole
    assert tops[0] == 0 and all(t + n == nxt for (t, n), nxt in zip(sink.writes, [*tops[1:], g.target[1]],
                                                                    strict=True))  # each row once, in order
    assert np.array_equal(sink.pixels, whole.final)

    # both against the reference's whole-image arithmetic, from the same decoder output
    lr = preprocess(image, g)
    assert np.array_equal(whole.final, float_target(whole.processed, lr, fix, g.target))
    lean = v2_pipeline.run(image, params, output_type="pil")
    assert np.array_equal(np.asarray(lean.image), reference_png(whole.processed, lr, fix, g.target))
    assert np.array_equal(np.asarray(whole.image), np.asarray(lean.image))
    # The float rows are not compared with the 8-bit image: besides the two quantisations, Pillow's 8-bit
    # bicubic clips between its two passes, which moves overshooting edges by up to ~15 levels on the same input.


def test_pil_never_makes_a_float_image_at_the_target(v2_pipeline, photo, monkeypatch):
    """Structurally: with "pil", no float result, row sink, banded float resize or float colour-fix stage is made;
    the result kept is 8-bit pixels at the processing size, resized once in 8 bits."""

    def refused(*args, **kwargs):  # type: ignore[no-untyped-def]
        raise AssertionError("a float path ran for output_type='pil'")

    for cls in (result.FloatResult, result.SinkResult, resample.BandedResize):
        monkeypatch.setattr(cls, "__init__", refused)
    monkeypatch.setattr(finishing.ColourFixAfterRounding, "floats", refused)
    kept: list[result.ImageResult] = []
    init = result.ImageResult.__init__

    def spy(self, *args):  # type: ignore[no-untyped-def]
        init(self, *args)
        kept.append(self)
        assert self.pixels.dtype == np.uint8

    monkeypatch.setattr(result.ImageResult, "__init__", spy)
    params = v2_pipeline.params("one-step", **ONE_STEP)
    out = v2_pipeline.run(photo.crop((0, 0, 61, 47)), params, output_type="pil")
    assert len(kept) == 1 and out.final is None and out.processed is None
    assert out.image.size == out.geometry.target
