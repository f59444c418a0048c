"""Pipeline behaviour beyond the golden cases: edge cases, options, progress, cancellation, devices."""

from __future__ import annotations

import math

import numpy as np
import pytest
import torch
from PIL import Image

from ccsr.geometry import plan_geometry
from ccsr.params import ParamError, UpscaleParams
from ccsr.pipeline import Cancelled

# Small and fast: pad mode processes at the target size (no 512 minimum), 3 network evaluations.
FAST = UpscaleParams(scale=2, steps=6, seed=7, size_mode="pad")


@pytest.fixture(scope="module")
def lq(fixtures) -> Image.Image:
    return Image.open(fixtures / "inputs" / "lq_48x40.png").convert("RGB")


def test_same_seed_same_image_other_seed_differs(tiny_pipeline, lq):
    a = tiny_pipeline.run(lq, FAST)
    b = tiny_pipeline.run(lq, FAST)
    c = tiny_pipeline.run(lq, FAST.replace(seed=8))
    assert np.array_equal(a.processed, b.processed)
    assert not np.allclose(a.processed, c.processed, atol=1e-3)


def test_random_seed_is_reported_and_reproduces(tiny_pipeline, lq):
    a = tiny_pipeline.run(lq, FAST.replace(seed=None))
    b = tiny_pipeline.run(lq, FAST.replace(seed=a.seed))
    assert np.array_equal(a.processed, b.processed)


@pytest.mark.parametrize(("size", "scale"), [((1, 1), 2), ((7, 13), 3), ((48, 40), 1.5), ((33, 17), 2.5)])
def test_output_size_is_exactly_ceil_scale(tiny_pipeline, size, scale):
    img = Image.fromarray(np.random.default_rng(0).integers(0, 256, (size[1], size[0], 3), dtype=np.uint8))
    out = tiny_pipeline.run(img, FAST.replace(scale=scale))
    want = (math.ceil(size[0] * scale), math.ceil(size[1] * scale))
    assert out.image.size == want
    assert out.final.shape == (want[1], want[0], 3)


def test_reference_geometry_rules():
    # inference_ccsr.py floors to 64; inference_ccsr_tile.py always adds one block of 64 (model.md 7.1).
    assert plan_geometry((48, 40), 2).process == (576, 512)
    assert plan_geometry((48, 40), 2, add_block=True).process == (640, 576)
    assert plan_geometry((64, 64), 4, add_block=True, min_side=128).process == (320, 320)
    assert plan_geometry((48, 40), 2, mode="pad").process == (128, 128)


def test_progress_counts_tiles_times_steps(tiny_pipeline, lq):
    seen = []
    p = FAST.replace(scale=4, tile_diffusion="gaussian", tile_diffusion_size=128, tile_diffusion_stride=64)
    out = tiny_pipeline.run(lq, p, progress=lambda d, t: seen.append((d, t)))
    total = tiny_pipeline.plan(lq.size, p).evaluations
    assert total == out.evaluations > 3
    assert seen == [(i, total) for i in range(1, total + 1)]


def test_cancel_between_evaluations(tiny_pipeline, lq):
    calls = []

    def should_cancel() -> bool:
        calls.append(1)
        return len(calls) > 2

    with pytest.raises(Cancelled):
        tiny_pipeline.run(lq, FAST, should_cancel=should_cancel)
    assert len(calls) == 3


def test_one_step_when_t_min_rounds_to_zero(tiny_pipeline, lq):
    """The reference crashes here (untiled); we return the x0 predicted at T."""
    out = tiny_pipeline.run(lq, FAST.replace(t_min=0.01))
    assert out.evaluations == 1 and np.isfinite(out.processed).all()


def test_tile_larger_than_image_is_clamped(tiny_pipeline, lq):
    p = FAST.replace(tile_diffusion="mix", tile_diffusion_size=2048, tile_diffusion_stride=1024, size_mode="pad")
    out = tiny_pipeline.run(lq, p)
    assert out.image.size == (96, 80) and out.evaluations == 3


