"""Each network and helper against the reference's component fixtures (CPU fp32)."""

from __future__ import annotations

import json

import numpy as np
import pytest
import torch
from PIL import Image

from ccsr.colorfix import adain, wavelet
from ccsr.model.text import empty_tokens, load_tokenizer, tokenize
from ccsr.sampling.schedule import SpacedSchedule, space_timesteps, truncated_plan

REL = 1e-4  # max |a - b| / max |b| (the bar for latents and components)


def load(fixtures, name: str) -> torch.Tensor:
    return torch.from_numpy(np.load(fixtures / "components" / name))


def rel_err(a: torch.Tensor, b: torch.Tensor) -> float:
    return float((a - b).abs().max() / b.abs().max())


@pytest.fixture(scope="module")
def model(tiny_pipeline):
    return tiny_pipeline.model


@pytest.mark.parametrize("which", ["empty", "prompt"])
def test_text_encoder(model, fixtures, which):
    tokens = load(fixtures, f"text_tokens_{which}.npy")
    ctx = model.text._encoder_module()(input_ids=tokens).last_hidden_state
    assert rel_err(ctx, load(fixtures, f"text_context_{which}.npy")) < REL


def test_empty_prompt_is_cached_constant(model, fixtures):
    assert torch.equal(empty_tokens(), load(fixtures, "text_tokens_empty.npy"))
    assert rel_err(model.text.encode(""), load(fixtures, "text_context_empty.npy")) < REL


def test_tokenizer_matches_open_clip(fixtures):
    tok = load_tokenizer()
    assert torch.equal(tokenize(tok, "a photo of a cat, high quality"), load(fixtures, "text_tokens_prompt.npy"))
    long = tokenize(tok, "cat " * 200)
    assert long.shape == (1, 77) and long[0, 0] == 49406 and long[0, -1] == 49407


def test_prompt_encode_matches_fixture(model, fixtures):
    ctx = model.text.encode("a photo of a cat, high quality")
    assert rel_err(ctx, load(fixtures, "text_context_prompt.npy")) < REL


@torch.no_grad()
def test_controlnet_and_unet(model, fixtures):
    x, hint = load(fixtures, "unet_in_x_t.npy"), load(fixtures, "unet_in_hint.npy")
    t, ctx = load(fixtures, "unet_in_timesteps.npy"), load(fixtures, "unet_in_context.npy")
    down, mid = model.controlnet(x, t, encoder_hidden_states=ctx, controlnet_cond=hint, return_dict=False)
    residuals = [*down, mid]
    assert len(residuals) == 13
    for i, r in enumerate(residuals):
        assert rel_err(r, load(fixtures, f"controlnet_out_{i:02d}.npy")) < REL, f"residual {i}"
    eps = model.unet(x, t, encoder_hidden_states=ctx, down_block_additional_residuals=residuals[:12],
                     mid_block_additional_residual=residuals[12]).sample
    assert rel_err(eps, load(fixtures, "unet_out_with_control.npy")) < REL
    plain = model.unet(x, t, encoder_hidden_states=ctx).sample
    assert rel_err(plain, load(fixtures, "unet_out_no_control.npy")) < REL


def _vae_input(fixtures) -> torch.Tensor:
    arr = np.asarray(Image.open(fixtures / "components" / "vae_in_image_80x64.png").convert("RGB"))
    return torch.from_numpy((arr / 255.0).astype(np.float32)).permute(2, 0, 1)[None]


@torch.no_grad()
def test_condition_encoder(model, fixtures):
    assert rel_err(model.cond_encoder(_vae_input(fixtures)), load(fixtures, "cond_encoder_latent.npy")) < REL


@torch.no_grad()
def test_vae(fixtures):
    from tests.conftest import TINY_CONFIG, TINY_WEIGHTS

    from ccsr.model import load_model

    vae = load_model(TINY_WEIGHTS, TINY_CONFIG).vae  # whole: a pipeline frees the encoder it never runs
    x = _vae_input(fixtures)
    moments = vae.quant_conv(vae.encoder(x * 2 - 1))
    assert rel_err(moments, load(fixtures, "vae_encoder_moments.npy")) < REL
    z = load(fixtures, "vae_decoder_in_z_scaled.npy")
    out = vae.decode(z * (1.0 / 0.18215)).sample
    assert rel_err(out, load(fixtures, "vae_decoder_out.npy")) < REL


