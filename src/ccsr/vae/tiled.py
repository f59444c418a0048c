"""Tiled VAE encoder/decoder with GroupNorm statistics shared by all tiles.

Numerically this follows CCSR-v1's ``utils/tilevae.py`` (``VAEHook``, non-fast mode), on diffusers modules:

* The input is cut into tiles (core boxes plus ``pad`` pixels of context, see :func:`split_tiles`); each tile
  runs the network on its own, and the valid region of every tile is pasted into the output (no blending).
* Every GroupNorm is synchronised: all tiles run up to it, each reports its per-group mean and biased
  variance, and all tiles are normalised with the pixel-count-weighted average of those means and variances
  (the reference's approximation: the average of the variances, not the pooled variance).
* Attention in the mid block only sees the tile's own pixels.

Each tile's forward pass is a generator (``_encoder`` / ``_decoder``) that yields the GroupNorm layer it needs
next and finds the tile's activation normalised when it resumes. The driver (``_run_tiles``) advances all
tiles to the next GroupNorm, combines their statistics and resumes them, visiting tiles in zig-zag order.
Only per-tile activations exist; with ``offload`` (default on accelerators) every tile but the current one,
and the stashed residuals, are parked on the CPU, so device memory is bounded by about one tile.

Synchronising keeps every tile's activation alive at once, so host memory grows with the output area (about
1-2 KiB per output pixel for the SD VAE). The decoder's ``stats="estimate"`` mode bounds it by about one tile
instead: like the reference tilevae's fast mode, it estimates the GroupNorm statistics from a synchronised pass
over an area-downscaled latent (recording them, GroupNorm by GroupNorm), then runs the full-size tiles one at a
time, each applying the recorded statistics. The result differs slightly from the synchronised one.
"""

from __future__ import annotations

import math
from collections.abc import Callable, Generator, Sequence

import torch
import torch.nn.functional as F
from diffusers import AutoencoderKL
from diffusers.models.autoencoders.vae import Decoder, Encoder
from torch import Tensor, nn

Box = tuple[int, int, int, int]  # x1, x2, y1, y2 (the manifest's order)
TileProgram = Generator[nn.GroupNorm, None, None]
NormStats = list[tuple[nn.GroupNorm, Tensor, Tensor]]  # (layer, var, mean) per GroupNorm, in program order
STATS_MODES = ("sync", "estimate")


# ----------------------------------------------------------------------------------------------- tile layout
def _round_tile(size: int, limit: int) -> int:
    """Round ``size`` up to a multiple of 32 (else 16, 8, 4, 2) while the result stays <= ``limit``."""
    for d in (32, 16, 8, 4, 2):
        if size % d == 0:
            return size
        if size - size % d + d <= limit:
            return size - size % d + d
    return size


def _axis_spans(n: int, tile: int, pad: int) -> list[tuple[tuple[int, int], tuple[int, int]]]:
    """(input span, valid span) per tile along one axis of length ``n``, in input pixels."""
    count = max(1, math.ceil((n - 2 * pad) / tile))
    size = _round_tile(math.ceil((n - 2 * pad) / count), tile)
    spans = []
    for j in range(count):
        a, b = pad + j * size, min(pad + (j + 1) * size, n)  # core
        valid = (a if a > pad else 0, b if b < n - pad else n)  # reaches the border when within pad of it
        spans.append(((max(0, a - pad), min(n, b + pad)), valid))
    return spans


