"""Networks with identical tensors in two loaded models are held once (a server loading CCSR-v1 and CCSR-v2),
text encoders included: compared by content when their architectures are the same."""

from __future__ import annotations

from pathlib import Path

import torch
from safetensors.torch import save_file
from tests.conftest import TINY_CONFIG, TINY_WEIGHTS
from tests.v2.conftest import V2_MODEL

from ccsr.jobs.runner import CCSRRunner
from ccsr.model import load_model, share_identical_networks
from ccsr.model.v2 import SD_FOLDER, load_v2

PROMPT = "a photo of a cat, high quality"


def v2_with_v1_text(tmp: Path, *, perturb: bool = False) -> Path:
    """The v2 fixture with CCSR-v1's tiny text encoder in place of its own (a CLIPTextModel of the same width, so
    the v2 UNet takes its output): how the released models relate, where both carry SD-2.1's OpenCLIP tower.
    ``perturb``: one tensor changed by 1e-3."""
    root = tmp / ("v2_perturbed" if perturb else "v2_v1text")
    for part in ("controlnet", "vae"):
        (root / part).parent.mkdir(parents=True, exist_ok=True)
        (root / part).symlink_to(V2_MODEL / part)
    for part in ("unet", "tokenizer", "scheduler"):
        (root / SD_FOLDER).mkdir(parents=True, exist_ok=True)
        (root / SD_FOLDER / part).symlink_to(V2_MODEL / SD_FOLDER / part)
    encoder = load_model(TINY_WEIGHTS, TINY_CONFIG).text.build_encoder()
    state = {k: v.clone().contiguous() for k, v in encoder.state_dict().items()}
    if perturb:
        state["final_layer_norm.weight"] += 1e-3
    (root / SD_FOLDER / "text_encoder").mkdir()
    encoder.config.to_json_file(root / SD_FOLDER / "text_encoder" / "config.json")
    save_file(state, str(root / SD_FOLDER / "text_encoder" / "model.safetensors"))
    return root


def test_identical_networks_are_shared_and_different_ones_kept():
    first, second = load_v2(V2_MODEL), load_v2(V2_MODEL)
    with torch.no_grad():
        next(second.controlnet.parameters()).add_(1.0)  # one tensor differs: kept apart
    shared = share_identical_networks([first, second])
    assert shared == [("unet", 0, 1), ("vae", 0, 1), ("text_encoder", 0, 1)]
    assert second.unet is first.unet and second.vae is first.vae and second.controlnet is not first.controlnet


def test_text_encoders_are_compared_by_content(tmp_path):
    """CCSR-v1's OpenCLIP text tower (converted) and a v2 folder carrying the same tensors: one encoder, built when
    a prompt needs it and used by both models, with the outputs each had alone. Other tensors or another
    architecture (the fixtures' own v2 text encoder has one more layer): each keeps its own."""
    folder = v2_with_v1_text(tmp_path)
    v1, v2 = load_model(TINY_WEIGHTS, TINY_CONFIG), load_v2(folder)
    alone = load_v2(folder).text(PROMPT), load_model(TINY_WEIGHTS, TINY_CONFIG).text.encode(PROMPT)
    v2.text.release()
    assert share_identical_networks([v1, v2]) == [("text_encoder", 0, 1)]
    got_v2, got_v1 = v2.text(PROMPT), v1.text.encode(PROMPT)
    assert v1.text._encoder is v2.text.encoder is not None  # one module, built once for both
    assert torch.equal(got_v2, alone[0]) and torch.equal(got_v1, alone[1])
    v2.text.release()
    assert v2.text("another prompt") is not None and v2.text.encoder is v1.text._encoder  # still held by v1

    v1, other = load_model(TINY_WEIGHTS, TINY_CONFIG), load_v2(v2_with_v1_text(tmp_path, perturb=True))
    assert share_identical_networks([v1, other]) == []
    assert share_identical_networks([load_model(TINY_WEIGHTS, TINY_CONFIG), load_v2(V2_MODEL)]) == []


def test_the_runner_holds_identical_networks_once():
    """The tiny CCSR-v1 and CCSR-v2 models share nothing; two served models with the same weights share all."""
    runner = CCSRRunner(models={"ccsr-v1": str(TINY_WEIGHTS), "ccsr-v2": str(V2_MODEL)}, config=str(TINY_CONFIG),
                        device="cpu", dtype="float32")
    runner.load()
    v1, v2 = runner.pipelines["ccsr-v1"].model, runner.pipelines["ccsr-v2"].model
    assert all(v1.networks()[n] is not m for n, m in v2.networks().items())
    v1.text.encode(PROMPT), v2.text(PROMPT)
    assert v1.text._encoder is not v2.text.encoder
    twins = CCSRRunner(models={"ccsr-v1": str(V2_MODEL), "ccsr-v2": str(V2_MODEL)}, device="cpu", dtype="float32")
    twins.load()
    a, b = twins.pipelines["ccsr-v1"].model, twins.pipelines["ccsr-v2"].model
    assert all(b.networks()[n] is m for n, m in a.networks().items())
    a.text(PROMPT), b.text("another prompt")
    assert b.text.encoder is a.text.encoder is not None