@torch.no_grad()
def test_pipeline_decodes_with_the_lean_pass_and_without_the_vae_encoder(model, fixtures):
    from ccsr.vae import lean

    assert model.vae.encoder is None and model.vae.quant_conv is None
    z = load(fixtures, "vae_decoder_in_z_scaled.npy")
    out = lean.vae_decode(model.vae, z * (1.0 / 0.18215))
    assert rel_err(out, load(fixtures, "vae_decoder_out.npy")) < REL


def test_color_fix(fixtures):
    content, style = load(fixtures, "colorfix_content.npy"), load(fixtures, "colorfix_style.npy")
    assert rel_err(adain(content, style), load(fixtures, "colorfix_adain_out.npy")) < 1e-5
    assert rel_err(wavelet(content, style), load(fixtures, "colorfix_wavelet_out.npy")) < 1e-5


def test_wavelet_keeps_only_style_colour_for_flat_content():
    """A flat content image has no high frequencies: the result is the style's low-pass alone."""
    style = torch.rand(1, 3, 20, 24, generator=torch.Generator().manual_seed(0))
    flat = wavelet(torch.full_like(style, 0.3), style)
    assert torch.allclose(flat, wavelet(torch.zeros_like(style), style), atol=1e-6)
    assert not torch.allclose(flat, style, atol=1e-3)


@pytest.mark.parametrize("steps", ["6", "45"])
def test_schedule_arrays(fixtures, steps):
    ref = json.loads((fixtures / "components" / "sampler_schedules.json").read_text())[steps]
    s = SpacedSchedule.make(int(steps))
    assert s.timesteps.tolist() == ref["used_timesteps_sorted"]
    compared = [name for name in ref["arrays_float64"] if hasattr(s, name)]
    # Everything the sampler reads is compared; the fixture's extras (betas, log-variances) are not used by it.
    assert {"alphas_cumprod", "sqrt_recip_alphas_cumprod", "sqrt_recipm1_alphas_cumprod", "posterior_variance",
            "posterior_mean_coef1", "posterior_mean_coef2", "sqrt_alphas_cumprod",
            "sqrt_one_minus_alphas_cumprod"} <= set(compared)
    for name in compared:
        np.testing.assert_allclose(getattr(s, name), ref["arrays_float64"][name], rtol=1e-12, atol=1e-15, err_msg=name)
    plan = truncated_plan(s, 0.6667, 0.3333)
    assert (plan.first_timestep, plan.first_index, plan.tao_index) == (
        ref["first_eval"]["timestep"], ref["first_eval"]["index"], ref["first_eval"]["tao_index"])
    assert [list(x) for x in plan.loop] == [[e["timestep"], e["index"]] for e in ref["loop"]]


def test_space_timesteps_float_accumulation():
    # Repeated float addition gives 499 where round(22 * 999 / 44) would give 500 (model.md 3.1).
    ts = space_timesteps(1000, 45)
    assert 499 in ts and 500 not in ts and len(ts) == 45


@pytest.mark.parametrize(
    ("steps", "tao_t", "loop_ts", "nfe"),
    [
        (45, 658, [658, 636, 613, 590, 568, 545, 522, 499, 477, 454, 431, 409, 386, 363, 341], 16),
        (50, 673, [652, 632, 612, 591, 571, 550, 530, 510, 489, 469, 449, 428, 408, 387, 367, 347], 17),
        (20, 684, [631, 578, 526, 473, 421, 368], 7),
        (10, 666, [666, 555, 444, 333], 5),
    ],
)
def test_worked_schedules(steps, tao_t, loop_ts, nfe):
    """model.md 3.2's table, including S=50's index mismatch (re-noised to 673, first loop step at 652)."""
    s = SpacedSchedule.make(steps)
    plan = truncated_plan(s, 0.6667, 0.3333)
    assert int(s.timesteps[plan.tao_index]) == tao_t
    assert [t for t, _ in plan.loop] == loop_ts
    assert plan.evaluations == nfe


def test_one_step_plan_when_t_min_rounds_to_zero():
    plan = truncated_plan(SpacedSchedule.make(10), 0.6667, 0.01)
    assert plan.one_step and plan.evaluations == 1
