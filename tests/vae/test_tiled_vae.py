"""Tiled VAE parity with CCSR-v1's ``utils/tilevae.py`` (fixtures made by the original code, tiny model)."""

from __future__ import annotations

import json

import numpy as np
import pytest
import torch
from PIL import Image
from tests.conftest import FIXTURES

import ccsr.vae.tiled as tiled_module
from ccsr.vae import split_tiles, tiled_decode, tiled_encode
from ccsr.vae.tiled import _decoder, _encoder, _tiled

COMPONENTS = FIXTURES / "components"
SCALE = 0.18215


@pytest.fixture(scope="module")
def vae():
    from safetensors.torch import load_file

    from ccsr.model.components import build_empty, expected_keys, fill
    from ccsr.model.config import load_config
    from ccsr.model.convert import split_checkpoint

    cfg = load_config(FIXTURES / "model.yaml")
    mods = build_empty(cfg, with_text=False)
    parts = split_checkpoint(
        load_file(FIXTURES / "model.safetensors"), cfg, expected_keys(mods), with_text=False
    )
    return fill(mods["vae"], parts["vae"])


@pytest.fixture(scope="module")
def manifest():
    return json.loads((COMPONENTS / "manifest.json").read_text())


def _rel_err(a: torch.Tensor, ref: np.ndarray) -> float:
    return float(np.abs(a.numpy() - ref).max() / np.abs(ref).max())


def _image() -> torch.Tensor:
    arr = np.asarray(Image.open(COMPONENTS / "tiledvae_in_image_320x256.png").convert("RGB"))
    return torch.from_numpy((arr / 255.0).astype(np.float32) * 2 - 1).permute(2, 0, 1)[None].contiguous()


def _boxes(manifest, name):
    tiles = manifest[name]
    return [tuple(b) for b in tiles["in_bboxes_x1x2y1y2"]], [tuple(b) for b in tiles["out_bboxes_x1x2y1y2"]]


def test_tile_boxes_match_reference(manifest):
    assert split_tiles(32, 40, 8, 11, decoder=True) == _boxes(manifest, "tiledvae_decoder_tiles")
    assert split_tiles(256, 320, 64, 32, decoder=False) == _boxes(manifest, "tiledvae_encoder_tiles")


def test_misaligned_encoder_tiles_are_refused():
    assert len(split_tiles(144, 144, 45, 32, decoder=False)[0]) == 4  # 40-px tiles: aligned
    with pytest.raises(ValueError, match="not aligned"):
        split_tiles(8, 267, 45, 32, decoder=False)  # 44-px tiles: the reference's crop breaks


def test_tiled_decoder_matches_reference(vae, manifest):
    z = torch.from_numpy(np.load(COMPONENTS / "tiledvae_decoder_in_z_scaled.npy")) / SCALE
    out = tiled_decode(vae, z, tile_size=8, pad=11)
    ref = np.load(COMPONENTS / "tiledvae_decoder_out.npy")
    assert out.shape == ref.shape
    assert _rel_err(out, ref) < 1e-4
    # the GroupNorm sync is the reference's approximation, not the exact global statistics
    with torch.no_grad():
        untiled = vae.decode(z).sample
    expected = manifest["tiledvae_decoder_out.npy"]["max_abs_diff_vs_untiled"]
    assert (out - untiled).abs().max().item() == pytest.approx(expected, rel=1e-3)


def test_tiled_encoder_matches_reference(vae, manifest):
    x = _image()
    moments = tiled_encode(vae.encoder, vae.quant_conv, x, tile_size=64, pad=32)
    ref = np.load(COMPONENTS / "tiledvae_encoder_moments.npy")
    assert moments.shape == ref.shape
    assert _rel_err(moments, ref) < 1e-4
    with torch.no_grad():
        untiled = vae.quant_conv(vae.encoder(x))
    expected = manifest["tiledvae_encoder_moments.npy"]["max_abs_diff_vs_untiled"]
    assert (moments - untiled).abs().max().item() == pytest.approx(expected, rel=1e-3)


def test_small_inputs_are_not_tiled(vae):
    g = torch.Generator().manual_seed(0)
    z = torch.randn(1, 4, 30, 24, generator=g)  # max side 30 == 2*11 + 8: at the threshold, no tiling
    with torch.no_grad():
        assert torch.equal(tiled_decode(vae, z, tile_size=8), vae.decode(z).sample)
        assert torch.equal(tiled_decode(vae, z, tile_size=8, stats="estimate"), vae.decode(z).sample)
    x = torch.rand(1, 3, 128, 96, generator=g) * 2 - 1  # 128 == 2*32 + 64
    with torch.no_grad():
        assert torch.equal(
            tiled_encode(vae.encoder, vae.quant_conv, x, tile_size=64), vae.quant_conv(vae.encoder(x))
        )


def test_single_tile_program_equals_module(vae):
    """With one tile covering everything, synchronised GroupNorm is plain GroupNorm: the per-tile programs
    must reproduce the diffusers forward passes."""
    g = torch.Generator().manual_seed(1)
    z = torch.randn(1, 4, 20, 28, generator=g)
    with torch.no_grad():
        ref = vae.decoder(z)
        assert (
            _tiled(vae.decoder, _decoder, z, 100, 11, True, False) - ref
        ).abs().max() < 1e-5 * ref.abs().max()
        x = torch.rand(1, 3, 64, 80, generator=g) * 2 - 1
        ref = vae.encoder(x)
        assert (
            _tiled(vae.encoder, _encoder, x, 200, 32, False, False) - ref
        ).abs().max() < 1e-5 * ref.abs().max()


