"""The CCSR epsilon model: ControlNet on (x_t, hint latent) + UNet, with CFG and ControlNet weight."""

from __future__ import annotations

from collections.abc import Callable

import torch
from torch import nn

from ccsr.sampling.tiles import Window

Tensor = torch.Tensor


class CCSRDenoiser:
    """Callable ``(x, t, window) -> eps`` for :func:`ccsr.sampling.ccsr_v1.sample_ccsr_v1`.

    ``condition(window)`` returns the condition image's pixels for a window (or the whole image for None) on the
    device, in [0, 1]; the full image itself can stay on the host. The hint latent of a window is the condition
    encoder run on that window's pixels (not a crop of the full-image
    latent: the reference re-encodes per tile and border effects differ). It is deterministic, so it is computed
    once per window and reused at every step. Classifier-free guidance runs cond and uncond as one batch.

    Dtypes: ``x``, the contexts and the condition pixels are float32. The UNet and ControlNet get theirs in the
    UNet's dtype; the condition encoder casts its pixels to its own (which may differ:
    ``ModelDescriptor.network_dtypes``); eps is returned in ``x``'s dtype, so the sampler's arithmetic is float32
    whatever the networks run in.
    """

    def __init__(
        self,
        unet: nn.Module,
        controlnet: nn.Module,
        cond_encoder: Callable[[Tensor], Tensor],
        condition: Callable[[Window | None], Tensor],
        context: Tensor,
        *,
        uncond_context: Tensor | None = None,
        cfg_scale: float = 1.0,
        control_scale: float = 1.0,
    ):
        self.unet, self.controlnet, self.cond_encoder = unet, controlnet, cond_encoder
        self.condition = condition
        self.cfg = uncond_context is not None and cfg_scale != 1.0
        self.cfg_scale = cfg_scale
        self.dtype = next(unet.parameters()).dtype  # the ControlNet's too: its residuals add to the UNet's features
        self.context = (torch.cat([uncond_context, context]) if self.cfg else context).to(self.dtype)
        self.control_scale = control_scale
        self._hints: dict[Window | None, Tensor] = {}

    def hint(self, window: Window | None) -> Tensor:
        if window not in self._hints:
            self._hints[window] = self.cond_encoder(self.condition(window)).to(self.dtype)
        return self._hints[window]

    def __call__(self, x: Tensor, t: int, window: Window | None) -> Tensor:
        hint = self.hint(window).expand(x.shape[0], -1, -1, -1)
        xin = x.to(self.dtype)
        if self.cfg:
            xin, hint = torch.cat([xin, xin]), torch.cat([hint, hint])
        ctx = self.context.repeat_interleave(x.shape[0], dim=0)
        ts = torch.full((xin.shape[0],), t, dtype=torch.long, device=x.device)
        down, mid = self.controlnet(
            xin, ts, encoder_hidden_states=ctx, controlnet_cond=hint,
            conditioning_scale=self.control_scale, return_dict=False,
        )
        eps = self.unet(
            xin, ts, encoder_hidden_states=ctx,
            down_block_additional_residuals=down, mid_block_additional_residual=mid,
        ).sample.to(x.dtype)
        if self.cfg:
            uncond, cond = eps.chunk(2)
            eps = uncond + self.cfg_scale * (cond - uncond)
        return eps
