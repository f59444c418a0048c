"""Recognising and loading the CCSR-v2 folder layout: self-description, strict keys, the offline message."""

from __future__ import annotations

import shutil
import subprocess
import sys

import pytest
import torch
from safetensors.torch import load_file, save_file
from tests.v2.conftest import V2_MODEL

from ccsr.model import WeightsError
from ccsr.model.convert import CheckpointKeyError
from ccsr.model.v2 import is_v2_folder, load_v2
from ccsr.pipeline import CCSRPipeline
from ccsr.pipeline_v2 import CCSRv2Pipeline
from ccsr.presets import V2_PRESETS


def test_the_folder_describes_itself(v2_pipeline):
    d = v2_pipeline.descriptor
    assert d.name == "CCSR-v2"
    assert (d.latent_factor, d.size_multiple, d.latent_channels) == (8, 8, 4)
    assert d.supports_tiling
    assert set(d.presets) == {"one-step", "two-step"} and d.defaults == V2_PRESETS["one-step"]
    assert v2_pipeline.params("two-step").steps == 6 and v2_pipeline.params().steps == 1


def test_from_pretrained_recognises_v2():
    assert is_v2_folder(V2_MODEL) and not is_v2_folder(V2_MODEL / "stable-diffusion-2-1-base")
    assert isinstance(CCSRPipeline.from_pretrained(V2_MODEL, device="cpu"), CCSRv2Pipeline)


def test_the_ccsr_vae_is_loaded_not_sds():
    model = load_v2(V2_MODEL)
    ccsr = load_file(str(V2_MODEL / "vae" / "diffusion_pytorch_model.safetensors"))
    key = "encoder.conv_in.weight"
    assert torch.equal(model.vae.state_dict()[key], ccsr[key])


def _copy_layout(tmp_path, with_sd: bool = True):
    root = tmp_path / "v2"
    for part in ("controlnet", "vae"):
        shutil.copytree(V2_MODEL / part, root / part)
    if with_sd:
        shutil.copytree(V2_MODEL / "stable-diffusion-2-1-base", root / "stable-diffusion-2-1-base")
    return root


@pytest.mark.parametrize("change", ["missing", "unexpected"])
def test_strict_keys(tmp_path, change):
    root = _copy_layout(tmp_path)
    f = root / "controlnet" / "diffusion_pytorch_model.safetensors"
    state = load_file(str(f))
    if change == "missing":
        del state["condition_conv_in.weight"]
    else:
        state["extra.weight"] = torch.zeros(1)
    save_file(state, str(f))
    with pytest.raises(CheckpointKeyError, match="condition_conv_in.weight" if change == "missing" else "extra"):
        load_v2(root)


def test_offline_message_names_the_files_and_where(tmp_path):
    root = _copy_layout(tmp_path, with_sd=False)
    code = ("from ccsr.model.v2 import load_v2\n"
            f"load_v2({str(root)!r})\n")
    env = {"HF_HUB_OFFLINE": "1", "PATH": "/usr/bin:/bin", "HOME": str(tmp_path), "PYTHONPATH": ":".join(sys.path)}
    r = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, env=env, timeout=300)
    assert r.returncode != 0
    last = r.stderr.strip().splitlines()[-1]
    assert "WeightsError" in last
    for needle in ("stabilityai/stable-diffusion-2-1-base", "unet/", "text_encoder/", "tokenizer/", "scheduler/",
                   str(root / "stable-diffusion-2-1-base"), "outside the hub"):
        assert needle in last, needle


def test_not_a_v2_folder(tmp_path):
    with pytest.raises(WeightsError, match="not a CCSR-v2 folder"):
        load_v2(tmp_path)


def test_convert_writes_the_layout_in_half_precision(tmp_path, v2_pipeline):
    from ccsr.model import convert

    out = convert(V2_MODEL, tmp_path / "half", dtype=torch.float16, log=lambda m: None)
    assert is_v2_folder(out)
    state = load_file(str(out / "controlnet" / "diffusion_pytorch_model.safetensors"))
    assert state["condition_conv_in.weight"].dtype == torch.float16
    pipe = CCSRv2Pipeline.from_pretrained(out, device="cpu", dtype="float32")
    original = load_file(str(V2_MODEL / "vae" / "diffusion_pytorch_model.safetensors"))["encoder.conv_in.weight"]
    assert torch.equal(pipe.model.vae.state_dict()["encoder.conv_in.weight"], original.half().float())
    assert pipe.descriptor.name == v2_pipeline.descriptor.name


def test_the_text_encoder_is_freed_and_rebuilt_for_a_new_prompt(v2_pipeline):
    """The default prompts are encoded at load; another prompt builds the encoder again, with the same result."""
    text = v2_pipeline.model.text
    assert text.encoder is None
    defaults = v2_pipeline.descriptor.defaults
    cached = text(defaults["prompt"])
    assert text.encoder is None
    other = text("a sharp photo")
    assert text.encoder is not None and other.shape == cached.shape
    text.release()
    text.cache.clear()
    assert torch.equal(text(defaults["prompt"]), cached)
    text.release()
