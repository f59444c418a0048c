"""CCSR-v2 behaviour beyond the golden cases: where the reference crashes, half precision, parameter errors."""

from __future__ import annotations

import numpy as np
import pytest
import torch
from PIL import Image
from tests.v2.conftest import V2_FIXTURES, V2_MODEL, case_dir

from ccsr.params import ParamError, UpscaleParams
from ccsr.pipeline_v2 import CCSRv2Pipeline
from ccsr.sampling.ccsr_v2 import v2_schedule

SMALL = dict(scale=4, process_size=128, seed=233)


@pytest.fixture(scope="module")
def lq() -> Image.Image:
    return Image.open(V2_FIXTURES / "inputs" / "lq_32x32.png").convert("RGB")


def run(pipe, lq, **changes):  # type: ignore[no-untyped-def]
    steps = []
    out = pipe.run(lq, pipe.params("two-step", **{**SMALL, **changes}), on_step=steps.append)
    return out, steps


def test_t_min_rounding_to_no_step_cuts_nothing(v2_pipeline, lq):
    """round(6 * 0.05) == 0 crashes the reference; here no step is cut off and the result is the last x0."""
    full, full_steps = run(v2_pipeline, lq, t_min=0.0)
    cut, cut_steps = run(v2_pipeline, lq, t_min=0.05)
    assert cut.evaluations == full.evaluations == 5
    assert [s.timestep for s in cut_steps] == [s.timestep for s in full_steps]
    assert torch.equal(cut_steps[-1].x0, full_steps[-1].x0)
    assert v2_schedule(6, 0.6667, 0.05).x0_result  # the last x0, not x_prev (at t = 1 they decode alike)


@pytest.mark.parametrize("steps,t_max,t_min", [(1, 0.6666, 0.5), (2, 0.6667, 0.5), (1, 1.0, 0.0)])
def test_empty_loop_returns_the_initial_x0(v2_pipeline, lq, steps, t_max, t_min):
    """The reference raises (UnboundLocalError) or cannot run; the result is the initial step's x0."""
    out, records = run(v2_pipeline, lq, steps=steps, t_max=t_max, t_min=t_min)
    assert out.evaluations == 1 and len(records) == 1
    assert np.isfinite(out.processed).all()


def test_t_max_one_starts_the_loop_from_x_start(v2_pipeline, lq):
    out, records = run(v2_pipeline, lq, steps=6, t_max=1.0, t_min=0.5)
    assert [r.timestep for r in records] == [831, 665, 499]
    assert out.evaluations == 3


def test_cfg_below_one_is_not_guidance(v2_pipeline, lq):
    """The reference guides only when cfg_scale > 1: 0.5 runs batch 1 on the positive prompt, like 1.0."""
    half, _ = run(v2_pipeline, lq, cfg_scale=0.5)
    one, _ = run(v2_pipeline, lq, cfg_scale=1.0)
    assert np.array_equal(half.processed, one.processed)


@pytest.mark.parametrize("dtype,min_psnr,max_abs", [("float16", 60.0, 0.01), ("bfloat16", 40.0, 0.06)])
def test_half_precision_runs_on_the_cpu(lq, dtype, min_psnr, max_abs):
    """Measured against case b (fp32 reference): fp16 (VAE in fp32) 68 dB, max 0.0022; bf16 47 dB, max 0.026."""
    pipe = CCSRv2Pipeline.from_pretrained(V2_MODEL, device="cpu", dtype=dtype)
    assert next(pipe.model.unet.parameters()).dtype == getattr(torch, dtype)
    out = pipe.run(lq, pipe.params("two-step", **SMALL))
    ref = np.load(case_dir("case_b_twostep_adain") / "output_float.npy")
    assert np.isfinite(out.processed).all()
    mse = float(np.mean((out.processed.astype(np.float64) - ref) ** 2))
    assert 10 * np.log10(1 / mse) >= min_psnr
    assert np.abs(out.processed - ref).max() <= max_abs


@pytest.mark.parametrize("field,changes", [
    ("scale", {"scale": 2.5}), ("tile_diffusion", {"tile_diffusion": "mix"}), ("size_mode", {"size_mode": "pad"}),
    ("start_point", {"start_point": "middle"}), ("start_steps", {"start_steps": 1000}),
    ("process_size", {"process_size": 0}),
])
def test_parameter_errors_name_the_field(v2_pipeline, lq, field, changes):
    with pytest.raises(ParamError) as e:
        v2_pipeline.run(lq, UpscaleParams(**{**SMALL, **changes}))
    assert e.value.field == field


def test_presets_are_the_reference_scripts(v2_pipeline):
    one, two = v2_pipeline.params("one-step"), v2_pipeline.params("two-step")
    assert (one.steps, one.t_max, one.t_min, one.cfg_scale) == (1, 0.6666, 0.0, 1.0)
    assert (two.steps, two.t_max, two.t_min, two.cfg_scale) == (6, 0.6667, 0.5, 4.5)
    assert one.prompt == "clean, high-resolution, 8k" and two.negative_prompt.startswith("blurry, dotted")
    with pytest.raises(ParamError, match="preset"):
        v2_pipeline.params("ten-step")
