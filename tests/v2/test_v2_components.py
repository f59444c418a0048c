"""CCSR-v2 networks and helpers against the reference's per-component outputs (components/, float32 CPU)."""

from __future__ import annotations

import numpy as np
import pytest
import torch
from PIL import Image
from tests.v2.conftest import COMPONENTS, V2_MODEL, component, relative_error

from ccsr.colorfix import color_fix
from ccsr.model.v2 import load_v2
from ccsr.planning import VAE_TILE_PAD
from ccsr.sampling.ccsr_v2 import ddpm_step, v2_schedule
from ccsr.vae import lean, tiled_decode

TOL = 1e-5


@pytest.fixture(scope="module")
def model():
    return load_v2(V2_MODEL)


def t(name: str) -> torch.Tensor:
    return torch.from_numpy(component(name))


def test_text_tokens_and_hidden_states(model, manifest):
    tokens, hidden = component("text_tokens.npy"), component("text_hidden.npy")
    for i, prompt in enumerate(manifest["text_prompts"]):
        ids = model.text.tokenizer(prompt, padding="max_length", max_length=77, truncation=True).input_ids
        assert ids == tokens[i].tolist(), prompt
        assert relative_error(model.encode_prompt(prompt), hidden[i : i + 1]) < TOL, prompt


@torch.no_grad()
def test_vae_encoder_posterior(model):
    u8 = np.asarray(Image.open(COMPONENTS / "vae_in_image_96x64.png").convert("RGB"))
    x = torch.from_numpy(u8.astype(np.float32) / np.float32(255.0)).permute(2, 0, 1)[None] * 2 - 1
    moments = model.vae.quant_conv(lean.encode(model.vae.encoder, x))
    assert relative_error(moments, component("vae_enc_moments.npy")) < TOL
    mean, logvar = moments.chunk(2, dim=1)
    std = torch.exp(0.5 * logvar.clamp(-30, 20))
    assert relative_error(std, component("vae_enc_std.npy")) < TOL
    z = (mean + std * t("vae_enc_noise.npy")) * model.scale_factor
    assert relative_error(z, component("vae_enc_z_scaled.npy")) < TOL


@torch.no_grad()
def test_controlnet_and_unet(model):
    x, ts, ctx, cond = t("net_in_x_t.npy"), t("net_in_timesteps.npy"), t("net_in_context.npy"), t("net_in_cond_z.npy")
    down, mid = model.controlnet(x, ts, encoder_hidden_states=ctx, controlnet_cond=cond, return_dict=False)
    residuals = [*down, mid]
    assert len(residuals) == 13
    for i, r in enumerate(residuals):
        assert relative_error(r, component(f"controlnet_out_{i:02d}.npy")) < TOL, i
    with_control = model.unet(x, ts, encoder_hidden_states=ctx, down_block_additional_residuals=down,
                              mid_block_additional_residual=mid).sample
    assert relative_error(with_control, component("unet_out_with_control.npy")) < TOL
    plain = model.unet(x, ts, encoder_hidden_states=ctx).sample
    assert relative_error(plain, component("unet_out_no_control.npy")) < TOL


@torch.no_grad()
def test_vae_decoder_whole_and_tiled(model, manifest):
    z = t("vae_dec_in_z_scaled.npy") / model.scale_factor
    assert relative_error(lean.vae_decode(model.vae, z), component("vae_dec_out.npy")) < TOL
    tile = manifest["tiled_vae_decoder"]["decoder_tile_size"]
    z = t("tiledvae_dec_in_z_scaled.npy") / model.scale_factor
    out = tiled_decode(model.vae, z, tile, VAE_TILE_PAD)
    assert relative_error(out, component("tiledvae_dec_out.npy")) < TOL


@pytest.mark.parametrize("kind", ["adain", "wavelet"])
def test_colour_fix_on_uint8_truncates(kind):
    def unit(a: np.ndarray) -> torch.Tensor:
        return torch.from_numpy(a.astype(np.float32) / np.float32(255.0)).permute(2, 0, 1)[None]

    out = color_fix(unit(component("colorfix_content_uint8.npy")), unit(component("colorfix_style_uint8.npy")), kind)
    got = out.clamp(0, 1).mul(255).byte()[0].permute(1, 2, 0).numpy()
    assert np.array_equal(got, component(f"colorfix_{kind}_out_uint8.npy"))


def test_ddpm_alphas_cumprod(model):
    assert torch.equal(model.alphas_cumprod, t("ddpm_alphas_cumprod.npy"))


def test_schedules_follow_the_reference(manifest):
    """Every setting the reference runs gives its timesteps, t_tao, loop and result; its crashes get a meaning."""
    for s in manifest["ddpm_schedules"]:
        n, t_max, t_min = s["num_inference_steps"], s["t_max"], s["t_min"]
        sched = v2_schedule(n, t_max, t_min)
        assert list(sched.timesteps) == s["timesteps"]
        assert sched.tao == s["t_tao"]
        assert sched.initial == s["initial_eval"]
        if s["result"].startswith("UnboundLocalError"):
            # empty loop: x0 of the initial step; round(N t_min) == 0: nothing is cut off
            cut_nothing = round(n * t_min) == 0
            assert list(sched.loop) == (s["timesteps"][-round(n * t_max):] if cut_nothing else [])
            assert sched.evaluations == 1 + len(sched.loop)
            continue
        assert sched.evaluations == s["model_evals"]
        if n > 1:
            assert list(sched.loop) == s["loop_timesteps"]
        assert sched.x0_result == (s["result"] != "x_prev of the last loop step")


def test_ddpm_step_coefficients(manifest):
    """x_prev of a step with eps = 0 and unit noise exposes both mean coefficients and the variance."""
    ac = torch.from_numpy(component("ddpm_alphas_cumprod.npy"))
    for s in manifest["ddpm_schedules"]:
        for c in s["loop_step_coefficients_float32"]:
            x = torch.ones(1)
            _, mean, _ = ddpm_step(ac, x, c["t"], c["prev_t"], torch.zeros(1), lambda: torch.zeros(1))
            coef = (c["coef_x0"] / ac[c["t"]].item() ** 0.5) + c["coef_xt"]
            assert abs(mean.item() - coef) <= 1e-5 * max(1.0, abs(coef))
            _, noisy, _ = ddpm_step(ac, torch.zeros(1), c["t"], c["prev_t"], torch.zeros(1), lambda: torch.ones(1))
            expected = c["sqrt_variance"] if c["t"] > 0 else 0.0
            assert abs(noisy.item() - expected) <= 1e-5 * expected + 1e-12