def test_controlnet_weight_and_cfg_change_the_result(tiny_pipeline, lq):
    base = tiny_pipeline.run(lq, FAST).processed
    weak = tiny_pipeline.run(lq, FAST.replace(controlnet_weight=0.5)).processed
    cfg = tiny_pipeline.run(lq, FAST.replace(prompt="a photo of a cat", negative_prompt="blurry",
                                             cfg_scale=4.0)).processed
    assert not np.allclose(base, weak, atol=1e-4)
    assert not np.allclose(base, cfg, atol=1e-4)


@torch.no_grad()
def test_cfg_is_uncond_plus_scaled_difference(tiny_pipeline, lq):
    """One CFG evaluation equals eps_u + s (eps_c - eps_u) from two separate single-context evaluations."""
    from ccsr.sampling.denoiser import CCSRDenoiser

    m = tiny_pipeline.model
    cond_img = torch.rand(1, 3, 128, 128, generator=torch.Generator().manual_seed(1))
    x = torch.randn(1, 4, 16, 16, generator=torch.Generator().manual_seed(2))
    c, u = m.text.encode("a photo of a cat"), m.text.encode("")
    args = (m.unet, m.controlnet, m.cond_encoder, lambda window: cond_img)
    guided = CCSRDenoiser(*args, c, uncond_context=u, cfg_scale=3.0)(x, 500, None)
    eps_c = CCSRDenoiser(*args, c)(x, 500, None)
    eps_u = CCSRDenoiser(*args, u)(x, 500, None)
    assert torch.allclose(guided, eps_u + 3.0 * (eps_c - eps_u), atol=1e-5)


def test_float_input_for_high_bit_depth(tiny_pipeline, lq):
    arr = np.asarray(lq).astype(np.float32) / 255.0
    out = tiny_pipeline.run(arr, FAST)
    ref = tiny_pipeline.run(lq, FAST)
    assert out.final.shape == ref.final.shape
    # Same picture through float resizes instead of 8-bit ones: close, not identical.
    assert np.abs(out.final - ref.final).mean() < 0.02


def test_pad_mode_pads_to_the_size_multiple_and_crops_back(tiny_pipeline, lq):
    out = tiny_pipeline.run(lq, FAST)
    assert out.geometry.pad == (128 - 96, 128 - 80)
    assert out.processed.shape == (128, 128, 3)
    assert np.array_equal(out.final, out.processed[:80, :96])  # cropped, never resampled
    assert out.image.size == (96, 80)


@pytest.mark.parametrize(
    ("field", "value"),
    [("t_min", 0.9), ("steps", 0), ("scale", 0), ("color_fix", "x"), ("tile_diffusion", "y"),
     ("tile_diffusion_size", 30), ("cfg_scale", -1.0), ("controlnet_weight", 3.0)],
)
def test_invalid_parameters_name_the_field(field, value):
    with pytest.raises(ParamError) as err:
        UpscaleParams(**{field: value}).validate()
    assert err.value.field == field


def test_descriptor(tiny_pipeline):
    d = tiny_pipeline.descriptor
    assert (d.latent_factor, d.size_multiple, d.latent_channels) == (8, 64, 4)
    assert d.supports_tiling and "float32" in d.dtypes


def test_compiled_networks_give_the_same_image(fixtures, lq):
    """``compile=True`` (torch.compile of the UNet and ControlNet) changes speed, not the result."""
    from ccsr.pipeline import CCSRPipeline

    p = FAST.replace(steps=3)
    weights, config = fixtures / "model.safetensors", fixtures / "model.yaml"
    eager = CCSRPipeline.from_single_file(weights, config=config, device="cpu")
    compiled = CCSRPipeline.from_single_file(weights, config=config, device="cpu", compile=True)
    assert type(compiled.model.unet).__name__ == "OptimizedModule"
    a, b = eager.run(lq, p), compiled.run(lq, p)
    assert np.abs(a.processed - b.processed).max() < 1e-4
