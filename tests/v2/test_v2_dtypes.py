"""CCSR-v2 follows the model descriptor's dtype policy: each network in its own dtype, float32 between them.

Measured on the tiny model, input 32x32 x4 at process size 128 (torch 2.13, x86 CPU), largest / mean absolute
difference to float32 in [0, 1] pixels: float16 0.0020-0.0022 / 0.00022-0.00023, bfloat16 0.027 / 0.0028-0.0029
(one- and two-step). The tolerances leave about 2.5x room.
"""

from __future__ import annotations

import numpy as np
import pytest
import torch
from PIL import Image
from tests.v2.conftest import V2_FIXTURES, V2_MODEL

from ccsr.pipeline_v2 import CCSRv2Pipeline

TOLERANCE = {"float16": (0.005, 0.0006), "bfloat16": (0.07, 0.007)}


@pytest.fixture(scope="module")
def lq() -> Image.Image:
    return Image.open(V2_FIXTURES / "inputs" / "lq_32x32.png").convert("RGB")


@pytest.mark.parametrize("dtype", ["float16", "bfloat16"])
@pytest.mark.parametrize("preset", ["one-step", "two-step"])
def test_half_precision_runs_each_network_in_its_dtype_and_stays_close(dtype, preset, lq, v2_pipeline):
    reference = v2_pipeline.run(lq, v2_pipeline.params(preset, seed=1, process_size=128)).processed
    pipe = CCSRv2Pipeline.from_pretrained(V2_MODEL, device="cpu", dtype=dtype)
    wanted = pipe.descriptor.network_dtypes(getattr(torch, dtype))
    assert {n: next(m.parameters()).dtype for n, m in pipe.model.networks().items()} == {
        n: wanted[n] for n in ("unet", "controlnet", "vae")}
    records = []
    out = pipe.run(lq, pipe.params(preset, seed=1, process_size=128), on_step=records.append)
    assert {r.x0.dtype for r in records} == {r.eps.dtype for r in records} == {torch.float32}  # between networks
    assert np.isfinite(out.processed).all()
    diff = np.abs(out.processed - reference)
    assert diff.max() < TOLERANCE[dtype][0] and diff.mean() < TOLERANCE[dtype][1], (diff.max(), diff.mean())
