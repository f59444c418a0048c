"""BandedResize: Pillow's Lanczos and bicubic resizes of a float image, bit for bit, fed a band of rows at a time."""

from __future__ import annotations

import numpy as np
import pytest
from PIL import Image

from ccsr.geometry import resize
from ccsr.resample import BandedResize

SIZES = {
    "slightly-up": ((200, 150), (203, 157)),  # the reference's resize back to the target (process floored to 64)
    "down": ((512, 512), (300, 300)),  # short side raised to 512, then back
    "up": ((64, 40), (100, 100)),
    "height-only": ((100, 100), (100, 130)),  # Pillow skips the horizontal pass
    "width-only": ((100, 100), (130, 100)),  # ... and here the vertical one
    "strong-down": ((513, 77), (41, 19)),
    "v2-floor8-back": ((160, 128), (54, 42)),  # CCSR-v2: 27x21 enlarged to 82x64, x2, floored to 160x128, back
    "v2-slightly-up": ((504, 376), (506, 380)),  # CCSR-v2: the processing size floored to multiples of 8, back
}
FILTERS = [Image.Resampling.LANCZOS, Image.Resampling.BICUBIC]


def pushed(resizer: BandedResize, image: np.ndarray, heights: list[int]) -> np.ndarray:
    out, top = [], 0
    for n in heights:
        for first, rows in resizer.push(top, image[top : top + n]):
            assert first == sum(len(o) for o in out)  # handed out top to bottom, each row once
            out.append(rows)
        top += n
    assert top == len(image)
    return np.concatenate(out)


def split(height: int, pattern: list[int]) -> list[int]:
    out, left = [], height
    for n in pattern * height:
        if left == 0:
            break
        out.append(min(n, left))
        left -= out[-1]
    return out


@pytest.mark.parametrize("resample", FILTERS, ids=[f.name.lower() for f in FILTERS])
@pytest.mark.parametrize("pattern", [[10**6], [1], [7, 30, 1, 100]], ids=["whole", "single-rows", "uneven"])
@pytest.mark.parametrize(("src", "dst"), SIZES.values(), ids=SIZES.keys())
def test_equal_to_pillow_for_any_bands(src, dst, pattern, resample):
    image = np.random.default_rng(sum(src)).uniform(0, 1, (src[1], src[0], 3)).astype(np.float32)
    expected = resize(image, dst, resample)
    got = pushed(BandedResize(src, dst, resample), image, split(src[1], pattern))
    assert got.dtype == np.float32 and got.shape == expected.shape
    assert np.array_equal(got, expected)


@pytest.mark.parametrize("resample", FILTERS, ids=[f.name.lower() for f in FILTERS])
def test_rows_are_held_only_under_the_kernel(resample):
    src, dst = (64, 4096), (64, 4100)
    resizer = BandedResize(src, dst, resample)
    image = np.zeros((src[1], src[0], 3), np.float32)
    held = 0
    for top in range(0, src[1], 16):
        for _ in resizer.push(top, image[top : top + 16]):
            pass
        held = max(held, len(resizer.buffer))
    assert resizer.done == dst[1] and held < 100  # never the whole image


def test_rows_out_of_order_are_refused():
    resizer = BandedResize((10, 10), (12, 12))
    with pytest.raises(ValueError, match="in order"):
        list(resizer.push(3, np.zeros((2, 10, 3), np.float32)))


def test_filters_differ_and_others_are_refused():
    """The two filters are not the same arithmetic (a test of one would not pass for the other)."""
    image = np.random.default_rng(0).uniform(0, 1, (40, 30, 3)).astype(np.float32)
    lanczos, bicubic = (pushed(BandedResize((30, 40), (47, 53), f), image, [40]) for f in FILTERS)
    assert not np.array_equal(lanczos, bicubic)
    with pytest.raises(ValueError, match="BILINEAR"):
        BandedResize((10, 10), (12, 12), Image.Resampling.BILINEAR)
