"""CCSR-v2's host memory (bench/README.md): v1's heap policy (``ccsr.hostmemory``), and the VAE encoder released
after the condition encode on the CPU, read again for the next upscale."""

from __future__ import annotations

import numpy as np
import pytest
import torch
from PIL import Image
from tests.v2.conftest import V2_FIXTURES, V2_MODEL

from ccsr import hostmemory
from ccsr.model.v2 import load_v2, load_vae_encoder

ONE_STEP = dict(scale=4, process_size=128, seed=5)


@pytest.fixture(scope="module")
def photo() -> Image.Image:
    return Image.open(V2_FIXTURES / "inputs" / "lq_64x64.png").convert("RGB").crop((0, 0, 61, 47))


def test_sampling_reuses_freed_memory_and_phases_give_it_back(v2_pipeline, photo, monkeypatch):
    """The host heap policy v1 follows (``ccsr.hostmemory``): network evaluations run inside ``reuse_freed``, and
    the condition encode's and the decoder's transients are trimmed before the next phase allocates its own."""
    events: list[str] = []
    trim = hostmemory.trim
    monkeypatch.setattr(hostmemory, "trim", lambda: events.append("trim") or trim())
    forward = v2_pipeline.model.unet.forward

    def unet(*args, **kwargs):  # type: ignore[no-untyped-def]
        events.append("eval inside reuse_freed" if hostmemory._active else "eval outside")
        return forward(*args, **kwargs)

    monkeypatch.setattr(v2_pipeline.model.unet, "forward", unet)
    condition = v2_pipeline._condition
    monkeypatch.setattr(v2_pipeline, "_condition", lambda *a: events.append("encode") or condition(*a))
    v2_pipeline.run(photo, v2_pipeline.params("one-step", **ONE_STEP), output_type="pil")
    assert "eval outside" not in events and events.count("eval inside reuse_freed") == 1
    evaluation = events.index("eval inside reuse_freed")
    assert "trim" in events[events.index("encode") : evaluation]  # after the encode, before the sampling
    assert "trim" in events[evaluation + 1 :]  # after the decode


def test_the_vae_encoder_is_released_after_the_encode_and_read_again(v2_pipeline, photo):
    params = v2_pipeline.params("two-step", **ONE_STEP)
    first = v2_pipeline.run(photo, params)
    assert v2_pipeline.model.vae.encoder is None and v2_pipeline.model.vae.quant_conv is None  # CPU: released
    again = v2_pipeline.run(photo, params)  # read again from the folder: the same weights, the same image
    assert np.array_equal(first.processed, again.processed) and np.array_equal(first.final, again.final)
    assert v2_pipeline.model.vae.decoder is not None  # the decoder half stays


def test_the_encoder_half_is_read_alone_and_strictly():
    reference = load_v2(V2_MODEL).vae
    encoder, quant_conv = load_vae_encoder(V2_MODEL / "vae")
    for mine, theirs in ((encoder, reference.encoder), (quant_conv, reference.quant_conv)):
        state = theirs.state_dict()
        assert mine.state_dict().keys() == state.keys()
        assert all(torch.equal(v, state[k]) for k, v in mine.state_dict().items())


def test_a_model_without_a_reader_keeps_its_encoder():
    model = load_v2(V2_MODEL)
    model.load_encoder = None
    assert model.release_encoder() is False and model.vae.encoder is not None
