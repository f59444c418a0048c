"""CCSR-v2: the released folder layout (an SD-2.1-base diffusers folder, ``controlnet/``, ``vae/``), loaded into
diffusers / transformers classes with strict key checks.

The layout is what the reference scripts point at (``preset/models``)::

    stable-diffusion-2-1-base/{unet, text_encoder, tokenizer, scheduler}/   (its vae/ is NOT used)
    controlnet/{config.json, diffusion_pytorch_model.safetensors}           CCSR ControlNet
    vae/{config.json, diffusion_pytorch_model.safetensors}                  CCSR VAE: condition encode and decode

The ControlNet has no hint network: its ``condition_conv_in`` (a 3x3 conv, 4 -> first width) takes the condition
latent, and is loaded as the conditioning embedding of :class:`~ccsr.model.components.CCSRControlNet`.
"""

from __future__ import annotations

import inspect
import json
import os
import shutil
from collections import OrderedDict
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING

import torch
from diffusers import AutoencoderKL, ControlNetModel, DDPMScheduler, UNet2DConditionModel
from safetensors import safe_open
from safetensors.torch import load_file, save_file
from torch import nn
from transformers import CLIPTextConfig, CLIPTextModel, CLIPTokenizer

from ccsr.model.components import CCSRControlNet, fill
from ccsr.model.convert import CheckpointKeyError
from ccsr.model.loading import WeightsError
from ccsr.model.text import text_architecture
from ccsr.presets import V2_DEFAULT_PRESET, V2_PRESETS

if TYPE_CHECKING:
    from ccsr.model import ModelDescriptor

SD_FOLDER = "stable-diffusion-2-1-base"
SD_HUB_REPO = "stabilityai/stable-diffusion-2-1-base"
SD_PARTS = ("unet", "text_encoder", "tokenizer", "scheduler")
WEIGHT_FILES = {"unet": "diffusion_pytorch_model.safetensors", "text_encoder": "model.safetensors",
                "controlnet": "diffusion_pytorch_model.safetensors", "vae": "diffusion_pytorch_model.safetensors"}
CONDITION_CONV = "condition_conv_in."
CONDITION_EMBEDDING = "controlnet_cond_embedding."


def is_v2_folder(path: Path) -> bool:
    """True for the v2 layout: ``controlnet/`` and ``vae/`` configs (the SD-2.1-base part may come from the hub)."""
    return all((path / part / "config.json").is_file() for part in ("controlnet", "vae"))


def _offline_help(root: Path) -> str:
    files = ", ".join(f"{p}/" for p in SD_PARTS)
    return (
        f"{root}: the CCSR-v2 folder has no {SD_FOLDER}/ and it could not be downloaded (offline or refused). "
        f"Download {files} of https://huggingface.co/{SD_HUB_REPO} (for example `huggingface-cli download "
        f"{SD_HUB_REPO} --local-dir {root / SD_FOLDER}`) into {root / SD_FOLDER}; the CCSR-v2 ControlNet and VAE "
        "(controlnet/, vae/) are distributed outside the hub, with the CCSR-v2 release (csslc/CCSR, branch CCSR-v2.0)."
    )


def resolve_sd_folder(root: Path) -> Path:
    """The SD-2.1-base folder: ``root/stable-diffusion-2-1-base`` when present, else ``$CCSR_SD21_BASE`` (a folder
    or ``hf://owner/repo``), else the hub repo (downloaded once, cached; offline: what to fetch and where)."""
    local = root / SD_FOLDER
    if local.is_dir():
        return local
    ref = os.environ.get("CCSR_SD21_BASE", f"hf://{SD_HUB_REPO}")
    if Path(ref).is_dir():
        return Path(ref)
    from huggingface_hub import snapshot_download

    patterns = [f"{p}/*" for p in SD_PARTS if p != "text_encoder"] + ["text_encoder/config.json",
                                                                      "text_encoder/model.safetensors",
                                                                      "unet/diffusion_pytorch_model.safetensors"]
    try:
        return Path(snapshot_download(ref.removeprefix("hf://"), allow_patterns=patterns))
    except Exception as exc:  # offline, DNS, refused: the same advice
        raise WeightsError(_offline_help(root)) from exc


