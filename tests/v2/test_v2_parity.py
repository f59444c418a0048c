"""CCSR-v2 end to end against the reference, seeded: every public case through the CLI exactly as its
``case.json`` says, and the sampler's intermediates in the library (``trace.npz``)."""

from __future__ import annotations

import subprocess
import sys

import numpy as np
import pytest
from PIL import Image
from tests.v2.conftest import PUBLIC_CASES, V2_FIXTURES, V2_MODEL, case_dir, case_meta, relative_error

from ccsr.params import UpscaleParams

LATENT_TOL = 1e-5


def psnr(a: np.ndarray, b: np.ndarray) -> float:
    mse = float(np.mean((np.asarray(a, np.float64) - np.asarray(b, np.float64)) ** 2))
    return float("inf") if mse == 0 else 10 * np.log10(1.0 / mse)


def test_all_public_cases_are_here():
    assert [c[:6] for c in PUBLIC_CASES] == [f"case_{c}" for c in "abcdefgh"]


@pytest.mark.parametrize("case", PUBLIC_CASES)
def test_cli_reproduces_case(case, tmp_path):
    meta = case_meta(case)
    out, flt = tmp_path / "out.png", tmp_path / "out.npy"
    cmd = [sys.executable, "-m", "ccsr.cli", "upscale", str(V2_FIXTURES / meta["args"]["image_path"]), "-o", str(out),
           "--save-float", str(flt), "--weights", str(V2_MODEL), "--device", "cpu", "--dtype", "float32",
           *meta["ccsr_cli"]]
    r = subprocess.run(cmd, capture_output=True, text=True, timeout=600,
                       env={"HF_HUB_OFFLINE": "1", "PATH": "/usr/bin:/bin", "PYTHONPATH": ":".join(sys.path),
                            "OMP_NUM_THREADS": "1"})
    assert r.returncode == 0, r.stderr
    expected_float = np.load(case_dir(case) / "output_float.npy")
    assert psnr(np.load(flt), expected_float) >= 100
    expected = np.asarray(Image.open(case_dir(case) / "output.png").convert("RGB")).astype(int)
    got = np.asarray(Image.open(out).convert("RGB")).astype(int)
    assert got.shape == expected.shape
    diff = np.abs(got - expected)
    assert diff.max() <= 2 and (diff > 0).mean() < 0.001 and (diff > 1).mean() < 0.0001


def params_of(meta: dict) -> UpscaleParams:
    """The reference's argparse namespace in our parameters (the library path, beside the CLI's)."""
    a = meta["args"]
    kw: dict = dict(scale=a["upscale"], steps=a["num_inference_steps"], t_max=a["t_max"], t_min=a["t_min"],
                    cfg_scale=a["guidance_scale"], prompt=a["added_prompt"], negative_prompt=a["negative_prompt"],
                    color_fix={"nofix": "none"}.get(a["align_method"], a["align_method"]), seed=a["seed"],
                    process_size=a["process_size"], start_point=a["start_point"], start_steps=a["start_steps"],
                    tile_diffusion="gaussian" if a["tile_diffusion"] else "none", tile_vae=bool(a["tile_vae"]))
    if a["tile_diffusion"]:
        kw.update(tile_diffusion_size=a["tile_diffusion_size"], tile_diffusion_stride=a["tile_diffusion_stride"])
    if a["tile_vae"]:
        kw.update(tile_vae_decoder_size=a["vae_decoder_tile_size"], tile_vae_encoder_size=a["vae_encoder_tile_size"])
    return UpscaleParams(**kw)


