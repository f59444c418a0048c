"""Memory-lean forward passes of diffusers' VAE ``Encoder`` and ``Decoder``: the same arithmetic, half the peak.

At full resolution the VAE's activations are the largest tensors of an upscale (a 512x512 plane of 256 channels is
256 MiB in fp32), and diffusers' blocks keep three or four of them alive at once: a ResNet block holds its input,
the GroupNorm output and a separate SiLU output while the first conv allocates its result; the upsampler holds the
whole nearest-upsampled tensor beside the conv output; the downsampler a zero-padded copy of its input. Here a pass
owns its activation and runs the same kernels in an order that frees what is done:

* a ResNet block with a channel-changing shortcut runs the shortcut first, then normalises its input *in place*
  (it is no longer needed) and applies SiLU in place; GroupNorm in place goes a few groups at a time, and
  normalising a group-aligned channel slice is the same computation as normalising the whole (same statistics,
  same per-element formula, the same bits); its two 3x3 convs write their output over their input (see
  :func:`_conv`), so a block holds its input, its residual and one band;
* large convs run in row bands, each band of output rows the conv of its input rows plus the halo: oneDNN
  reorders a conv's whole input and output into its blocked layout, so a whole conv holds two more copies; the
  nearest-upsample + conv and zero-pad + stride-2 conv pairs run in bands the same way, so neither the
  upsampled nor the padded tensor ever exists in full;
* the attention mid block (at latent resolution) runs as diffusers' module.

Every element is computed by the same operations on the same values. oneDNN may choose another kernel for a band
than for the whole tensor at some shapes, which moves the last bits (as another CPU does); at the SD VAE's shapes
for 512x512 the outputs were bit-identical to diffusers' on the machine measured (bench/README.md).

Anything of another shape (a temb, spatial norm, conv-transpose upsampler, training mode) falls back to the
module's own forward, so the result is always diffusers'.
"""

from __future__ import annotations

import math

import torch
import torch.nn.functional as F
from diffusers import AutoencoderKL
from diffusers.models.autoencoders.vae import Decoder, Encoder
from diffusers.models.downsampling import Downsample2D
from diffusers.models.resnet import ResnetBlock2D
from diffusers.models.unets.unet_2d_blocks import DownEncoderBlock2D, UpDecoderBlock2D
from diffusers.models.upsampling import Upsample2D
from torch import Tensor, nn

BANDS = 8  # row bands per banded conv: its temporaries are ~1/8 of the full input
BAND_MIN = 1 << 22  # elements (16 MiB in fp32) of a conv's input (upsampled): smaller convs run whole
NORM_CHUNKS = 8  # GroupNorm in place goes 1/8 of the groups at a time


def vae_decode(vae: AutoencoderKL, z: Tensor) -> Tensor:
    """``vae.decode(z).sample`` (without diffusers' own tiling) with about half the peak memory."""
    if vae.post_quant_conv is not None:
        z = vae.post_quant_conv(z)
    return decode(vae.decoder, z)


def decode(decoder: Decoder, z: Tensor) -> Tensor:
    """``decoder(z)`` with about half the peak memory at full resolution."""
    if not _plain(decoder, decoder.conv_norm_out):
        return decoder(z)
    run = _Pass(decoder.mid_block(decoder.conv_in(z), None))
    for block in decoder.up_blocks:
        if not isinstance(block, UpDecoderBlock2D):
            run.h = block(run.take(), None)
            continue
        for resnet in block.resnets:
            run.resnet(resnet)
        for upsampler in block.upsamplers or ():
            run.upsample(upsampler)
    return run.finish(decoder.conv_norm_out, decoder.conv_act, decoder.conv_out)


