"""The CCSR model: networks, text conditioning and a self-description, loaded from any supported source."""

from __future__ import annotations

import json
import weakref
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch
from safetensors.torch import save_file
from torch import nn

from ccsr.model.components import build_empty, expected_keys, fill
from ccsr.model.config import CCSRConfig, ConfigError, load_config
from ccsr.model.convert import TEXT_PREFIX, CheckpointKeyError, split_checkpoint
from ccsr.model.loading import (
    CONVERTED_FORMAT,
    CONVERTED_INDEX,
    DEFAULT_WEIGHTS,
    WeightsError,
    is_converted,
    read_checkpoint,
    read_component,
    read_converted_index,
    resolve_weights,
)
from ccsr.model.text import TextConditioner

__all__ = [
    "DEFAULT_WEIGHTS",
    "CCSRConfig",
    "CCSRModel",
    "CheckpointKeyError",
    "ConfigError",
    "MemoryProfile",
    "ModelDescriptor",
    "WeightsError",
    "load_config",
    "load_model",
    "share_identical_networks",
]

NETWORKS = ("unet", "controlnet", "vae", "cond_encoder")
DTYPE_NAMES = {torch.float32: "float32", torch.float16: "float16", torch.bfloat16: "bfloat16"}


@dataclass(frozen=True)
class MemoryProfile:
    """Working memory of each network, in bytes per pixel, beyond the weights (fp32; halve for 16-bit).

    Measured on the CPU for the SD-2.1-size CCSR-v1 networks with random weights (peak RSS above the weights at
    several sizes; see bench/README.md) and scaled by the first block's width for other configs.
    """

    eval_per_latent_px: float  # UNet + ControlNet, one batch item, per latent pixel
    hint_per_px: float  # condition encoder (a VAE encoder) per image pixel
    decode_per_px: float  # untiled VAE decoder per output pixel

    @classmethod
    def for_widths(cls, unet_width: int, vae_width: int) -> MemoryProfile:
        # hint, decode: ccsr.vae.lean's passes, +313 and +482 MiB at 512x512 for width 128 (bench/results/
        # vae_passes_512.json), with 12 % and 19 % margin
        return cls(eval_per_latent_px=150.0 * unet_width, hint_per_px=11.0 * vae_width,
                   decode_per_px=18.0 * vae_width)


@dataclass(frozen=True)
class ModelDescriptor:
    """What callers need to know about the model instead of guessing (spandrel-style)."""

    name: str
    parameters: int
    latent_channels: int
    latent_factor: int  # image pixels per latent pixel
    size_multiple: int  # processing sizes are multiples of this (three UNet downsamplings of the latent)
    min_tile_latent: int  # smallest diffusion tile whose deepest level GroupNorm can normalise
    native_size: int = 512  # the image size it was trained at: the preferred diffusion tile
    memory: MemoryProfile = field(default_factory=lambda: MemoryProfile.for_widths(320, 128))
    scale_range: tuple[float, float] = (1.0, 4.0)
    supports_tiling: bool = True
    supports_prompts: bool = True
    dtypes: tuple[str, ...] = ("float32", "float16", "bfloat16")
    defaults: Mapping[str, object] = field(default_factory=dict)  # parameters that differ from UpscaleParams'
    presets: Mapping[str, Mapping[str, object]] = field(default_factory=dict)  # documented starting points
    # Networks that run in float32 when float16 is asked for: the SD VAE is known to overflow float16's range
    # (Inf/NaN images), and the condition encoder is a copy of its encoder. bfloat16 has float32's range.
    float16_overflows: tuple[str, ...] = ("vae", "cond_encoder")

    def network_dtypes(self, dtype: torch.dtype) -> dict[str, torch.dtype]:
        """The dtype each network (``unet``, ``controlnet``, ``vae``, ``cond_encoder``, ``text_encoder``) runs in
        when ``dtype`` is asked for. Everything between the networks stays float32 whatever the dtype: the
        sampler's latents, noise and schedule, the condition pixels, the text context, the colour fix and the
        decoded image; each network casts its input to its own dtype and its output is taken back as float32."""
        if DTYPE_NAMES.get(dtype) not in self.dtypes:
            raise ValueError(f"{self.name} does not run in {dtype} (supported: {', '.join(self.dtypes)})")
        names = (*NETWORKS, "text_encoder")
        return {n: torch.float32 if dtype == torch.float16 and n in self.float16_overflows else dtype for n in names}


