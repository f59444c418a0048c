"""Half precision end to end: every path runs in float16 and bfloat16 on the CPU, finite and close to float32.

The networks run in the dtypes the model describes (``ModelDescriptor.network_dtypes``); everything between them is
float32. On CPUs without AVX-512 BF16 / AMX, torch's half-precision convolutions take a slow reference kernel (the
results are right, ~100x slower than float32), so these cases are kept small.
"""

from __future__ import annotations

import subprocess
import sys

import numpy as np
import pytest
import torch
from PIL import Image
from tests.conftest import FIXTURES, REPO, TINY_CONFIG, TINY_WEIGHTS

from ccsr.model import load_model
from ccsr.params import UpscaleParams
from ccsr.pipeline import CCSRPipeline

BASE = UpscaleParams(steps=4, seed=233, color_fix="adain", size_mode="pad", tile_vae=False)
TILES = {"tile_diffusion_size": 128, "tile_diffusion_stride": 64}
CASES = {  # input 48x40
    "untiled": BASE.replace(scale=1.25, tile_diffusion="none"),  # 64x64 processed
    "prompt_cfg": BASE.replace(scale=1.25, tile_diffusion="none", prompt="a photo of a cat", negative_prompt="blurry",
                               cfg_scale=4.0),
    "mix": BASE.replace(scale=3, tile_diffusion="mix", **TILES),  # 192x128: two windows
    "gaussian": BASE.replace(scale=3, tile_diffusion="gaussian", **TILES),
    "tiled_vae": BASE.replace(scale=2.5, tile_diffusion="none", tile_vae=True, tile_vae_decoder_size=8,
                              tile_vae_encoder_size=64),  # 128x128: 2x2 decoder tiles, GroupNorm synchronised
}
# Largest and mean absolute difference to float32 in [0, 1] pixels, measured on these cases (torch 2.13, x86 CPU):
#   float16:  max 0.0013-0.0016, mean 0.00019-0.00021 (prompt + CFG 4: max 0.0050, mean 0.00064)
#   bfloat16: max 0.016-0.018,   mean 0.0021-0.0023   (prompt + CFG 4: max 0.040, mean 0.0054)
# CFG 4 multiplies the networks' rounding error by 7 (4 x cond - 3 x uncond). The tolerances leave about 3x room.
TOLERANCE = {"float16": (0.005, 0.0007), "bfloat16": (0.05, 0.007)}
CFG_FACTOR = 3.0


@pytest.fixture(scope="module")
def lq() -> Image.Image:
    return Image.open(FIXTURES / "inputs" / "lq_48x40.png").convert("RGB")


def pipeline(dtype: str) -> CCSRPipeline:
    return CCSRPipeline.from_single_file(TINY_WEIGHTS, config=TINY_CONFIG, device="cpu", dtype=dtype)


@pytest.fixture(scope="module")
def float32_results(lq) -> dict[str, np.ndarray]:
    pipe = pipeline("float32")
    return {name: pipe.run(lq, params).processed for name, params in CASES.items()}


@pytest.mark.parametrize("dtype", ["float16", "bfloat16"])
def test_half_precision_upscale_is_finite_and_close_to_float32(dtype, lq, float32_results):
    pipe = pipeline(dtype)
    for name, params in CASES.items():
        out = pipe.run(lq, params)
        assert out.plan is not None
        assert out.plan.decode == ("tiled" if params.tile_vae else "whole"), name
        assert len(out.plan.tiles) == (2 if name in ("mix", "gaussian") else 0), name
        assert np.isfinite(out.processed).all(), name
        err = np.abs(out.processed - float32_results[name])
        tol_max, tol_mean = TOLERANCE[dtype]
        factor = CFG_FACTOR if params.cfg_scale != 1.0 else 1.0
        assert err.max() <= tol_max * factor and err.mean() <= tol_mean * factor, (name, err.max(), err.mean())
        assert err.max() > 0, name  # it really ran in half precision


@pytest.mark.parametrize("dtype", [torch.float32, torch.float16, torch.bfloat16])
def test_networks_run_in_the_dtypes_the_model_describes(dtype, lq):
    pipe = CCSRPipeline(load_model(TINY_WEIGHTS, TINY_CONFIG), device="cpu", dtype=dtype)
    wanted = pipe.descriptor.network_dtypes(dtype)
    for name, module in pipe.model.networks().items():
        assert next(module.parameters()).dtype == wanted[name], name
    pipe.run(lq, CASES["untiled"].replace(steps=1, prompt="a cat", cfg_scale=1.0))  # builds the text encoder
    assert next(pipe.model.text._encoder_module().parameters()).dtype == wanted["text_encoder"]
    # float16 keeps the VAE and the condition encoder (the SD VAE overflows float16) in float32
    assert {n for n, d in wanted.items() if d == torch.float32} == (
        {"vae", "cond_encoder"} if dtype == torch.float16 else set() if dtype == torch.bfloat16 else set(wanted))


def test_a_dtype_the_model_does_not_support_is_refused():
    with pytest.raises(ValueError, match=r"does not run in torch\.float64"):
        CCSRPipeline(load_model(TINY_WEIGHTS, TINY_CONFIG), device="cpu", dtype=torch.float64)


def cli_upscale(tmp_path, dtype: str) -> np.ndarray:
    out, flt = tmp_path / f"{dtype}.png", tmp_path / f"{dtype}.npy"
    r = subprocess.run(
        [sys.executable, "-m", "ccsr.cli", "upscale", str(FIXTURES / "inputs" / "lq_48x40.png"), "-o", str(out),
         "--weights", str(TINY_WEIGHTS), "--config", str(TINY_CONFIG), "--device", "cpu", "--dtype", dtype,
         "--scale", "1.25", "--size-mode", "pad", "--steps", "4", "--seed", "7", "--save-float", str(flt), "-q"],
        capture_output=True, text=True, timeout=600,
        env={"HF_HUB_OFFLINE": "1", "PATH": "/usr/bin:/bin", "PYTHONPATH": str(REPO / "src")},
    )
    assert r.returncode == 0, r.stderr
    assert Image.open(out).size == (60, 50)
    return np.load(flt)


def test_cli_upscales_in_float16_and_bfloat16(tmp_path):
    reference = cli_upscale(tmp_path, "float32")
    for dtype in ("float16", "bfloat16"):
        got = cli_upscale(tmp_path, dtype)
        assert np.isfinite(got).all()
        tol_max, tol_mean = TOLERANCE[dtype]
        err = np.abs(got - reference)
        assert err.max() <= tol_max and err.mean() <= tol_mean, (dtype, err.max(), err.mean())