def _read_config(folder: Path) -> dict:
    f = folder / "config.json"
    if not f.is_file():
        raise WeightsError(f"{folder}: config.json is missing")
    return json.loads(f.read_text())


def _read_weights(folder: Path, name: str) -> dict[str, torch.Tensor]:
    f = folder / WEIGHT_FILES[name]
    if not f.is_file():
        raise WeightsError(f"{folder}: {f.name} is missing (safetensors weights are required)")
    try:
        return load_file(str(f))
    except Exception as exc:
        raise WeightsError(f"{f}: not a readable safetensors file ({exc.__class__.__name__})") from exc


def _init_kwargs(cls: type, config: dict, **overrides: object) -> dict:
    """The config entries ``cls.__init__`` takes (diffusers configs carry bookkeeping keys such as _class_name)."""
    accepted = inspect.signature(cls.__init__).parameters
    return {**{k: v for k, v in config.items() if k in accepted}, **overrides}


def _strict(module: nn.Module, state: dict[str, torch.Tensor], source: str) -> nn.Module:
    """Fill a meta-built module; a missing or unexpected tensor is a :class:`CheckpointKeyError` naming them."""
    expected = set(module.state_dict())
    legacy = {k for k in state if k.endswith("position_ids") and k not in expected}  # old transformers buffer
    state = {k: v for k, v in state.items() if k not in legacy}
    missing, unexpected = sorted(expected - set(state)), sorted(set(state) - expected)
    if missing or unexpected:
        raise CheckpointKeyError(missing, unexpected, source)
    return fill(module, state)


def load_controlnet(folder: Path) -> CCSRControlNet:
    config = _read_config(folder)
    if not config.get("use_vae_encode_condition"):
        raise WeightsError(f"{folder}: not a CCSR-v2 ControlNet (config has no use_vae_encode_condition)")
    latent_channels = config.get("in_channels", 4)
    with torch.device("meta"):
        net = CCSRControlNet(**_init_kwargs(ControlNetModel, config, conditioning_channels=latent_channels))
    state = {(CONDITION_EMBEDDING + k.removeprefix(CONDITION_CONV) if k.startswith(CONDITION_CONV) else k): v
             for k, v in _read_weights(folder, "controlnet").items()}
    try:
        return _strict(net, state, str(folder))  # type: ignore[return-value]
    except CheckpointKeyError as e:  # named as in the file

        def in_file(k: str) -> str:
            return CONDITION_CONV + k.removeprefix(CONDITION_EMBEDDING) if k.startswith(CONDITION_EMBEDDING) else k

        raise CheckpointKeyError([in_file(k) for k in e.missing], [in_file(k) for k in e.unexpected],
                                 str(folder)) from None


def load_unet(folder: Path) -> UNet2DConditionModel:
    with torch.device("meta"):
        net = UNet2DConditionModel(**_init_kwargs(UNet2DConditionModel, _read_config(folder)))
    return _strict(net, _read_weights(folder, "unet"), str(folder))  # type: ignore[return-value]


def load_vae(folder: Path) -> AutoencoderKL:
    with torch.device("meta"):
        net = AutoencoderKL(**_init_kwargs(AutoencoderKL, _read_config(folder)))
    return _strict(net, _read_weights(folder, "vae"), str(folder))  # type: ignore[return-value]


ENCODER_PARTS = ("encoder", "quant_conv")  # the VAE's half the condition encode runs