def share_identical_networks(models: Sequence[Any]) -> list[tuple[str, int, int]]:
    """Hold a network once where two loaded models have it with identical tensors (same class, names, shapes,
    dtypes, devices and values): the later model's attribute is pointed at the earlier model's module. A server
    loading CCSR-v1 and CCSR-v2 keeps one UNet if both checkpoints carry the same one.

    The text encoders too (``text_encoder``), compared by content when their architectures are the same (CCSR-v1's
    OpenCLIP tower, run to its penultimate layer, is a 23-layer ``CLIPTextModel`` like SD-2.1-base's): both models
    then build and hold one encoder, on demand as before (each frees its reference when it has its prompts cached).
    The comparison builds both encoders once, at load. Returns what was shared: (network name, index of the model
    that holds it, index of the model that now uses it)."""
    shared: list[tuple[str, int, int]] = []
    for j, later in enumerate(models):
        text_shared = False
        for i, earlier in enumerate(models[:j]):
            for name, module in later.networks().items():
                held = earlier.networks().get(name)
                if held is not None and held is not module and _identical(held, module):
                    setattr(later, name, held)
                    shared.append((name, i, j))
            if not text_shared and _share_text(earlier.text, later.text):
                text_shared = True
                shared.append(("text_encoder", i, j))
    return shared


def _share_text(earlier: Any, later: Any) -> bool:
    """Point both prompt encoders at one lazily built text encoder if theirs are the same computation."""
    arch = earlier.architecture()
    if arch is None or arch != later.architecture() or (earlier.device, earlier.dtype) != (later.device, later.dtype):
        return False
    a, b = earlier.build_encoder(), later.build_encoder()
    kernels = (getattr(m.config, "_attn_implementation", None) for m in (a, b))  # as built: sdpa, eager...
    if len(set(kernels)) != 1 or not _identical(a, b):
        return False
    build = held_once(earlier.build_encoder)
    earlier.share_encoder(build)
    later.share_encoder(build)
    return True


def held_once(build: Callable[[], nn.Module]) -> Callable[[], nn.Module]:
    """``build``, but while a module it built is still held by someone, that module again instead of a new one."""
    last: weakref.ref[nn.Module] | None = None

    def get() -> nn.Module:
        nonlocal last
        module = last() if last is not None else None
        if module is None:
            module = build()
            last = weakref.ref(module)
        return module

    return get


def _identical(a: nn.Module, b: nn.Module) -> bool:
    if type(a) is not type(b):
        return False
    sa, sb = a.state_dict(), b.state_dict()
    if sa.keys() != sb.keys():
        return False
    return all(x.shape == y.shape and x.dtype == y.dtype and x.device == y.device and torch.equal(x, y)
               for x, y in ((sa[k], sb[k]) for k in sa))


@dataclass
class CCSRModel:
    """The loaded networks. ``text`` is lazy: the text encoder is only built when a non-empty prompt needs it."""

    config: CCSRConfig
    unet: nn.Module
    controlnet: nn.Module
    vae: nn.Module
    cond_encoder: nn.Module
    text: TextConditioner
    source: str = ""
    descriptor: ModelDescriptor = field(init=False)

    def __post_init__(self) -> None:
        n = sum(p.numel() for m in self.networks().values() for p in m.parameters())
        levels = len(self.config.unet["block_out_channels"])
        self.descriptor = ModelDescriptor(
            name="CCSR-v1",
            parameters=n,
            latent_channels=self.config.latent_channels,
            latent_factor=self.config.vae_downscale,
            size_multiple=self.config.vae_downscale * 2 ** (levels - 1),
            min_tile_latent=2 ** (levels - 1) * 2,
            memory=MemoryProfile.for_widths(self.config.unet["block_out_channels"][0],
                                            self.config.vae["block_out_channels"][0]),
        )

    def release_unused(self) -> None:
        """Free what upscaling never runs: the VAE's own encoder and quant conv (34 M parameters, 130 MiB in fp32).
        CCSR-v1 encodes the condition with its separate, fine-tuned copy (``cond_encoder``)."""
        self.vae.encoder = None
        self.vae.quant_conv = None

    def networks(self) -> dict[str, nn.Module]:
        return {name: getattr(self, name) for name in NETWORKS}

    def to(self, device: torch.device | str, dtype: torch.dtype) -> CCSRModel:
        """Move every network to ``device``, in the dtype the descriptor gives it for ``dtype``."""
        dtypes = self.descriptor.network_dtypes(dtype)
        for name, module in self.networks().items():
            current = next(module.parameters())
            if current.dtype != dtypes[name] or current.device != torch.device(device):
                # nn.Module.to itself: diffusers' override warns about fp32-only modules, which these have none of
                nn.Module.to(module, device=device, dtype=dtypes[name])
        self.text.to(device, dtypes["text_encoder"])
        return self


