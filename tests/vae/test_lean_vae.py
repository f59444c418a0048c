"""The memory-lean VAE passes compute what diffusers' modules compute, and their full-resolution convs run in bands.

The arithmetic is the same; only oneDNN may pick another kernel for a band than for the whole tensor at some shapes,
which moves the last bits (as running on another CPU does). A wrong halo, pad or norm would be off by O(1).
"""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F
from diffusers import AutoencoderKL

from ccsr.vae import lean


@pytest.fixture(scope="module")
def vae() -> AutoencoderKL:
    """An SD-shaped VAE, narrow: channel-changing shortcuts, several channels per GroupNorm group, random weights
    and norms (every op matters)."""
    torch.manual_seed(0)
    net = AutoencoderKL(
        down_block_types=("DownEncoderBlock2D",) * 3, up_block_types=("UpDecoderBlock2D",) * 3,
        block_out_channels=(16, 32, 32), layers_per_block=2, latent_channels=4, norm_num_groups=8,
    )
    with torch.no_grad():
        for name, p in net.named_parameters():
            is_norm_scale = p.ndim == 1 and "norm" in name and name.endswith("weight")
            p.copy_(torch.randn_like(p) * 0.3 + (1.0 if is_norm_scale else 0.0))
    return net.eval().requires_grad_(False)


@pytest.fixture(params=[True, False], ids=["banded", "whole"])
def banding(request, monkeypatch) -> bool:
    """Band every conv (the fixture's tensors are all below the size where banding starts) or none."""
    monkeypatch.setattr(lean, "BAND_MIN", 0 if request.param else 1 << 60)
    return request.param


@pytest.mark.parametrize("latent", [(32, 32), (13, 21), (1, 9)])
def test_decode_equals_diffusers(vae, banding, latent) -> None:
    z = torch.randn(1, 4, *latent, generator=torch.Generator().manual_seed(1))
    with torch.inference_mode():
        want = vae.decode(z).sample
        got = lean.vae_decode(vae, z)
    _assert_same(got, want)


@pytest.mark.parametrize("size", [(256, 256), (72, 56), (67, 45), (9, 17)])
def test_encode_equals_diffusers(vae, banding, size) -> None:
    x = torch.rand(1, 3, *size, generator=torch.Generator().manual_seed(2)) * 2 - 1
    with torch.inference_mode():
        want = vae.encoder(x)
        got = lean.encode(vae.encoder, x)
    _assert_same(got, want)


def _assert_same(got: torch.Tensor, want: torch.Tensor) -> None:
    assert got.shape == want.shape
    torch.testing.assert_close(got, want, rtol=0, atol=2e-6 * float(want.abs().max()))


def test_full_resolution_convs_run_in_bands(vae, monkeypatch) -> None:
    """No conv at the output resolution sees more than a band of rows plus its halo (else the whole input and
    output are reordered at once, which is the memory the lean pass exists to avoid)."""
    monkeypatch.setattr(lean, "BAND_MIN", 0)
    seen: list[tuple[int, int]] = []
    conv2d = F.conv2d

    def spy(x, *args, **kwargs):  # type: ignore[no-untyped-def]
        seen.append((x.shape[-2], x.shape[-1]))
        return conv2d(x, *args, **kwargs)

    monkeypatch.setattr(F, "conv2d", spy)
    with torch.inference_mode():
        out = lean.vae_decode(vae, torch.randn(1, 4, 32, 32))
    rows, width = out.shape[-2:]
    full = [h for h, w in seen if w == width]
    assert full, "no conv ran at the output resolution"
    assert max(full) <= rows // lean.BANDS + 2
    assert sum(h for h, w in seen if w == width) >= rows * 5  # the real work still ran (every block's convs)


def test_falls_back_to_the_module_for_other_shapes(vae, monkeypatch) -> None:
    """A training-mode network takes diffusers' own forward (the lean pass assumes eval-mode blocks)."""
    calls = []
    monkeypatch.setattr(type(vae.decoder), "forward", lambda self, z, *a: calls.append(z) or z)
    vae.decoder.train()
    try:
        z = torch.randn(1, 4, 8, 8)
        assert lean.decode(vae.decoder, z) is z
    finally:
        vae.decoder.eval()
    assert len(calls) == 1