def load_vae_encoder(folder: Path) -> tuple[nn.Module, nn.Module]:
    """The VAE's encoder and quant conv alone, read from its weights file (the decoder's tensors are not read)."""
    with torch.device("meta"):
        vae = AutoencoderKL(**_init_kwargs(AutoencoderKL, _read_config(folder)))
    half = nn.ModuleDict({part: getattr(vae, part) for part in ENCODER_PARTS})
    f = folder / WEIGHT_FILES["vae"]
    with safe_open(str(f), framework="pt") as weights:
        names = [k for k in weights.keys() if k.split(".")[0] in ENCODER_PARTS]  # noqa: SIM118 (not a dict)
        state = {k: weights.get_tensor(k) for k in names}
    _strict(half, state, str(folder))
    return half["encoder"], half["quant_conv"]


def load_text_encoder(folder: Path) -> CLIPTextModel:
    config = CLIPTextConfig.from_dict(_read_config(folder))
    with torch.device("meta"):
        net = CLIPTextModel(config)
    expected = set(net.state_dict())
    # transformers >= 5 names the tower's tensors without the "text_model." of the files on the hub
    state = {k if k in expected else k.removeprefix("text_model."): v
             for k, v in _read_weights(folder, "text_encoder").items()}
    return _strict(net, state, str(folder))  # type: ignore[return-value]


def load_alphas_cumprod(folder: Path) -> torch.Tensor:
    """ᾱ of the SD-2.1 schedule (float32), as the reference's DDPMScheduler builds it from scheduler_config."""
    config = json.loads((folder / "scheduler_config.json").read_text())
    return DDPMScheduler.from_config(config).alphas_cumprod.clone()


class PromptEncoder:
    """Prompt -> ``last_hidden_state``, cached. The text encoder (a fifth of the weights) is built on first use
    and :meth:`release` frees it; the cached prompts (the defaults, encoded at load) need no encoder."""

    CACHE = 16

    def __init__(self, load: Callable[[], CLIPTextModel], tokenizer: CLIPTokenizer,
                 config: CLIPTextConfig | None = None):
        self.load, self.tokenizer, self.config = load, tokenizer, config
        self.encoder: CLIPTextModel | None = None
        self._build: Callable[[], nn.Module] = self.build_encoder  # another model's, once shared
        self.device, self.dtype = torch.device("cpu"), torch.float32
        self.cache: OrderedDict[str, torch.Tensor] = OrderedDict()

    def architecture(self) -> dict | None:
        """What the encoder computes besides its tensors (None: unknown, never shared)."""
        return None if self.config is None else text_architecture(self.config)

    def build_encoder(self) -> nn.Module:
        """A new text encoder from the weights, on this encoder's device and in its dtype."""
        return self.load().to(device=self.device, dtype=self.dtype)

    def share_encoder(self, build: Callable[[], nn.Module]) -> None:
        """Get the encoder from ``build`` from now on (one module held by several models)."""
        self._build, self.encoder = build, None

    def to(self, device: torch.device | str, dtype: torch.dtype) -> None:
        self.device, self.dtype = torch.device(device), dtype
        if self.encoder is not None:
            self.encoder.to(device=self.device, dtype=dtype)
        self.cache.clear()

    def release(self) -> None:
        self.encoder = None

    @torch.no_grad()
    def __call__(self, prompt: str) -> torch.Tensor:
        """Padded to the tokenizer's length with truncation, no attention mask: as the reference."""
        if prompt not in self.cache:
            if self.encoder is None:
                self.encoder = self._build()  # type: ignore[assignment]
            ids = self.tokenizer(prompt, padding="max_length", max_length=self.tokenizer.model_max_length,
                                 truncation=True, return_tensors="pt").input_ids
            # float32 between the networks whatever the encoder's dtype (the model descriptor's policy)
            self.cache[prompt] = self.encoder(ids.to(self.device)).last_hidden_state.float()
            while len(self.cache) > self.CACHE:
                self.cache.popitem(last=False)
        return self.cache[prompt]


