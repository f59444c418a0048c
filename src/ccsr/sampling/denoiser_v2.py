"""The CCSR-v2 epsilon model: ControlNet on (x_t, condition latent z) + UNet, raw (CFG is the sampler's)."""

from __future__ import annotations

import torch
from torch import nn

from ccsr.sampling.tiles import Window

Tensor = torch.Tensor


class CCSRv2Denoiser:
    """Callable ``(x, t, guided, window) -> eps`` for :func:`ccsr.sampling.ccsr_v2.sample_ccsr_v2`.

    ``context`` and ``z`` hold one row per CFG half (``[negative, positive]`` and the two posterior samples under
    CFG, else one row each). ``guided=False`` runs batch 1 on the first rows, as the reference's initial step does;
    ``guided=True`` runs ``x`` once per row. A window takes the same slice of the full-image ``z`` (tiles are not
    re-encoded). The ControlNet residuals are added at scale 1.0, hard-coded in the reference.
    """

    def __init__(self, unet: nn.Module, controlnet: nn.Module, context: Tensor, z: Tensor):
        if context.shape[0] != z.shape[0]:
            raise ValueError(f"context has {context.shape[0]} rows, the condition latent {z.shape[0]}")
        self.unet, self.controlnet = unet, controlnet
        self.dtype = next(unet.parameters()).dtype
        self.context, self.z = context.to(self.dtype), z

    def __call__(self, x: Tensor, t: int, guided: bool, window: Window | None) -> Tensor:
        rows = self.z.shape[0] if guided else 1
        z = self.z[:rows]
        if window is not None:
            z = z[(slice(None), slice(None), *window.latent())]
        xin = torch.cat([x.to(self.dtype)] * rows)
        ts = torch.full((rows,), t, dtype=torch.long, device=x.device)
        ctx = self.context[:rows]
        down, mid = self.controlnet(xin, ts, encoder_hidden_states=ctx, controlnet_cond=z.to(self.dtype),
                                    conditioning_scale=1.0, return_dict=False)
        return self.unet(xin, ts, encoder_hidden_states=ctx, down_block_additional_residuals=down,
                         mid_block_additional_residual=mid).sample.to(x.dtype)