def encode(encoder: Encoder, x: Tensor) -> Tensor:
    """``encoder(x)`` with about half the peak memory at full resolution."""
    if not _plain(encoder, encoder.conv_norm_out):
        return encoder(x)
    run = _Pass(encoder.conv_in(x))
    for block in encoder.down_blocks:
        if not isinstance(block, DownEncoderBlock2D):
            run.h = block(run.take())
            continue
        for resnet in block.resnets:
            run.resnet(resnet)
        for downsampler in block.downsamplers or ():
            run.downsample(downsampler)
    run.h = encoder.mid_block(run.take())
    return run.finish(encoder.conv_norm_out, encoder.conv_act, encoder.conv_out)


def _plain(net: nn.Module, norm_out: nn.Module) -> bool:
    return not net.training and isinstance(norm_out, nn.GroupNorm)


class _Pass:
    """Holds the one reference to the current activation, so a block can free its input while it runs."""

    def __init__(self, h: Tensor):
        self.h: Tensor | None = h

    def take(self) -> Tensor:
        h, self.h = self.h, None
        assert h is not None
        return h

    def resnet(self, block: nn.Module) -> None:
        x = self.take()
        if not _plain_resnet(block):
            self.h = block(x, None)
            return
        if block.conv_shortcut is not None:
            residual = _conv(block.conv_shortcut, x)
            h = _norm_act_(x, block.norm1)  # x itself is not needed any more
        else:
            residual = x
            h = F.silu(block.norm1(x), inplace=True)
        del x
        h = _conv(block.conv1, h, consume=True)
        h = _conv(block.conv2, _norm_act_(h, block.norm2), consume=True)
        out = residual.add_(h)
        del h
        if block.output_scale_factor != 1.0:
            out.div_(block.output_scale_factor)
        self.h = out

    def upsample(self, up: nn.Module) -> None:
        x = self.take()
        if not (isinstance(up, Upsample2D) and up.use_conv and up.interpolate and not up.use_conv_transpose
                and up.norm is None and up.name == "conv" and _conv3x3(up.conv, stride=1)
                and 4 * x.numel() >= BAND_MIN):
            self.h = up(x)
            return
        conv = up.conv
        n, _, height, width = x.shape
        rows = 2 * height
        out = x.new_empty((n, conv.out_channels, rows, 2 * width))
        for r0, r1 in _bands(rows):
            a, b = max(r0 - 1, 0), min(r1 + 1, rows)  # upsampled rows the band's outputs read
            band = F.interpolate(x[:, :, a // 2: (b - 1) // 2 + 1], scale_factor=2.0, mode="nearest")
            band = F.pad(band[:, :, a - 2 * (a // 2): b - 2 * (a // 2)], (0, 0, int(r0 == 0), int(r1 == rows)))
            out[:, :, r0:r1] = F.conv2d(band, conv.weight, conv.bias, padding=(0, 1))
        self.h = out

    def downsample(self, down: nn.Module) -> None:
        x = self.take()
        if not (isinstance(down, Downsample2D) and down.use_conv and down.padding == 0 and down.norm is None
                and _conv3x3(down.conv, stride=2, padding=0) and x.numel() >= BAND_MIN):
            self.h = down(x)
            return
        conv = down.conv
        n, _, height, width = x.shape
        rows = height // 2  # (height + 1 - 3) // 2 + 1 after the one-row zero pad at the bottom
        out = x.new_empty((n, conv.out_channels, rows, width // 2))
        for r0, r1 in _bands(rows):
            end = 2 * r1 + 1  # padded-input rows the band reads: [2 r0, 2 r1 + 1)
            band = F.pad(x[:, :, 2 * r0: min(end, height)], (0, 1, 0, end - min(end, height)))
            out[:, :, r0:r1] = F.conv2d(band, conv.weight, conv.bias, stride=2)
        self.h = out

    def finish(self, norm: nn.Module, act: nn.Module, conv: nn.Module) -> Tensor:
        h = self.take()
        if isinstance(act, nn.SiLU):
            return _conv(conv, _norm_act_(h, norm))
        return conv(act(norm(h)))


def _plain_resnet(block: nn.Module) -> bool:
    return (isinstance(block, ResnetBlock2D) and not block.training and block.upsample is None
            and block.downsample is None and block.time_emb_proj is None and block.time_embedding_norm != "scale_shift"
            and isinstance(block.nonlinearity, nn.SiLU)
            and isinstance(block.norm1, nn.GroupNorm) and isinstance(block.norm2, nn.GroupNorm))


def _conv3x3(conv: nn.Module, *, stride: int, padding: int = 1) -> bool:
    return (isinstance(conv, nn.Conv2d) and conv.kernel_size == (3, 3) and conv.stride == (stride, stride)
            and conv.padding == (padding, padding) and conv.dilation == (1, 1) and conv.groups == 1
            and conv.padding_mode == "zeros")


def _conv(conv: nn.Module, x: Tensor, *, consume: bool = False) -> Tensor:
    """``conv(x)`` for a stride-1 'same' conv, in row bands when ``x`` is large: oneDNN reorders a conv's whole
    input and output into its blocked layout, so a whole conv holds two extra copies of them.

    With ``consume`` (the caller drops ``x``) and no more output than input channels, the output is written over
    ``x`` itself, band after band from the top: output channel k's rows land on input channel k's rows, which
    only the next band's halo still needs, so those rows are kept aside before they are overwritten.
    """
    if not (isinstance(conv, nn.Conv2d) and x.numel() >= BAND_MIN and _same(conv)):
        return conv(x)
    pad = conv.padding[0]
    n, channels, rows, width = x.shape
    in_place = consume and n == 1 and conv.out_channels <= channels and x.is_contiguous()
    if in_place:
        out = x.view(-1)[: conv.out_channels * rows * width].view(1, conv.out_channels, rows, width)
    else:
        out = x.new_empty((n, conv.out_channels, rows, width))
    above: Tensor | None = None  # input rows [r0 - pad, r0) as they were before the last band overwrote them
    for r0, r1 in _bands(rows):
        a, b = max(r0 - pad, 0), min(r1 + pad, rows)
        band = x[:, :, a:b] if above is None else torch.cat([above, x[:, :, r0:b]], dim=2)
        if pad:
            band = F.pad(band, (0, 0, a - (r0 - pad), (r1 + pad) - b))
        result = F.conv2d(band, conv.weight, conv.bias, padding=(0, conv.padding[1]))
        if in_place and pad:
            above = x[:, :, max(r1 - pad, 0):r1].clone()
        out[:, :, r0:r1] = result
    return out


def _same(conv: nn.Conv2d) -> bool:
    k = conv.kernel_size[0]
    return (conv.stride == (1, 1) and conv.dilation == (1, 1) and conv.groups == 1 and conv.padding_mode == "zeros"
            and k % 2 == 1 and conv.padding == (k // 2, conv.padding[1]))


def _bands(rows: int) -> list[tuple[int, int]]:
    size = max(1, math.ceil(rows / BANDS))
    return [(r0, min(rows, r0 + size)) for r0 in range(0, rows, size)]


def _norm_act_(h: Tensor, norm: nn.GroupNorm) -> Tensor:
    """``silu(norm(h))`` written into ``h``."""
    if h.shape[0] != 1 or not h.is_contiguous():
        return F.silu(norm(h), inplace=True)  # the slice trick below needs one image in NCHW order
    per_group = norm.num_channels // norm.num_groups
    step = max(1, norm.num_groups // NORM_CHUNKS) * per_group
    for c0 in range(0, norm.num_channels, step):
        c1 = min(norm.num_channels, c0 + step)
        weight = None if norm.weight is None else norm.weight[c0:c1]
        bias = None if norm.bias is None else norm.bias[c0:c1]
        h[:, c0:c1] = F.group_norm(h[:, c0:c1], (c1 - c0) // per_group, weight, bias, norm.eps)
    return F.silu(h, inplace=True)


__all__ = ["decode", "encode", "vae_decode"]