def _model_from_state(
    cfg: CCSRConfig, parts: dict[str, dict[str, torch.Tensor]], text: TextConditioner, source: str
) -> CCSRModel:
    modules = build_empty(cfg, with_text=False)
    for name, module in modules.items():
        fill(module, parts[name])
    return CCSRModel(cfg, text=text, source=source, **modules)


def load_model(weights: str | Path | None = None, config: str | Path | None = None) -> CCSRModel:
    """Load from an LDM checkpoint (with its yaml, or the built-in CCSR-v1 config) or a converted folder."""
    explicit_cfg = load_config(config) if config else None  # a bad --config fails before any download
    path = resolve_weights(weights)
    if is_converted(path):
        index = read_converted_index(path)
        cfg = explicit_cfg or CCSRConfig.from_dict(index["config"], source=str(path))
        parts = {name: read_component(path, name) for name in NETWORKS}
        text = TextConditioner.from_converted(cfg, path)
        return _model_from_state(cfg, parts, text, str(path))
    if path.is_dir():
        raise WeightsError(f"{path}: a folder, but not one written by `ccsr convert` (no {CONVERTED_INDEX})")
    cfg = explicit_cfg or load_config(None)
    sd = read_checkpoint(path)
    expected = expected_keys(build_empty(cfg, with_text=True))
    parts = split_checkpoint(sd, cfg, expected, source=str(path))
    del sd

    def reload_text() -> dict[str, torch.Tensor]:
        """Re-read only the text tower when a prompt first needs it (it is a third of SD-2.1's weights)."""
        text_sd = read_checkpoint(path, prefix=TEXT_PREFIX)
        text_expected = {"text_encoder": expected["text_encoder"], **{k: set() for k in NETWORKS}}
        return split_checkpoint(text_sd, cfg, text_expected, source=str(path))["text_encoder"]

    text = TextConditioner.from_state(cfg, parts.pop("text_encoder"), reload_text)
    return _model_from_state(cfg, parts, text, str(path))


def convert(
    weights: str | Path | None,
    out_dir: str | Path,
    *,
    config: str | Path | None = None,
    dtype: torch.dtype = torch.float32,
    log: Callable[[str], None] = print,
) -> Path:
    """Write a fast-loading folder: one safetensors file per network, the text encoder and the "" embedding.
    A CCSR-v2 folder is written again in its own layout, in ``dtype`` (:func:`ccsr.model.v2.convert_v2`)."""
    from ccsr.model.v2 import convert_v2, is_v2_folder

    if weights is not None and is_v2_folder(Path(weights)):
        return convert_v2(weights, out_dir, dtype, log=log)
    path = resolve_weights(weights)
    model = load_model(path, config)
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    for name, module in model.networks().items():
        state = {k: v.to(dtype).contiguous() if v.is_floating_point() else v for k, v in module.state_dict().items()}
        save_file(state, str(out / f"{name}.safetensors"))
        log(f"wrote {name}.safetensors ({sum(v.numel() for v in state.values()) / 1e6:.1f} M values)")
    model.text.save(out, dtype)
    index = {"format": CONVERTED_FORMAT, "version": 1, "dtype": str(dtype).removeprefix("torch."),
             "source": str(path), "config": model.config.to_dict()}
    (out / CONVERTED_INDEX).write_text(json.dumps(index, indent=1))
    log(f"wrote {out / CONVERTED_INDEX}")
    return out