def describe(unet: UNet2DConditionModel, controlnet: nn.Module, vae: AutoencoderKL,
             text_parameters: int) -> ModelDescriptor:
    """CCSR-v2's :class:`~ccsr.model.ModelDescriptor` from its networks (real or built on the meta device)."""
    from ccsr.model import MemoryProfile, ModelDescriptor

    n = sum(p.numel() for m in (unet, controlnet, vae) for p in m.parameters()) + text_parameters
    widths = unet.config.block_out_channels
    factor = 2 ** (len(vae.config.block_out_channels) - 1)
    return ModelDescriptor(
        name="CCSR-v2",
        parameters=n,
        latent_channels=vae.config.latent_channels,
        latent_factor=factor,
        size_multiple=factor,  # the reference floors the processing size to multiples of 8
        min_tile_latent=2 ** (len(widths) - 1) * 2,
        memory=MemoryProfile.for_widths(widths[0], vae.config.block_out_channels[0]),
        scale_range=(1.0, 16.0),
        defaults=V2_PRESETS[V2_DEFAULT_PRESET],
        presets=V2_PRESETS,
    )


def describe_v2(root: str | Path) -> ModelDescriptor:
    """The descriptor of a CCSR-v2 folder from its config files alone (networks built on the meta device, no
    weights read): for plans made before, or without, loading. The SD-2.1-base configs are read from the local
    folder or ``$CCSR_SD21_BASE``, else fetched alone from the hub (a few kB)."""
    root = Path(root)
    sd = root / SD_FOLDER
    if not sd.is_dir():
        ref = os.environ.get("CCSR_SD21_BASE", f"hf://{SD_HUB_REPO}")
        if Path(ref).is_dir():
            sd = Path(ref)
        else:
            from huggingface_hub import hf_hub_download

            try:
                for part in ("unet", "text_encoder"):
                    got = Path(hf_hub_download(ref.removeprefix("hf://"), f"{part}/config.json"))
                sd = got.parent.parent
            except Exception as exc:  # offline, DNS, refused: the same advice as for loading
                raise WeightsError(_offline_help(root)) from exc
    controlnet_config = _read_config(root / "controlnet")
    with torch.device("meta"):
        unet = UNet2DConditionModel(**_init_kwargs(UNet2DConditionModel, _read_config(sd / "unet")))
        controlnet = CCSRControlNet(**_init_kwargs(ControlNetModel, controlnet_config,
                                                   conditioning_channels=controlnet_config.get("in_channels", 4)))
        vae = AutoencoderKL(**_init_kwargs(AutoencoderKL, _read_config(root / "vae")))
        text = CLIPTextModel(CLIPTextConfig.from_dict(_read_config(sd / "text_encoder")))
    return describe(unet, controlnet, vae, sum(p.numel() for p in text.parameters()))


@dataclass
class CCSRv2Model:
    """The loaded CCSR-v2 networks, its prompt encoder and schedule, and its self-description."""

    unet: UNet2DConditionModel
    controlnet: CCSRControlNet
    vae: AutoencoderKL
    text: PromptEncoder
    alphas_cumprod: torch.Tensor
    source: str = ""
    text_parameters: int = 0
    load_encoder: Callable[[], tuple[nn.Module, nn.Module]] | None = None  # the VAE's encoder half, read again
    descriptor: ModelDescriptor = field(init=False)
    vae_placement: tuple[torch.device, torch.dtype] = field(init=False)

    def __post_init__(self) -> None:
        self.descriptor = describe(self.unet, self.controlnet, self.vae, self.text_parameters)
        current = next(self.vae.parameters())
        self.vae_placement = (current.device, current.dtype)

    @property
    def scale_factor(self) -> float:
        return float(self.vae.config.scaling_factor)

    def networks(self) -> dict[str, nn.Module]:
        """The networks an upscale runs (the text encoder is the prompt encoder's, built when needed)."""
        return {"unet": self.unet, "controlnet": self.controlnet, "vae": self.vae}

    def to(self, device: torch.device | str, dtype: torch.dtype) -> CCSRv2Model:
        """Move every network to ``device``, in the dtype the descriptor gives it for ``dtype``."""
        dtypes = self.descriptor.network_dtypes(dtype)
        for name, module in self.networks().items():
            current = next(module.parameters())
            if current.dtype != dtypes[name] or current.device != torch.device(device):
                nn.Module.to(module, device=device, dtype=dtypes[name])  # diffusers' to() warns on a cast
        self.text.to(device, dtypes["text_encoder"])
        self.vae_placement = (torch.device(device), dtypes["vae"])
        return self

    def encode_prompt(self, prompt: str) -> torch.Tensor:
        return self.text(prompt)

    def condition_encoder(self) -> tuple[nn.Module, nn.Module]:
        """The VAE's encoder and quant conv (the condition encode), read again if :meth:`release_encoder` freed
        them."""
        if self.vae.encoder is None:
            if self.load_encoder is None:
                raise RuntimeError("the VAE encoder was released and this model cannot read it again")
            device, dtype = self.vae_placement
            for part, module in zip(ENCODER_PARTS, self.load_encoder(), strict=True):
                setattr(self.vae, part, nn.Module.to(module, device=device, dtype=dtype))
        return self.vae.encoder, self.vae.quant_conv

    def release_encoder(self) -> bool:
        """Free the VAE's encoder half (34 M parameters, 130 MiB in fp32 at SD's size) until the next
        :meth:`condition_encoder`, where it is read again; False (kept) when this model has no way to read it."""
        if self.load_encoder is None:
            return False
        self.vae.encoder = self.vae.quant_conv = None
        return True