@pytest.mark.parametrize("case", PUBLIC_CASES)
def test_library_intermediates(case, v2_pipeline):
    meta = case_meta(case)
    trace = np.load(case_dir(case) / "trace.npz")
    steps = []
    image = Image.open(V2_FIXTURES / meta["args"]["image_path"]).convert("RGB")
    out = v2_pipeline.run(image, params_of(meta), on_step=steps.append)
    assert out.geometry.process == tuple(meta["preprocess"]["processing_wh"])
    assert out.geometry.target == tuple(meta["preprocess"]["output_png_wh"])
    tiles = meta["tiles"]["coords_hi_hiend_wi_wiend"] if meta.get("tiles") else []
    assert [(w.top, w.bottom, w.left, w.right) for w in out.plan.tiles] == [tuple(c) for c in tiles]
    assert out.evaluations == len(meta["model_evals"]) * max(1, len(tiles))
    first = steps[0]
    assert relative_error(first.sample, trace["x_start"]) < LATENT_TOL
    if meta["args"]["start_point"] == "noise":
        assert relative_error(first.sample, trace["x_T"]) < LATENT_TOL
    assert relative_error(first.x0, trace["x0_T"]) < LATENT_TOL
    assert np.array_equal(first.noise.numpy(), trace["noise_tao"])  # the global stream, channels_last order
    assert relative_error(first.x_next, trace["x_tao"]) < LATENT_TOL
    loop = steps[1:]
    assert [s.timestep for s in loop] == [int(trace[f"step{i}_t"]) for i in range(len(loop))]
    for i, s in enumerate(loop):
        assert relative_error(s.sample, trace[f"step{i}_sample"]) < LATENT_TOL
        assert relative_error(s.eps, trace[f"step{i}_eps"]) < LATENT_TOL
        assert relative_error(s.x0, trace[f"step{i}_x0"]) < LATENT_TOL
        assert np.array_equal(s.noise.numpy(), trace[f"step{i}_noise"])  # the explicit stream
        assert relative_error(s.x_next, trace[f"step{i}_x_prev"]) < LATENT_TOL
    final = first.x0 if not loop else (loop[-1].x0 if meta["args"]["t_min"] > 0 else loop[-1].x_next)
    assert relative_error(final, trace["final_latent"]) < LATENT_TOL
    assert psnr(out.processed, np.load(case_dir(case) / "output_float.npy")) >= 100


@pytest.mark.parametrize("preset,case", [(None, "case_a_onestep_adain"), ("two-step", "case_b_twostep_adain")])
def test_cli_model_defaults_and_presets(preset, case, tmp_path):
    """Flags left out take the model's defaults (the one-step preset) or --preset's: cases a and b are the
    reference scripts' settings at process size 128, so they come out with only the size, seed and scale given."""
    out, flt = tmp_path / "out.png", tmp_path / "out.npy"
    cmd = [sys.executable, "-m", "ccsr.cli", "upscale", str(V2_FIXTURES / "inputs" / "lq_32x32.png"), "-o", str(out),
           "--save-float", str(flt), "--weights", str(V2_MODEL), "--device", "cpu", "--dtype", "float32",
           "--scale", "4", "--process-size", "128", "--seed", "233", *(["--preset", preset] if preset else [])]
    r = subprocess.run(cmd, capture_output=True, text=True, timeout=600,
                       env={"HF_HUB_OFFLINE": "1", "PATH": "/usr/bin:/bin", "PYTHONPATH": ":".join(sys.path),
                            "OMP_NUM_THREADS": "1"})
    assert r.returncode == 0, r.stderr
    assert psnr(np.load(flt), np.load(case_dir(case) / "output_float.npy")) >= 100


def test_cli_dry_run_plans_v2_from_its_config_files(tmp_path):
    """--dry-run describes a CCSR-v2 folder from its json configs (no weights read) with the model's defaults or
    --preset: one evaluation at the defaults, two with the two-step preset."""
    import json

    evaluations = {}
    for preset in (None, "two-step"):
        cmd = [sys.executable, "-m", "ccsr.cli", "upscale", str(V2_FIXTURES / "inputs" / "lq_32x32.png"), "-o",
               str(tmp_path / "out.png"), "--weights", str(V2_MODEL), "--device", "cpu", "--dry-run", "--json", "-",
               *(["--preset", preset] if preset else [])]
        r = subprocess.run(cmd, capture_output=True, text=True, timeout=600,
                           env={"HF_HUB_OFFLINE": "1", "PATH": "/usr/bin:/bin", "PYTHONPATH": ":".join(sys.path),
                                "OMP_NUM_THREADS": "1"})
        assert r.returncode == 0, r.stderr
        (plan,) = json.loads(r.stdout)["files"]
        assert plan["output_size"] == [128, 128] and plan["processing_size"] == [512, 512]  # x4, process size 512
        evaluations[preset] = plan["evaluations"]
    assert evaluations == {None: 1, "two-step": 2}
    assert not (tmp_path / "out.png").exists()