def split_tiles(height: int, width: int, tile: int, pad: int, decoder: bool) -> tuple[list[Box], list[Box]]:
    """Input boxes (input pixels) and output boxes (output pixels, x8 for the decoder, //8 for the encoder).

    Boxes are ``(x1, x2, y1, y2)``, row-major (all tiles of the first row first).
    """
    scale = (lambda v: v * 8) if decoder else (lambda v: v // 8)
    in_boxes, out_boxes = [], []
    for iy, vy in _axis_spans(height, tile, pad):
        for ix, vx in _axis_spans(width, tile, pad):
            in_boxes.append((*ix, *iy))
            out_boxes.append((scale(vx[0]), scale(vx[1]), scale(vy[0]), scale(vy[1])))
    if not decoder and any(x1 % 8 or y1 % 8 for x1, _, y1, _ in in_boxes):
        # the reference crashes here too (its crop no longer fits the output box)
        raise ValueError(f"encoder tiles of {tile} px with pad {pad} are not aligned to the 8 px latent grid")
    return in_boxes, out_boxes


# ----------------------------------------------------------------------------------------- per-tile programs
class _Tile:
    """The state of one tile: its current activation ``h`` and where stashed residuals are kept."""

    def __init__(self, h: Tensor, store: torch.device):
        self.h: Tensor | None = h
        self.store = store

    def stash(self, t: Tensor) -> Tensor:
        return t.to(self.store)

    def fetch(self, t: Tensor) -> Tensor:
        assert self.h is not None
        return t.to(self.h.device)


def _resnet(block: nn.Module, t: _Tile) -> TileProgram:
    """diffusers ``ResnetBlock2D`` without time embedding."""
    res = t.stash(t.h if block.conv_shortcut is None else block.conv_shortcut(t.h))
    yield block.norm1
    t.h = block.conv1(block.nonlinearity(t.h))
    yield block.norm2
    t.h = block.conv2(block.dropout(block.nonlinearity(t.h)))
    t.h = (t.fetch(res) + t.h) / block.output_scale_factor


def _attention(attn: nn.Module, t: _Tile) -> TileProgram:
    """diffusers VAE mid-block ``Attention`` (self-attention over the tile's own pixels, residual)."""
    res = t.stash(t.h)
    yield attn.group_norm
    b, c, h, w = t.h.shape
    x = t.h.flatten(2).transpose(1, 2)
    q, k, v = (
        p(x).unflatten(-1, (attn.heads, -1)).transpose(1, 2) for p in (attn.to_q, attn.to_k, attn.to_v)
    )
    x = F.scaled_dot_product_attention(q, k, v).transpose(1, 2).flatten(2)
    x = attn.to_out[1](attn.to_out[0](x)).transpose(1, 2).reshape(b, c, h, w)
    t.h = (x + t.fetch(res)) / attn.rescale_output_factor


def _mid(mid: nn.Module, t: _Tile) -> TileProgram:
    yield from _resnet(mid.resnets[0], t)
    for attn, resnet in zip(mid.attentions, mid.resnets[1:], strict=True):
        if attn is not None:
            yield from _attention(attn, t)
        yield from _resnet(resnet, t)


def _encoder(enc: Encoder, t: _Tile) -> TileProgram:
    t.h = enc.conv_in(t.h)
    for block in enc.down_blocks:
        for resnet in block.resnets:
            yield from _resnet(resnet, t)
        for down in block.downsamplers or ():
            t.h = down(t.h)
    yield from _mid(enc.mid_block, t)
    yield enc.conv_norm_out
    t.h = enc.conv_out(enc.conv_act(t.h))


def _decoder(dec: Decoder, t: _Tile) -> TileProgram:
    t.h = dec.conv_in(t.h)
    yield from _mid(dec.mid_block, t)
    for block in dec.up_blocks:
        for resnet in block.resnets:
            yield from _resnet(resnet, t)
        for up in block.upsamplers or ():
            t.h = up(t.h)
    yield dec.conv_norm_out
    t.h = dec.conv_out(dec.conv_act(t.h))


def _check_supported(net: nn.Module) -> None:
    """The programs above cover the plain SD-style VAE; refuse anything they would silently get wrong."""
    blocks = [*getattr(net, "down_blocks", ()), *getattr(net, "up_blocks", ())]
    if any(getattr(b, "attentions", None) for b in blocks) or not isinstance(net.conv_norm_out, nn.GroupNorm):
        raise NotImplementedError(
            f"tiled VAE supports plain GroupNorm VAEs only, not this {type(net).__name__}"
        )
    for m in net.modules():
        if getattr(m, "time_emb_proj", None) is not None or getattr(m, "spatial_norm", None) is not None:
            raise NotImplementedError("tiled VAE: time embedding / spatial norm are not supported")


# -------------------------------------------------------------------------------------------- GroupNorm sync
def _group_stats(h: Tensor, groups: int) -> tuple[Tensor, Tensor]:
    """Per (sample, group) biased variance and mean, in float32; shape ``[B, groups]`` each."""
    var, mean = torch.var_mean(h.float().reshape(h.shape[0], groups, -1), dim=-1, correction=0)
    return var, mean


def _combine(stats: Sequence[tuple[Tensor, Tensor, int]]) -> tuple[Tensor, Tensor]:
    """Pixel-count-weighted average of the tiles' variances and means (the reference's formula)."""
    pixels = torch.tensor([p for _, _, p in stats], dtype=torch.float32, device=stats[0][0].device)
    weights = (pixels / pixels.max()) / (pixels / pixels.max()).sum()
    var = (torch.stack([v for v, _, _ in stats]) * weights[:, None, None]).sum(0)
    mean = (torch.stack([m for _, m, _ in stats]) * weights[:, None, None]).sum(0)
    return var, mean


def _apply_norm(h: Tensor, norm: nn.GroupNorm, var: Tensor, mean: Tensor) -> Tensor:
    """GroupNorm of ``h`` with given statistics, folded into one per-channel scale and shift (float32)."""
    per_group = h.shape[1] // norm.num_groups
    scale = torch.rsqrt(var + norm.eps).repeat_interleave(per_group, dim=1)  # [B, C]
    shift = -mean.repeat_interleave(per_group, dim=1) * scale
    if norm.affine:
        scale, shift = scale * norm.weight.float(), shift * norm.weight.float() + norm.bias.float()
    return torch.addcmul(shift[..., None, None], h, scale[..., None, None]).to(h.dtype)


# ---------------------------------------------------------------------------------------------------- driver
def _run_tiles(
    program: Callable[[_Tile], TileProgram],
    x: Tensor,
    in_boxes: Sequence[Box],
    out_boxes: Sequence[Box],
    out_hw: tuple[int, int],
    decoder: bool,
    offload: bool,
    *,
    record: NormStats | None = None,
    replay: NormStats | None = None,
) -> Tensor:
    """Run the tiles and paste their valid regions into the output.

    Without ``replay`` all tiles advance in lockstep and each GroupNorm applies the statistics combined over all
    tiles (appended to ``record`` when given). With ``replay`` the tiles run one at a time, start to finish, and
    the k-th GroupNorm applies ``replay[k]``, so only one tile's activations are alive; nothing is parked then.
    """
    device = x.device
    store = torch.device("cpu") if offload and replay is None else device
    out: Tensor | None = None
    everything = list(range(len(in_boxes)))
    for batch in [everything] if replay is None else [[i] for i in everything]:
        tiles = {}
        for i in batch:
            x1, x2, y1, y2 = in_boxes[i]
            tiles[i] = _Tile(x[:, :, y1:y2, x1:x2], store)
        programs = {i: program(t) for i, t in tiles.items()}
        pending = None  # (norm, var, mean) that every tile applies when it is next visited
        order, k = batch, 0
        while True:
            stats, layer = [], None
            for i in order:
                t = tiles[i]
                t.h = t.h.to(device)
                if pending is not None:
                    t.h = _apply_norm(t.h, *pending)
                step = next(programs[i], None)
                if step is None:  # finished: paste the valid region (all tiles of a batch finish in the same round)
                    if out is None:
                        out = t.h.new_zeros((x.shape[0], t.h.shape[1], *out_hw))
                    ox1, ox2, oy1, oy2 = out_boxes[i]
                    ix1, ix2, iy1, iy2 = (v * 8 if decoder else v // 8 for v in in_boxes[i])
                    # offsets from the tile's start and end, as the reference crops them
                    out[:, :, oy1:oy2, ox1:ox2] = t.h[
                        :, :, oy1 - iy1 : t.h.shape[2] + oy2 - iy2, ox1 - ix1 : t.h.shape[3] + ox2 - ix2
                    ]
                    t.h = None
                    continue
                assert layer is None or step is layer, "tiles disagree on the next GroupNorm"
                layer = step
                if replay is None:
                    stats.append((*_group_stats(t.h, step.num_groups), t.h.shape[2] * t.h.shape[3]))
                if i != order[-1]:  # the last tile of this round is the first of the next one: keep it
                    t.h = t.h.to(store)
            if layer is None:
                break
            if replay is None:
                pending = (layer, *_combine(stats))
                if record is not None:
                    record.append(pending)
            else:
                assert k < len(replay) and replay[k][0] is layer, "recorded GroupNorms do not match the program"
                pending = replay[k]
            k += 1
            order = order[::-1]
        if replay is not None:
            assert k == len(replay), "the program used fewer GroupNorms than recorded"
    assert out is not None
    return out


def _tiled(
    net: nn.Module,
    program,
    x: Tensor,
    tile_size: int,
    pad: int,
    decoder: bool,
    offload: bool | None,
    *,
    record: NormStats | None = None,
    replay: NormStats | None = None,
) -> Tensor:
    _check_supported(net)
    height, width = x.shape[2:]
    in_boxes, out_boxes = split_tiles(height, width, tile_size, pad, decoder)
    out_hw = (height * 8, width * 8) if decoder else (height // 8, width // 8)
    if offload is None:
        offload = x.device.type != "cpu"
    return _run_tiles(
        lambda t: program(net, t), x, in_boxes, out_boxes, out_hw, decoder, offload, record=record, replay=replay
    )


def _downscale(z: Tensor, size: int) -> Tensor:
    """Area-average ``z`` so that its longer side is at most ``size`` (unchanged when it already is)."""
    height, width = z.shape[2:]
    if max(height, width) <= size:
        return z
    f = size / max(height, width)
    return F.interpolate(z, size=(max(1, round(height * f)), max(1, round(width * f))), mode="area")


# ------------------------------------------------------------------------------------------------------- API
@torch.no_grad()
def tiled_decode(
    vae: AutoencoderKL,
    z: Tensor,
    tile_size: int,
    pad: int = 11,
    *,
    offload: bool | None = None,
    stats: str = "sync",
    estimate_size: int = 64,
) -> Tensor:
    """``vae.decode(z).sample`` computed tile by tile (CCSR-v1 tiled VAE decoder).

    ``z`` is the unscaled latent (already divided by the scaling factor); ``tile_size`` and ``pad`` are in
    latent pixels. Runs the plain decoder when ``max(H, W) <= 2 * pad + tile_size``. ``offload`` parks
    inactive tiles on the CPU (default: when ``z`` is not on the CPU).

    ``stats`` picks the GroupNorm statistics: ``"sync"`` (the reference's non-fast mode) synchronises all tiles,
    which keeps every tile alive at once, so memory grows with the output area. ``"estimate"`` bounds memory by
    about one tile: the statistics come from a synchronised pass over the latent area-downscaled to at most
    ``estimate_size`` latent pixels on its longer side (as the reference's fast mode estimates them), then the
    full-size tiles run one after another with those statistics; the result differs slightly from ``"sync"``.
    """
    if stats not in STATS_MODES:
        raise ValueError(f"stats must be one of {STATS_MODES}, not {stats!r}")
    if estimate_size < 1:
        raise ValueError(f"estimate_size must be >= 1, not {estimate_size}")
    if vae.post_quant_conv is not None:
        z = vae.post_quant_conv(z)
    if max(z.shape[2:]) <= 2 * pad + tile_size:
        return vae.decoder(z)
    if stats == "sync":
        return _tiled(vae.decoder, _decoder, z, tile_size, pad, True, offload)
    recorded: NormStats = []
    _tiled(vae.decoder, _decoder, _downscale(z, estimate_size), tile_size, pad, True, offload, record=recorded)
    return _tiled(vae.decoder, _decoder, z, tile_size, pad, True, offload, replay=recorded)


@torch.no_grad()
def tiled_encode(
    encoder: Encoder,
    quant_conv: nn.Module | None,
    x: Tensor,
    tile_size: int,
    pad: int = 32,
    *,
    offload: bool | None = None,
    stats: str = "sync",
    estimate_size: int = 512,
) -> Tensor:
    """``quant_conv(encoder(x))`` (the posterior moments) computed tile by tile (CCSR-v1 tiled VAE encoder).

    ``x`` is the image in [-1, 1]; ``tile_size`` and ``pad`` are in image pixels. Runs the plain encoder when
    ``max(H, W) <= 2 * pad + tile_size``. ``offload`` as in :func:`tiled_decode`. ``stats="estimate"`` (as for the
    decoder) takes the GroupNorm statistics from a pass over the image area-downscaled to ``estimate_size`` pixels,
    then encodes one tile at a time: memory bounded by about one tile (CCSR-v2 encodes the whole image, which the
    reference cannot do for large inputs).
    """
    if stats not in STATS_MODES:
        raise ValueError(f"stats must be one of {STATS_MODES}, not {stats!r}")
    if max(x.shape[2:]) <= 2 * pad + tile_size:
        h = encoder(x)
    elif stats == "sync":
        h = _tiled(encoder, _encoder, x, tile_size, pad, False, offload)
    else:
        recorded: NormStats = []
        small = _downscale(x, estimate_size)
        small = small[:, :, : small.shape[2] // 8 * 8 or 8, : small.shape[3] // 8 * 8 or 8]
        _tiled(encoder, _encoder, small, tile_size, pad, False, offload, record=recorded)
        h = _tiled(encoder, _encoder, x, tile_size, pad, False, offload, replay=recorded)
    return h if quant_conv is None else quant_conv(h)
