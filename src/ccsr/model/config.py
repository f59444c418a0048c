"""Model configuration: the original LDM yaml read into plain data for the diffusers building blocks.

The released checkpoint comes with an LDM-style yaml (``configs/model/ccsr_stage2.yaml``); we accept that format
as input and translate it once into the keyword arguments of ``UNet2DConditionModel``, ``ControlNetModel``,
``AutoencoderKL`` and ``CLIPTextConfig``. Nothing here imports a model class.
"""

from __future__ import annotations

import dataclasses
import json
from dataclasses import dataclass, field
from importlib import resources
from pathlib import Path
from typing import Any

import yaml

DEFAULT_CONFIG_NAME = "ccsr_v1.yaml"

# OpenCLIP text towers whose head count cannot be read off the weights (width / heads is not stored).
_KNOWN_TEXT_ARCHS: dict[str, dict[str, int]] = {
    "ViT-H-14": {"width": 1024, "heads": 16, "layers": 24, "context_length": 77, "vocab_size": 49408},
    "ViT-bigG-14": {"width": 1280, "heads": 20, "layers": 32, "context_length": 77, "vocab_size": 49408},
    "ViT-L-14": {"width": 768, "heads": 12, "layers": 12, "context_length": 77, "vocab_size": 49408},
}


class ConfigError(ValueError):
    """The model config cannot be read or does not describe a CCSR-v1 model."""


@dataclass(frozen=True)
class TextConfig:
    """OpenCLIP text tower, as the ``FrozenOpenCLIPEmbedder`` runs it."""

    width: int
    heads: int
    layers: int
    context_length: int = 77
    vocab_size: int = 49408
    skip_last_layers: int = 1  # "penultimate": the last resblock is not run

    @property
    def used_layers(self) -> int:
        return self.layers - self.skip_last_layers


@dataclass(frozen=True)
class CCSRConfig:
    """Everything needed to build the networks and the diffusion schedule."""

    unet: dict[str, Any]
    controlnet: dict[str, Any]
    vae: dict[str, Any]
    text: TextConfig
    scale_factor: float = 0.18215
    linear_start: float = 0.00085
    linear_end: float = 0.0120
    num_timesteps: int = 1000
    source: str = field(default="", compare=False)

    def to_dict(self) -> dict[str, Any]:
        """Plain data (JSON-ready): a converted weights folder carries its config this way."""
        d = dataclasses.asdict(self)
        d.pop("source")
        return d

    @classmethod
    def from_dict(cls, d: dict[str, Any], source: str = "") -> CCSRConfig:
        def tuples(kw: dict[str, Any]) -> dict[str, Any]:
            return {k: tuple(v) if isinstance(v, list) else v for k, v in kw.items()}

        try:
            return cls(unet=tuples(d["unet"]), controlnet=tuples(d["controlnet"]), vae=tuples(d["vae"]),
                       text=TextConfig(**d["text"]), scale_factor=d["scale_factor"],
                       linear_start=d["linear_start"], linear_end=d["linear_end"],
                       num_timesteps=d["num_timesteps"], source=source)
        except (KeyError, TypeError) as exc:
            raise ConfigError(f"{source or 'config'}: malformed model config ({exc})") from exc

    @property
    def latent_channels(self) -> int:
        return int(self.vae["latent_channels"])

    @property
    def vae_downscale(self) -> int:
        return 2 ** (len(self.vae["block_out_channels"]) - 1)