@pytest.mark.parametrize("shape", [(37, 53), (10, 61), (61, 25)])
def test_odd_and_thin_latents(vae, shape):
    g = torch.Generator().manual_seed(2)
    z = torch.randn(1, 4, *shape, generator=g)
    in_boxes, out_boxes = split_tiles(*shape, 8, 11, decoder=True)
    assert len(in_boxes) > 1
    # the valid regions tile the output exactly once
    cover = torch.zeros(shape[0] * 8, shape[1] * 8, dtype=torch.int32)
    for x1, x2, y1, y2 in out_boxes:
        cover[y1:y2, x1:x2] += 1
    assert bool((cover == 1).all())
    out = tiled_decode(vae, z, tile_size=8)
    assert out.shape == (1, 3, shape[0] * 8, shape[1] * 8)
    assert torch.isfinite(out).all()
    with torch.no_grad():
        untiled = vae.decode(z).sample
    assert (out - untiled).abs().max() < 0.5 * untiled.abs().max()  # close, but the reference's approximation


@pytest.mark.parametrize("stats", ["sync", "estimate"])
def test_batch_statistics_are_per_sample(vae, stats):
    z = torch.from_numpy(np.load(COMPONENTS / "tiledvae_decoder_in_z_scaled.npy")) / SCALE
    z = z[:, :, :31, :34]  # still 4 tiles, cheaper
    z2 = torch.cat([z, z.flip(-1)])
    out = tiled_decode(vae, z2, tile_size=8, stats=stats, estimate_size=16)
    one = tiled_decode(vae, z2[1:], tile_size=8, stats=stats, estimate_size=16)
    assert (out[1:] - one).abs().max() < 1e-5 * one.abs().max()


# ------------------------------------------------------------------------------------- stats="estimate" mode
def _smooth_latent(seed: int, height: int, width: int) -> torch.Tensor:
    """A spatially smooth latent (like a real image's), whose area-downscaled version keeps its statistics; an
    i.i.d. noise latent loses most of its variance when averaged, which no estimate could survive."""
    g = torch.Generator().manual_seed(seed)
    coarse = torch.randn(1, 4, 6, 5, generator=g) * 3
    return torch.nn.functional.interpolate(coarse, size=(height, width), mode="bicubic", align_corners=False)


@pytest.mark.parametrize("estimate_size", [48, 1000])
def test_estimate_without_downscale_equals_sync(vae, estimate_size):
    """No downscale: the estimating pass is the synchronised pass, so replaying its recorded statistics tile by
    tile must give the synchronised result (this fails if a statistic lands on the wrong GroupNorm)."""
    z = _smooth_latent(6, 48, 40)
    sync = tiled_decode(vae, z, tile_size=16)
    est = tiled_decode(vae, z, tile_size=16, stats="estimate", estimate_size=estimate_size)
    assert torch.allclose(est, sync, rtol=0, atol=1e-5 * sync.abs().max().item())


def test_estimate_with_downscale_is_close_to_sync(vae):
    z = _smooth_latent(5, 48, 40)
    sync = tiled_decode(vae, z, tile_size=16)
    est = tiled_decode(vae, z, tile_size=16, stats="estimate", estimate_size=24)  # statistics from 24x20
    assert est.shape == sync.shape and torch.isfinite(est).all()
    diff = ((est - sync).abs().mean() / sync.std()).item()
    # ~0.18 with this random tiny VAE; statistics shifted by one GroupNorm or reversed give > 1.6
    assert 1e-4 < diff < 0.5


def _count_tiles(monkeypatch) -> list[str]:
    """Record when each tile program starts (first resumed) and finishes."""
    events: list[str] = []

    def counted(dec, t):
        events.append("start")
        yield from _decoder(dec, t)
        events.append("end")

    monkeypatch.setattr(tiled_module, "_decoder", counted)
    return events


def _peak_in_flight(events: list[str]) -> int:
    live = peak = 0
    for e in events:
        live += 1 if e == "start" else -1
        peak = max(peak, live)
    assert live == 0
    return peak


def test_estimate_runs_one_full_tile_at_a_time(vae, monkeypatch):
    """Memory bound, structurally: in estimate mode a full-size tile starts only after the previous one has
    finished (its activations are gone), while sync mode keeps all tiles in flight."""
    z = _smooth_latent(7, 40, 32)
    n_full = len(split_tiles(40, 32, 8, 11, decoder=True)[0])
    n_est = len(split_tiles(32, 26, 8, 11, decoder=True)[0])  # the 40x32 latent downscaled to 32 px
    assert n_full == 6 and n_est == 2

    events = _count_tiles(monkeypatch)
    tiled_decode(vae, z, tile_size=8)
    assert events == ["start"] * n_full + ["end"] * n_full
    assert _peak_in_flight(events) == n_full

    events.clear()
    tiled_decode(vae, z, tile_size=8, stats="estimate", estimate_size=32)
    estimating, full = events[: 2 * n_est], events[2 * n_est :]
    assert estimating == ["start"] * n_est + ["end"] * n_est  # the small synchronised pass
    assert full == ["start", "end"] * n_full
    assert _peak_in_flight(full) == 1


def test_unknown_stats_mode_is_refused(vae):
    z = torch.zeros(1, 4, 40, 40)
    with pytest.raises(ValueError, match=r"'sync', 'estimate'.*'fast'"):
        tiled_decode(vae, z, tile_size=8, stats="fast")
    with pytest.raises(ValueError, match="estimate_size"):
        tiled_decode(vae, z, tile_size=8, stats="estimate", estimate_size=0)
