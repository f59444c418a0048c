"""The CCSR networks as diffusers / transformers building blocks.

Modules are built on the ``meta`` device and filled with ``load_state_dict(assign=True)``, so loading never holds a
second, randomly initialised copy of the weights.
"""

from __future__ import annotations

import contextlib
from collections.abc import Iterator, Mapping

import torch
from diffusers import AutoencoderKL, ControlNetModel, UNet2DConditionModel
from diffusers.models.autoencoders.vae import Encoder
from torch import nn
from transformers import CLIPTextConfig, CLIPTextModel

from ccsr.model.config import CCSRConfig
from ccsr.vae import lean


class CCSRControlNet(ControlNetModel):
    """diffusers ControlNet whose conditioning embedding is one 3x3 conv on the hint latent.

    CCSR-v1's first ControlNet conv sees ``cat(x_t, c_latent)``; splitting its weight into the x_t half (``conv_in``)
    and the hint half (this conv, bias zero) is exact because ``ControlNetModel`` adds the two outputs. The same
    module carries CCSR-v2's ``condition_conv_in``.
    """

    def __init__(self, **kwargs):  # type: ignore[no-untyped-def]
        super().__init__(**kwargs)
        hint_channels = kwargs.get("conditioning_channels", 4)
        first = kwargs["block_out_channels"][0]
        self.controlnet_cond_embedding = nn.Conv2d(hint_channels, first, kernel_size=3, padding=1)


class ConditionEncoder(nn.Module):
    """CCSR-v1's own copy of the VAE encoder: LQ image in [0, 1] -> posterior mode x scale factor."""

    def __init__(self, cfg: CCSRConfig):
        super().__init__()
        v = cfg.vae
        self.encoder = Encoder(
            in_channels=v["in_channels"],
            out_channels=v["latent_channels"],
            down_block_types=v["down_block_types"],
            block_out_channels=v["block_out_channels"],
            layers_per_block=v["layers_per_block"],
            norm_num_groups=v["norm_num_groups"],
            double_z=True,
        )
        self.quant_conv = nn.Conv2d(2 * v["latent_channels"], 2 * v["latent_channels"], 1)
        self.latent_channels = v["latent_channels"]
        self.scale_factor = cfg.scale_factor

    def forward(self, image01: torch.Tensor) -> torch.Tensor:
        """Float32 pixels in, the hint latent in this module's dtype out."""
        x = (image01 * 2 - 1).to(self.quant_conv.weight.dtype)
        moments = self.quant_conv(lean.encode(self.encoder, x))
        return moments[:, : self.latent_channels] * self.scale_factor


def text_model_config(cfg: CCSRConfig) -> CLIPTextConfig:
    t = cfg.text
    return CLIPTextConfig(
        vocab_size=t.vocab_size,
        hidden_size=t.width,
        intermediate_size=4 * t.width,
        num_hidden_layers=t.used_layers,
        num_attention_heads=t.heads,
        max_position_embeddings=t.context_length,
        hidden_act="gelu",
        layer_norm_eps=1e-5,
        projection_dim=t.width,
        pad_token_id=0,
        bos_token_id=49406,
        eos_token_id=49407,
    )


@contextlib.contextmanager
def _on_meta() -> Iterator[None]:
    with torch.device("meta"):
        yield


def build_empty(cfg: CCSRConfig, *, with_text: bool = True) -> dict[str, nn.Module]:
    """Instantiate every network without allocating weights."""
    with _on_meta():
        modules: dict[str, nn.Module] = {
            "unet": UNet2DConditionModel(**cfg.unet),
            "controlnet": CCSRControlNet(**cfg.controlnet),
            "vae": AutoencoderKL(**cfg.vae),
            "cond_encoder": ConditionEncoder(cfg),
        }
        if with_text:
            modules["text_encoder"] = CLIPTextModel(text_model_config(cfg))
    return modules


def fill(module: nn.Module, state: Mapping[str, torch.Tensor], dtype: torch.dtype | None = None) -> nn.Module:
    """Assign real tensors to a meta-built module (strict) and materialise derived buffers."""
    if dtype is not None:
        state = {k: v.to(dtype) if v.is_floating_point() else v for k, v in state.items()}
    module.load_state_dict(state, strict=True, assign=True)
    for name, buf in list(module.named_buffers()):
        if buf.is_meta:
            owner_name, _, attr = name.rpartition(".")
            owner = module.get_submodule(owner_name) if owner_name else module
            if attr == "position_ids":
                owner.register_buffer(attr, torch.arange(buf.shape[-1]).expand(buf.shape), persistent=False)
            else:
                raise RuntimeError(f"buffer {name} was not filled by the checkpoint")
    return module.eval().requires_grad_(False)


def expected_keys(modules: Mapping[str, nn.Module]) -> dict[str, set[str]]:
    return {name: set(m.state_dict().keys()) for name, m in modules.items()}
