"""CCSR-v2 tiling planned from free memory (beyond the reference): the exact path when it fits, gaussian windows,
the tiled VAE decoder and the tiled VAE encoder (estimated statistics) when it does not."""

from __future__ import annotations

import numpy as np
import pytest
import torch
from PIL import Image
from tests.v2.conftest import V2_FIXTURES, V2_MODEL

from ccsr.pipeline_v2 import CCSRv2Pipeline

SMALL = dict(scale=4, process_size=128, seed=77)


@pytest.fixture(scope="module")
def lq() -> Image.Image:
    return Image.open(V2_FIXTURES / "inputs" / "lq_64x64.png").convert("RGB")


def test_ample_memory_keeps_the_reference_path(v2_pipeline, lq):
    auto = v2_pipeline.params("two-step", **SMALL)
    plan = v2_pipeline.plan(lq.size, auto)
    assert (plan.tiles, plan.decode, plan.encode) == ((), "whole", "whole")
    exact = v2_pipeline.run(lq, auto.replace(tile_diffusion="none", tile_vae=False))
    assert np.array_equal(v2_pipeline.run(lq, auto).processed, exact.processed)


class Rows:
    """A row sink (``ccsr.result.RowSink``) that keeps what it is given."""

    def __init__(self, size: tuple[int, int]):
        self.size = size
        self.pixels = np.full((size[1], size[0], 3), np.nan, np.float32)

    def write(self, top: int, rows: np.ndarray) -> None:
        self.pixels[top : top + len(rows)] = rows


@pytest.mark.parametrize("budget_mib", [60])
def test_a_tight_budget_tiles_diffusion_decoder_and_encoder(lq, budget_mib):
    pipe = CCSRv2Pipeline.from_pretrained(V2_MODEL, device="cpu", max_memory=budget_mib << 20)
    image = lq.resize((128, 96), Image.Resampling.BICUBIC)
    params = pipe.params("two-step", **SMALL)
    plan = pipe.plan(image.size, params)
    assert plan.params.tile_diffusion == "gaussian" and len(plan.tiles) > 1
    assert plan.decode == "estimate" and plan.encode == "estimate"
    assert plan.estimate <= budget_mib << 20
    ticks: list[tuple[int, int]] = []
    sink = Rows(plan.geometry.target)
    out = pipe.run(image, params, progress=lambda d, t: ticks.append((d, t)), output_type=sink)
    assert out.plan == plan and out.image is None and out.final is None
    assert ticks[-1] == (out.evaluations, out.evaluations) == (plan.evaluations, 2 * len(plan.tiles))
    assert np.isfinite(sink.pixels).all() and sink.pixels.min() >= 0 and sink.pixels.max() <= 1


def test_no_tile_vae_is_never_tiled(lq):
    pipe = CCSRv2Pipeline.from_pretrained(V2_MODEL, device="cpu", max_memory=60 << 20)
    plan = pipe.planner.plan((128, 96), pipe.params("two-step", tile_vae=False, **SMALL), budget=60 << 20)
    assert (plan.decode, plan.encode) == ("whole", "whole")


def test_out_of_memory_is_retried_with_a_smaller_plan(v2_pipeline, lq):
    """A device that fails above a latent size (fault injection on the real UNet): the run is planned again with
    gaussian windows (and a smaller budget for the rest of the plan) and reports the new total."""
    image = lq.resize((128, 96), Image.Resampling.BICUBIC)
    params = v2_pipeline.params("two-step", **SMALL)
    plan = v2_pipeline.plan(image.size, params)
    assert plan.tiles == ()
    limit = max(plan.geometry.process) // 8 - 1  # the untiled latent is too big, windows are not

    def fail_if_large(module, args):  # type: ignore[no-untyped-def]
        if max(args[0].shape[-2:]) > limit:
            raise torch.OutOfMemoryError("CUDA out of memory. Tried to allocate 2.00 GiB (injected)")

    handle = v2_pipeline.model.unet.register_forward_pre_hook(fail_if_large)
    logs: list[str] = []
    ticks: list[tuple[int, int]] = []
    try:
        out = v2_pipeline.run(image, params, log=logs.append, progress=lambda d, t: ticks.append((d, t)))
    finally:
        handle.remove()
    assert out.plan is not None and out.plan.params.tile_diffusion == "gaussian" and len(out.plan.tiles) > 1
    assert any("out of memory" in m for m in logs)
    assert ticks[-1] == (out.evaluations, out.evaluations)
    assert out.plan.estimate < plan.estimate
    assert np.isfinite(out.processed).all() and out.processed.min() >= 0 and out.processed.max() <= 1
