"""Weights: formats, strictness, sources and conversion; the real loading code on real checkpoint layouts."""

from __future__ import annotations

import re
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import torch
from safetensors.torch import load_file, save_file
from tests.conftest import TINY_CKPT, TINY_CONFIG, TINY_WEIGHTS

from ccsr.model import CheckpointKeyError, WeightsError, convert, load_config, load_model
from ccsr.model.loading import resolve_weights


def _same_networks(a, b) -> None:
    for name, module in a.networks().items():
        other = b.networks()[name].state_dict()
        for key, value in module.state_dict().items():
            assert torch.equal(value, other[key]), f"{name}.{key}"


def test_ckpt_and_safetensors_load_identically():
    _same_networks(load_model(TINY_CKPT, TINY_CONFIG), load_model(TINY_WEIGHTS, TINY_CONFIG))


def test_builtin_config_is_sd21_ccsr_v1():
    cfg = load_config(None)
    assert cfg.unet["block_out_channels"] == (320, 640, 1280, 1280)
    assert cfg.unet["attention_head_dim"] == (5, 10, 20, 20)
    assert cfg.unet["cross_attention_dim"] == 1024
    assert cfg.vae["block_out_channels"] == (128, 256, 512, 512)
    assert (cfg.text.width, cfg.text.heads, cfg.text.used_layers) == (1024, 16, 23)
    assert cfg.scale_factor == 0.18215


def test_missing_key_is_named(tmp_path):
    sd = load_file(TINY_WEIGHTS)
    del sd["control_model.zero_convs.3.0.weight"]
    save_file(sd, tmp_path / "m.safetensors")
    with pytest.raises(CheckpointKeyError) as err:
        load_model(tmp_path / "m.safetensors", TINY_CONFIG)
    assert "controlnet_down_blocks.3.weight" in str(err.value)
    assert err.value.missing and not err.value.unexpected


def test_unexpected_key_is_named(tmp_path):
    sd = load_file(TINY_WEIGHTS)
    sd["control_model.input_hint_block.0.weight"] = torch.zeros(3)
    save_file(sd, tmp_path / "m.safetensors")
    with pytest.raises(CheckpointKeyError) as err:
        load_model(tmp_path / "m.safetensors", TINY_CONFIG)
    assert "control_model.input_hint_block.0.weight" in str(err.value)


def test_training_only_keys_are_ignored(tmp_path):
    sd = load_file(TINY_WEIGHTS)
    sd["decoder_loss.logvar"] = torch.zeros(())
    sd["module.betas"] = sd.pop("betas")  # DataParallel prefix is stripped, as the reference loader does
    torch.save({"state_dict": sd}, tmp_path / "m.ckpt")
    load_model(tmp_path / "m.ckpt", TINY_CONFIG)


def test_wrong_config_for_the_weights(tmp_path):
    with pytest.raises(CheckpointKeyError):
        load_model(TINY_WEIGHTS, None)  # the built-in SD-2.1 config does not fit the tiny weights


@pytest.mark.parametrize("content", [b"<html>quota exceeded</html>", b"", b"\x00" * 100])
def test_not_a_checkpoint(tmp_path, content):
    bad = tmp_path / "real-world_ccsr.ckpt"
    bad.write_bytes(content)
    with pytest.raises(WeightsError, match="not a readable checkpoint"):
        load_model(bad, TINY_CONFIG)


def test_hub_reference_offline_says_how_to_get_weights(monkeypatch):
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    with pytest.raises(WeightsError) as err:
        resolve_weights("hf://camenduru/CCSR/real-world_ccsr.ckpt")
    msg = str(err.value)
    assert "--weights" in msg and "camenduru/CCSR" in msg and "real-world_ccsr.ckpt" in msg
    # the command it names is the one the installed huggingface_hub ships (huggingface-cli is gone)
    command = re.search(r"`(hf download [^`]+)`", msg)
    assert command is not None and "huggingface-cli" not in msg, msg
    hf = Path(sys.executable).parent / "hf"
    usage = subprocess.run([str(hf), *command.group(1).split()[1:], "--help"], capture_output=True, text=True)
    assert usage.returncode == 0 and "--local-dir" in usage.stdout, usage.stderr


def test_missing_local_file():
    with pytest.raises(WeightsError, match="not found"):
        resolve_weights("./nope/model.ckpt")


@pytest.mark.parametrize("dtype", [torch.float32, torch.float16])
def test_convert_round_trip(tmp_path, tiny_pipeline, dtype):
    out = convert(TINY_CKPT, tmp_path / "conv", config=TINY_CONFIG, dtype=dtype, log=lambda m: None)
    assert (out / "ccsr.json").is_file() and (out / "unet.safetensors").is_file()
    model = load_model(out)  # the config travels inside the folder
    if dtype == torch.float32:
        _same_networks(model, load_model(TINY_WEIGHTS, TINY_CONFIG))  # whole (a pipeline frees the VAE encoder)
        assert torch.equal(model.text.empty_context, tiny_pipeline.model.text.empty_context)
    else:
        assert next(model.unet.parameters()).dtype == torch.float16
    ctx = model.text.encode("a photo of a cat, high quality")  # lazy text encoder from the folder
    ref = tiny_pipeline.model.text.encode("a photo of a cat, high quality")
    assert np.abs(ctx.numpy() - ref.numpy()).max() < (1e-6 if dtype == torch.float32 else 5e-2)


def test_text_encoder_is_not_kept_after_load(tiny_pipeline):
    fresh = load_model(TINY_WEIGHTS, TINY_CONFIG)
    assert not fresh.text.loaded
    fresh.text.encode("a cat")
    assert fresh.text.loaded
    fresh.text.release()
    assert not fresh.text.loaded
