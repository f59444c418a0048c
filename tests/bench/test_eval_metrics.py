"""PSNR / SSIM (Y channel, border crop), G-STD and L-STD against hand-computable cases."""

from __future__ import annotations

import math

import numpy as np
import pytest

from ccsr.evaluate import (
    RunningStd,
    crop_border,
    g_std,
    gaussian_window,
    l_std,
    psnr,
    psnr_y,
    rgb_to_y,
    ssim,
    ssim_map,
    ssim_y,
)


def smooth(h: int = 48, w: int = 40, seed: int = 0) -> np.ndarray:
    rng = np.random.default_rng(seed)
    yy, xx = np.mgrid[0:h, 0:w] / max(h, w)
    chans = [
        0.5 + 0.3 * np.sin(2 * np.pi * (rng.uniform(1, 3) * xx + rng.uniform(1, 3) * yy + c))
        for c in range(3)
    ]
    return np.stack(chans, -1)


def test_y_channel_bt601_studio_swing() -> None:
    assert rgb_to_y(np.zeros((1, 1, 3)))[0, 0] == pytest.approx(16 / 255)
    assert rgb_to_y(np.ones((1, 1, 3)))[0, 0] == pytest.approx(235 / 255)
    red = np.zeros((1, 1, 3))
    red[..., 0] = 1
    assert rgb_to_y(red)[0, 0] == pytest.approx((16 + 65.481) / 255)


def test_identical_images() -> None:
    img = smooth()
    assert psnr_y(img, img) == math.inf
    assert ssim_y(img, img) == pytest.approx(1.0, abs=1e-12)


def test_constant_offset_psnr_is_exact() -> None:
    gt = np.full((32, 32, 3), 0.5)
    d = 0.01
    sr = gt + d
    # Y changes by d * (65.481 + 128.553 + 24.966) / 255 = d * 219 / 255 everywhere.
    dy = d * 219 / 255
    assert psnr_y(sr, gt) == pytest.approx(-20 * math.log10(dy), abs=1e-9)


def test_constant_images_ssim_is_luminance_term() -> None:
    a = np.full((30, 30), 100.0)
    b = np.full((30, 30), 110.0)
    c1 = (0.01 * 255) ** 2
    expect = (2 * 100 * 110 + c1) / (100**2 + 110**2 + c1)  # variances and covariance are 0
    assert ssim(a, b) == pytest.approx(expect, rel=1e-12)
    assert ssim_map(a, b).shape == (20, 20)  # 'valid': 30 - 11 + 1


def test_border_is_cropped() -> None:
    gt = smooth()
    sr = gt.copy()
    sr[:4] = 0.0
    sr[:, -4:] = 1.0
    assert psnr_y(sr, gt, crop=4) == math.inf
    assert ssim_y(sr, gt, crop=4) == pytest.approx(1.0)
    assert psnr_y(sr, gt, crop=0) < 30
    assert crop_border(gt, 4).shape == (40, 32, 3)


def test_known_noise_psnr() -> None:
    rng = np.random.default_rng(1)
    gt = rng.uniform(0.2, 0.8, size=(64, 64))
    noise = rng.normal(0, 0.05, size=gt.shape)
    expect = 10 * math.log10(1 / np.mean(noise**2))
    assert psnr(gt + noise, gt) == pytest.approx(expect, rel=1e-12)
    assert expect == pytest.approx(-20 * math.log10(0.05), abs=0.2)  # sigma^2 = MSE in expectation


def _ssim_direct(a: np.ndarray, b: np.ndarray, L: float = 255.0) -> float:
    """SSIM from its definition, window by window (no convolution)."""
    g = gaussian_window()
    w = np.outer(g, g)
    c1, c2 = (0.01 * L) ** 2, (0.03 * L) ** 2
    vals = []
    for i in range(a.shape[0] - 10):
        for j in range(a.shape[1] - 10):
            x, y = a[i : i + 11, j : j + 11], b[i : i + 11, j : j + 11]
            mx, my = (w * x).sum(), (w * y).sum()
            vx, vy = (w * (x - mx) ** 2).sum(), (w * (y - my) ** 2).sum()
            cxy = (w * (x - mx) * (y - my)).sum()
            vals.append((2 * mx * my + c1) * (2 * cxy + c2) / ((mx**2 + my**2 + c1) * (vx + vy + c2)))
    return float(np.mean(vals))


def test_ssim_matches_definition_and_decreases_with_noise() -> None:
    rng = np.random.default_rng(2)
    a = smooth(24, 26)[..., 0] * 255
    b1 = a + rng.normal(0, 5, size=a.shape)
    b2 = a + rng.normal(0, 20, size=a.shape)
    s1, s2 = ssim(b1, a), ssim(b2, a)
    assert s1 == pytest.approx(_ssim_direct(b1, a), rel=1e-10)
    assert s2 == pytest.approx(_ssim_direct(b2, a), rel=1e-10)
    assert 1 > s1 > s2 > 0
    assert ssim(a, b1) == pytest.approx(s1, rel=1e-12)  # symmetric


def test_gaussian_window() -> None:
    g = gaussian_window(11, 1.5)
    assert g.sum() == pytest.approx(1.0)
    assert g.argmax() == 5 and g[0] == pytest.approx(g[-1])


def test_g_std() -> None:
    # image 0: runs 1 and 3 -> population std 1; image 1: 2 and 2 -> 0; mean 0.5
    assert g_std([[1.0, 3.0], [2.0, 2.0]]) == pytest.approx(0.5)
    assert g_std([[5.0]]) == 0.0


def test_l_std() -> None:
    zeros, ones = np.zeros((16, 16, 3)), np.ones((16, 16, 3))
    assert l_std([zeros, ones], crop=4) == pytest.approx(0.5)
    assert l_std([zeros, zeros, zeros]) == 0.0
    rng = np.random.default_rng(4)
    runs = [rng.uniform(size=(12, 12, 3)) for _ in range(5)]
    assert l_std(runs, crop=0) == pytest.approx(np.std(np.stack(runs), axis=0).mean(), rel=1e-12)
    acc = RunningStd()
    with pytest.raises(ValueError):
        acc.local_std()


def test_uint8_inputs() -> None:
    a = (smooth() * 255).astype(np.uint8)
    b = a.copy()
    b[10, 10, 0] ^= 1
    assert psnr_y(a, b) > 60
    with pytest.raises(ValueError, match="size mismatch"):
        psnr_y(a, a[:-2])
