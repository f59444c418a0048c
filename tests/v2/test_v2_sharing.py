"""Networks with identical tensors in two loaded models are held once (a server loading CCSR-v1 and CCSR-v2)."""

from __future__ import annotations

import torch
from tests.conftest import TINY_CONFIG, TINY_WEIGHTS
from tests.v2.conftest import V2_MODEL

from ccsr.jobs.runner import CCSRRunner
from ccsr.model import share_identical_networks
from ccsr.model.v2 import load_v2


def test_identical_networks_are_shared_and_different_ones_kept():
    first, second = load_v2(V2_MODEL), load_v2(V2_MODEL)
    with torch.no_grad():
        next(second.controlnet.parameters()).add_(1.0)  # one tensor differs: kept apart
    shared = share_identical_networks([first, second])
    assert shared == [("unet", 0, 1), ("vae", 0, 1)]
    assert second.unet is first.unet and second.vae is first.vae and second.controlnet is not first.controlnet


def test_the_runner_holds_identical_networks_once():
    """The tiny CCSR-v1 and CCSR-v2 models share nothing; two served models with the same weights share all."""
    runner = CCSRRunner(models={"ccsr-v1": str(TINY_WEIGHTS), "ccsr-v2": str(V2_MODEL)}, config=str(TINY_CONFIG),
                        device="cpu", dtype="float32")
    runner.load()
    v1, v2 = runner.pipelines["ccsr-v1"].model, runner.pipelines["ccsr-v2"].model
    assert all(v1.networks()[n] is not m for n, m in v2.networks().items())
    twins = CCSRRunner(models={"ccsr-v1": str(V2_MODEL), "ccsr-v2": str(V2_MODEL)}, device="cpu", dtype="float32")
    twins.load()
    a, b = twins.pipelines["ccsr-v1"].model, twins.pipelines["ccsr-v2"].model
    assert all(b.networks()[n] is m for n, m in a.networks().items())