def _unet_kwargs(p: dict[str, Any], *, controlnet: bool) -> dict[str, Any]:
    mc = int(p["model_channels"])
    mult = [int(m) for m in p["channel_mult"]]
    attn_res = {int(r) for r in p.get("attention_resolutions", [])}
    block_out = [mc * m for m in mult]
    has_attn = [2**i in attn_res for i in range(len(mult))]
    if "num_head_channels" in p and int(p["num_head_channels"]) > 0:
        heads = [c // int(p["num_head_channels"]) for c in block_out]
    else:
        heads = [int(p["num_heads"])] * len(mult)
    down = ["CrossAttnDownBlock2D" if a else "DownBlock2D" for a in has_attn]
    kwargs: dict[str, Any] = {
        "in_channels": int(p["in_channels"]),
        "block_out_channels": tuple(block_out),
        "down_block_types": tuple(down),
        "layers_per_block": int(p["num_res_blocks"]),
        # diffusers historically calls the head count "attention_head_dim" for SD-2 UNets.
        "attention_head_dim": tuple(heads),
        "cross_attention_dim": int(p["context_dim"]),
        "use_linear_projection": bool(p.get("use_linear_in_transformer", False)),
        "transformer_layers_per_block": int(p.get("transformer_depth", 1)),
        "flip_sin_to_cos": True,
        "freq_shift": 0,
        "norm_num_groups": 32,
        "upcast_attention": False,
    }
    if controlnet:
        kwargs["conditioning_channels"] = int(p.get("hint_channels", 4))
    else:
        up = ["CrossAttnUpBlock2D" if a else "UpBlock2D" for a in reversed(has_attn)]
        kwargs.update(out_channels=int(p["out_channels"]), up_block_types=tuple(up), sample_size=64)
    return kwargs


def _vae_kwargs(p: dict[str, Any], scale_factor: float) -> dict[str, Any]:
    dd = p["ddconfig"]
    if dd.get("attn_resolutions"):
        raise ConfigError("VAE attention outside the mid block (attn_resolutions) is not supported")
    n = len(dd["ch_mult"])
    return {
        "in_channels": int(dd["in_channels"]),
        "out_channels": int(dd["out_ch"]),
        "down_block_types": ("DownEncoderBlock2D",) * n,
        "up_block_types": ("UpDecoderBlock2D",) * n,
        "block_out_channels": tuple(int(dd["ch"]) * int(m) for m in dd["ch_mult"]),
        "layers_per_block": int(dd["num_res_blocks"]),
        "latent_channels": int(p["embed_dim"]),
        "norm_num_groups": 32,
        "scaling_factor": scale_factor,
        "sample_size": 512,
    }


def _text_config(p: dict[str, Any], config_dir: Path | None) -> TextConfig:
    arch = p.get("arch", "ViT-H-14")
    layer = p.get("layer", "penultimate")
    skip = {"penultimate": 1, "last": 0}.get(layer)
    if skip is None:
        raise ConfigError(f"unsupported text layer {layer!r} (expected 'penultimate' or 'last')")
    spec = _KNOWN_TEXT_ARCHS.get(arch)
    if spec is None and config_dir is not None:
        for candidate in (config_dir / "open_clip_config" / f"{arch}.json", config_dir / f"{arch}.json"):
            if candidate.is_file():
                text_cfg = json.loads(candidate.read_text())["text_cfg"]
                spec = {
                    "width": text_cfg["width"],
                    "heads": text_cfg["heads"],
                    "layers": text_cfg["layers"],
                    "context_length": text_cfg.get("context_length", 77),
                    "vocab_size": text_cfg.get("vocab_size", 49408),
                }
                break
    if spec is None:
        raise ConfigError(
            f"unknown OpenCLIP text arch {arch!r}: put its open_clip JSON config next to the yaml "
            f"(open_clip_config/{arch}.json)"
        )
    return TextConfig(skip_last_layers=skip, **spec)


def parse_config(data: dict[str, Any], config_dir: Path | None = None, source: str = "") -> CCSRConfig:
    """Translate an LDM ``ControlLDM`` config (already parsed yaml) into a :class:`CCSRConfig`."""
    try:
        p = data["params"]
        scale_factor = float(p.get("scale_factor", 0.18215))
        unet_p = p["unet_config"]["params"]
        control_p = p["control_stage_config"]["params"]
        if int(control_p.get("hint_channels", 4)) != int(p["first_stage_config"]["params"]["embed_dim"]):
            raise ConfigError("the ControlNet hint must be a VAE latent (hint_channels == embed_dim)")
        return CCSRConfig(
            unet=_unet_kwargs(unet_p, controlnet=False),
            controlnet=_unet_kwargs(control_p, controlnet=True),
            vae=_vae_kwargs(p["first_stage_config"]["params"], scale_factor),
            text=_text_config(p.get("cond_stage_config", {}).get("params", {}), config_dir),
            scale_factor=scale_factor,
            linear_start=float(p.get("linear_start", 0.00085)),
            linear_end=float(p.get("linear_end", 0.0120)),
            num_timesteps=int(p.get("timesteps", 1000)),
            source=source,
        )
    except (KeyError, TypeError) as exc:
        raise ConfigError(f"{source or 'config'}: not a CCSR ControlLDM config (missing {exc})") from exc


def load_config(path: str | Path | None = None) -> CCSRConfig:
    """Read a yaml config from ``path``, or the built-in CCSR-v1 (SD-2.1) config when None."""
    if path is None:
        text = resources.files("ccsr.configs").joinpath(DEFAULT_CONFIG_NAME).read_text()
        return parse_config(yaml.safe_load(text), None, source=f"built-in {DEFAULT_CONFIG_NAME}")
    p = Path(path)
    if not p.is_file():
        raise ConfigError(f"config file not found: {p}")
    try:
        data = yaml.safe_load(p.read_text())
    except yaml.YAMLError as exc:
        raise ConfigError(f"{p}: model config is not valid YAML ({exc.__class__.__name__})") from exc
    if not isinstance(data, dict):
        raise ConfigError(f"{p}: not a CCSR ControlLDM config")
    return parse_config(data, p.parent, source=str(p))
