"""CCSR-v2's finishing (``ccsr.finishing.ColourFixAfterRounding``) fed in bands equals the reference's whole-image
computation, bit for bit: round to 8 bits, colour fix on the 8-bit images, truncate (``bytes``), or the same colour
fix on the float image (``floats``)."""

from __future__ import annotations

import numpy as np
import pytest
import torch

from ccsr import finishing
from ccsr.colorfix import WAVELET_HALO, color_fix
from ccsr.finishing import ColourFixAfterRounding

FIXES = ["adain", "wavelet", "none"]
H, W = 150, 97  # a few wavelet halos tall


def images(seed: int = 0) -> tuple[np.ndarray, np.ndarray]:
    """(processed float32 HxWx3 in [0, 1], the 8-bit LR image at the processing size), with values on exact
    8-bit midpoints too (where rounding to even matters)."""
    rng = np.random.default_rng(seed)
    processed = rng.uniform(0, 1, (H, W, 3)).astype(np.float32)
    processed[::7] = (rng.integers(0, 255, (len(processed[::7]), W, 3)) + 0.5) / np.float32(255)
    return processed, rng.integers(0, 256, (H, W, 3), dtype=np.uint8)


def chw(pixels: np.ndarray) -> torch.Tensor:
    """As the reference's ``ToTensor``: contiguous [1, 3, H, W], uint8 divided by 255 in float32."""
    x = pixels.astype(np.float32) / np.float32(255.0) if pixels.dtype == np.uint8 else pixels
    return torch.from_numpy(x).permute(2, 0, 1)[None].contiguous()


def reference_bytes(processed: np.ndarray, lr: np.ndarray, fix: str) -> np.ndarray:
    """The reference's ``main()``: round, colour fix on the 8-bit images, clamp and truncate (``ToPILImage``)."""
    pipeline8 = (processed * np.float32(255)).round().astype(np.uint8)
    if fix == "none":
        return pipeline8
    fixed = color_fix(chw(pipeline8), chw(lr), fix).clamp(0, 1)
    return fixed.mul(255).byte()[0].permute(1, 2, 0).numpy()


def reference_floats(processed: np.ndarray, lr: np.ndarray, fix: str) -> np.ndarray:
    return color_fix(chw(processed), chw(lr), fix).clamp(0, 1)[0].permute(1, 2, 0).numpy()


def fed(stage, processed: np.ndarray, heights: list[int]) -> np.ndarray:  # type: ignore[no-untyped-def]
    """Push ``processed`` in blocks of ``heights`` rows, flush, and assemble what comes out (checking the order)."""
    out: list[np.ndarray] = []

    def take(blocks) -> None:  # type: ignore[no-untyped-def]
        for top, rows in blocks:
            assert top == sum(len(o) for o in out)  # top to bottom, each row once
            out.append(rows)

    top = 0
    for n in heights:
        take(stage.push(top, processed[top : top + n]))
        top += n
    take(stage.flush())
    return np.concatenate(out)


PUSHES = {"whole": [H], "uneven": [7, 40, 1, 1, 60, 41]}


@pytest.mark.parametrize("pushes", PUSHES.values(), ids=PUSHES.keys())
@pytest.mark.parametrize("band_rows", [None, 5, 33], ids=["one-band", "bands-5", "bands-33"])
@pytest.mark.parametrize("fix", FIXES)
def test_bands_equal_the_whole_image_fix(fix, band_rows, pushes, monkeypatch):
    if band_rows is not None:
        monkeypatch.setattr(finishing, "BAND_PIXELS", band_rows * W)
    processed, lr = images()
    rule = ColourFixAfterRounding(lr, fix)
    got8 = fed(rule.bytes(), processed, pushes)
    assert got8.dtype == np.uint8 and np.array_equal(got8, reference_bytes(processed, lr, fix))
    got = fed(rule.floats(), processed, pushes)
    assert got.dtype == np.float32 and np.array_equal(got, reference_floats(processed, lr, fix))


def test_wavelet_rows_come_out_once_their_context_is_in(monkeypatch):
    """A wavelet band is handed out as soon as the rows WAVELET_HALO below it have arrived, not at the end."""
    monkeypatch.setattr(finishing, "BAND_PIXELS", 10 * W)
    processed, lr = images(1)
    stage = ColourFixAfterRounding(lr, "wavelet").bytes()
    first = list(stage.push(0, processed[:80]))
    assert sum(len(rows) for _, rows in first) == 80 - WAVELET_HALO
    rest = [*stage.push(80, processed[80:]), *stage.flush()]
    assert sum(len(rows) for _, rows in [*first, *rest]) == H


def test_adain_waits_for_the_whole_image_and_fewer_rows_are_refused():
    processed, lr = images(2)
    stage = ColourFixAfterRounding(lr, "adain").floats()
    assert list(stage.push(0, processed[:100])) == []  # its statistics are the whole image's
    with pytest.raises(ValueError, match="never came"):
        list(stage.flush())
    with pytest.raises(ValueError, match="in order"):
        list(ColourFixAfterRounding(lr, "wavelet").bytes().push(3, processed[3:10]))


def test_the_context_is_needed():
    """Without the halo a band differs from the whole image: the equality above is not a coincidence."""
    processed, lr = images(3)
    whole = reference_floats(processed, lr, "wavelet")
    cut = reference_floats(processed[:80], lr[:80], "wavelet")
    assert np.array_equal(cut[: 80 - WAVELET_HALO], whole[: 80 - WAVELET_HALO])
    assert not np.array_equal(cut[80 - WAVELET_HALO :], whole[80 - WAVELET_HALO : 80])