def load_v2(root: str | Path) -> CCSRv2Model:
    """Load a CCSR-v2 folder (see the module docstring); the SD-2.1-base part may come from the hub."""
    root = Path(root)
    if not is_v2_folder(root):
        raise WeightsError(f"{root}: not a CCSR-v2 folder (expected controlnet/config.json and vae/config.json)")
    sd = resolve_sd_folder(root)
    missing = [p for p in SD_PARTS if not (sd / p).is_dir()]
    if missing:
        raise WeightsError(f"{sd}: missing {', '.join(missing)}/ of {SD_HUB_REPO}")
    text_encoder = load_text_encoder(sd / "text_encoder")  # read once now: a broken file fails at load
    text = PromptEncoder(lambda: load_text_encoder(sd / "text_encoder"),
                         CLIPTokenizer.from_pretrained(str(sd / "tokenizer")), text_encoder.config)
    text.encoder = text_encoder
    return CCSRv2Model(
        unet=load_unet(sd / "unet"),
        controlnet=load_controlnet(root / "controlnet"),
        vae=load_vae(root / "vae"),
        text=text,
        alphas_cumprod=load_alphas_cumprod(sd / "scheduler"),
        source=str(root),
        text_parameters=sum(p.numel() for p in text_encoder.parameters()),
        load_encoder=lambda: load_vae_encoder(root / "vae"),
    )


def convert_v2(root: str | Path, out_dir: str | Path, dtype: torch.dtype = torch.float32,
               log: Callable[[str], None] = print) -> Path:
    """Write the v2 layout again with the weights in ``dtype`` (float16 halves the download to keep), the SD-2.1
    part resolved (hub or ``CCSR_SD21_BASE``) so the result is self-contained; checked by loading it first."""
    root, out = Path(root), Path(out_dir)
    load_v2(root)  # strict checks before anything is written
    sd = resolve_sd_folder(root)
    parts = {f"{SD_FOLDER}/{p}": sd / p for p in SD_PARTS} | {p: root / p for p in ("controlnet", "vae")}
    for rel, src in parts.items():
        dst = out / rel
        dst.mkdir(parents=True, exist_ok=True)
        for f in src.iterdir():
            if f.suffix == ".safetensors":
                state = {k: v.to(dtype).contiguous() if v.is_floating_point() else v
                         for k, v in load_file(str(f)).items()}
                save_file(state, str(dst / f.name))
                log(f"wrote {rel}/{f.name} ({sum(v.numel() for v in state.values()) / 1e6:.1f} M values)")
            elif f.is_file() and f.suffix in (".json", ".txt"):
                shutil.copyfile(f, dst / f.name)
    return out
