"""Original LDM checkpoint layout -> diffusers state dicts, with strict key accounting.

The reference loader is silently non-strict. Here every source key is either mapped, declared unused (schedule
buffers, the skipped text layer, training-only losses) or reported; every target key must be produced. The
mapping is written out by hand rather than borrowed from diffusers' single-file helpers because those skip
missing keys silently and hard-code SD-2's 24 text layers.
"""

from __future__ import annotations

import re
from collections.abc import Callable, Iterable, Mapping

import torch

from ccsr.model.config import CCSRConfig

Tensor = torch.Tensor

UNET_PREFIX = "model.diffusion_model."
CONTROL_PREFIX = "control_model."
VAE_PREFIX = "first_stage_model."
COND_PREFIX = "cond_encoder."
TEXT_PREFIX = "cond_stage_model.model."

# Present in released files, never read at inference: schedule buffers, EMA, training losses, the CLIP logit scale.
_IGNORED = re.compile(
    r"^(betas|alphas_cumprod|alphas_cumprod_prev|sqrt_\w+|log_one_minus_alphas_cumprod|posterior_\w+|logvar)"
    r"(_inter)?$|^(decoder_loss|loss|model_ema|lpips)\.|^cond_stage_model\.model\.(logit_scale|text_projection)$"
)


class CheckpointKeyError(ValueError):
    """The checkpoint does not hold exactly the weights the config describes."""

    def __init__(self, missing: list[str], unexpected: list[str], source: str = ""):
        parts = []
        if missing:
            parts.append(f"{len(missing)} missing key(s): {_abbrev(missing)}")
        if unexpected:
            parts.append(f"{len(unexpected)} unexpected key(s): {_abbrev(unexpected)}")
        where = f"{source}: " if source else ""
        super().__init__(f"{where}checkpoint does not match the model config; " + "; ".join(parts)
                         + ". If this checkpoint has its own LDM yaml, pass it with --config (or CCSR_CONFIG)")
        self.missing = missing
        self.unexpected = unexpected


def _abbrev(keys: list[str], n: int = 6) -> str:
    shown = ", ".join(keys[:n])
    return shown + (f", ... (+{len(keys) - n} more)" if len(keys) > n else "")


# --- building blocks -------------------------------------------------------------------------------------------

_RESNET_LDM_UNET = {
    "in_layers.0": "norm1",
    "in_layers.2": "conv1",
    "emb_layers.1": "time_emb_proj",
    "out_layers.0": "norm2",
    "out_layers.3": "conv2",
    "skip_connection": "conv_shortcut",
}
_RESNET_LDM_VAE = {"nin_shortcut": "conv_shortcut"}
_VAE_ATTN = {"norm": "group_norm", "q": "to_q", "k": "to_k", "v": "to_v", "proj_out": "to_out.0"}


def _rename_unet_block(rest: str) -> str:
    """Inside a ResBlock or SpatialTransformer, LDM and diffusers names agree except for the ResBlock layers."""
    for old, new in _RESNET_LDM_UNET.items():
        if rest.startswith(old + "."):
            return new + rest[len(old) :]
    return rest


class _Mapper:
    """Collects (target key -> source key, transform) pairs for one component."""

    def __init__(self) -> None:
        self.pairs: dict[str, tuple[str, Callable[[Tensor], Tensor] | None]] = {}

    def add(self, target: str, source: str, fn: Callable[[Tensor], Tensor] | None = None) -> None:
        self.pairs[target] = (source, fn)


def _unet_encoder_map(
    keys: Iterable[str], prefix: str, levels: int, layers: int, has_attn: list[bool], out: _Mapper, target: str
) -> None:
    """Map time_embed, input_blocks and middle_block (shared by the UNet and the ControlNet)."""
    per_level = layers + 1
    for key in keys:
        if not key.startswith(prefix):
            continue
        k = key[len(prefix) :]
        if m := re.match(r"time_embed\.(0|2)\.(.+)$", k):
            out.add(f"{target}time_embedding.linear_{1 if m[1] == '0' else 2}.{m[2]}", key)
        elif m := re.match(r"input_blocks\.0\.0\.(.+)$", k):
            out.add(f"{target}conv_in.{m[1]}", key)
        elif m := re.match(r"input_blocks\.(\d+)\.(\d)\.(.+)$", k):
            i, sub, rest = int(m[1]), int(m[2]), m[3]
            level, j = divmod(i - 1, per_level)
            if level >= levels:
                continue
            if j == layers:  # the downsampler of this level
                out.add(f"{target}down_blocks.{level}.downsamplers.0.conv.{rest.removeprefix('op.')}", key)
            elif sub == 0:
                out.add(f"{target}down_blocks.{level}.resnets.{j}.{_rename_unet_block(rest)}", key)
            elif has_attn[level]:
                out.add(f"{target}down_blocks.{level}.attentions.{j}.{rest}", key)
        elif m := re.match(r"middle_block\.(\d)\.(.+)$", k):
            sub, rest = int(m[1]), m[2]
            if sub == 1:
                out.add(f"{target}mid_block.attentions.0.{rest}", key)
            else:
                out.add(f"{target}mid_block.resnets.{sub // 2}.{_rename_unet_block(rest)}", key)


def _unet_map(keys: list[str], cfg: CCSRConfig) -> _Mapper:
    u = cfg.unet
    levels, layers = len(u["block_out_channels"]), u["layers_per_block"]
    has_attn = [t.startswith("CrossAttn") for t in u["down_block_types"]]
    out = _Mapper()
    _unet_encoder_map(keys, UNET_PREFIX, levels, layers, has_attn, out, "")
    per_level = layers + 1
    for key in keys:
        if not key.startswith(UNET_PREFIX):
            continue
        k = key[len(UNET_PREFIX) :]
        if m := re.match(r"out\.(0|2)\.(.+)$", k):
            out.add(f"{'conv_norm_out' if m[1] == '0' else 'conv_out'}.{m[2]}", key)
        elif m := re.match(r"output_blocks\.(\d+)\.(\d)\.(.+)$", k):
            i, sub, rest = int(m[1]), int(m[2]), m[3]
            up, j = divmod(i, per_level)
            attn = has_attn[levels - 1 - up]
            if sub == 0:
                out.add(f"up_blocks.{up}.resnets.{j}.{_rename_unet_block(rest)}", key)
            elif sub == 1 and attn:
                out.add(f"up_blocks.{up}.attentions.{j}.{rest}", key)
            elif rest.startswith("conv."):
                out.add(f"up_blocks.{up}.upsamplers.0.{rest}", key)
    return out


def _controlnet_map(keys: list[str], cfg: CCSRConfig) -> _Mapper:
    c = cfg.controlnet
    levels, layers = len(c["block_out_channels"]), c["layers_per_block"]
    has_attn = [t.startswith("CrossAttn") for t in c["down_block_types"]]
    out = _Mapper()
    _unet_encoder_map(keys, CONTROL_PREFIX, levels, layers, has_attn, out, "")
    latent = cfg.latent_channels
    conv_in = CONTROL_PREFIX + "input_blocks.0.0.weight"
    # The 8-channel first conv over cat(x_t, c_latent) is exactly conv_x(x_t) + conv_c(c_latent).
    out.add("conv_in.weight", conv_in, lambda w: w[:, :latent].contiguous())
    out.add("controlnet_cond_embedding.weight", conv_in, lambda w: w[:, latent:].contiguous())
    out.add("controlnet_cond_embedding.bias", CONTROL_PREFIX + "input_blocks.0.0.bias", torch.zeros_like)
    for key in keys:
        if not key.startswith(CONTROL_PREFIX):
            continue
        k = key[len(CONTROL_PREFIX) :]
        if m := re.match(r"zero_convs\.(\d+)\.0\.(.+)$", k):
            out.add(f"controlnet_down_blocks.{m[1]}.{m[2]}", key)
        elif m := re.match(r"middle_block_out\.0\.(.+)$", k):
            out.add(f"controlnet_mid_block.{m[1]}", key)
    return out


def _conv1x1_to_linear(w: Tensor) -> Tensor:
    return w.reshape(w.shape[0], w.shape[1]).contiguous() if w.ndim == 4 else w


def _vae_coder_map(keys: Iterable[str], prefix: str, levels: int, out: _Mapper, target: str) -> None:
    """Map one LDM ``Encoder``/``Decoder`` (``prefix`` ends with 'encoder.' or 'decoder.')."""
    decoder = prefix.endswith("decoder.")
    for key in keys:
        if not key.startswith(prefix):
            continue
        k = key[len(prefix) :]
        if m := re.match(r"(down|up)\.(\d+)\.block\.(\d+)\.(.+)$", k):
            level = levels - 1 - int(m[2]) if decoder else int(m[2])
            kind = "up_blocks" if decoder else "down_blocks"
            rest = _RESNET_LDM_VAE.get(m[4].split(".")[0], m[4].split(".")[0]) + "." + m[4].split(".", 1)[1]
            out.add(f"{target}{kind}.{level}.resnets.{m[3]}.{rest}", key)
        elif m := re.match(r"down\.(\d+)\.downsample\.conv\.(.+)$", k):
            out.add(f"{target}down_blocks.{m[1]}.downsamplers.0.conv.{m[2]}", key)
        elif m := re.match(r"up\.(\d+)\.upsample\.conv\.(.+)$", k):
            out.add(f"{target}up_blocks.{levels - 1 - int(m[1])}.upsamplers.0.conv.{m[2]}", key)
        elif m := re.match(r"mid\.block_(1|2)\.(.+)$", k):
            first, rest = m[2].split(".", 1)
            out.add(f"{target}mid_block.resnets.{int(m[1]) - 1}.{_RESNET_LDM_VAE.get(first, first)}.{rest}", key)
        elif m := re.match(r"mid\.attn_1\.(norm|q|k|v|proj_out)\.(.+)$", k):
            fn = None if m[1] == "norm" else _conv1x1_to_linear
            out.add(f"{target}mid_block.attentions.0.{_VAE_ATTN[m[1]]}.{m[2]}", key, fn)
        elif m := re.match(r"norm_out\.(.+)$", k):
            out.add(f"{target}conv_norm_out.{m[1]}", key)
        elif m := re.match(r"(conv_in|conv_out)\.(.+)$", k):
            out.add(f"{target}{m[1]}.{m[2]}", key)


def _vae_map(keys: list[str], cfg: CCSRConfig) -> _Mapper:
    levels = len(cfg.vae["block_out_channels"])
    out = _Mapper()
    _vae_coder_map(keys, VAE_PREFIX + "encoder.", levels, out, "encoder.")
    _vae_coder_map(keys, VAE_PREFIX + "decoder.", levels, out, "decoder.")
    for key in keys:
        if m := re.match(re.escape(VAE_PREFIX) + r"(quant_conv|post_quant_conv)\.(.+)$", key):
            out.add(f"{m[1]}.{m[2]}", key)
    return out


def _cond_encoder_map(keys: list[str], cfg: CCSRConfig) -> _Mapper:
    levels = len(cfg.vae["block_out_channels"])
    out = _Mapper()
    _vae_coder_map(keys, COND_PREFIX + "encoder.", levels, out, "encoder.")
    for key in keys:
        if m := re.match(re.escape(COND_PREFIX) + r"quant_conv\.(.+)$", key):
            out.add(f"quant_conv.{m[1]}", key)
    return out


def _text_map(keys: list[str], cfg: CCSRConfig, base: str) -> tuple[_Mapper, set[str]]:
    """OpenCLIP text tower -> transformers ``CLIPTextModel``; returns the mapper and keys deliberately unused."""
    t = cfg.text
    out = _Mapper()
    unused: set[str] = set()
    w = t.width
    names = {
        "ln_1": "layer_norm1",
        "ln_2": "layer_norm2",
        "attn.out_proj": "self_attn.out_proj",
        "mlp.c_fc": "mlp.fc1",
        "mlp.c_proj": "mlp.fc2",
    }
    for key in keys:
        if not key.startswith(TEXT_PREFIX):
            continue
        k = key[len(TEXT_PREFIX) :]
        if k == "token_embedding.weight":
            out.add(f"{base}embeddings.token_embedding.weight", key)
        elif k == "positional_embedding":
            out.add(f"{base}embeddings.position_embedding.weight", key)
        elif m := re.match(r"ln_final\.(.+)$", k):
            out.add(f"{base}final_layer_norm.{m[1]}", key)
        elif m := re.match(r"transformer\.resblocks\.(\d+)\.(.+)$", k):
            i, rest = int(m[1]), m[2]
            if i >= t.used_layers:
                if i < t.layers:
                    unused.add(key)  # skipped by the "penultimate" layer choice
                continue
            layer = f"{base}encoder.layers.{i}."
            if pm := re.match(r"attn\.in_proj_(weight|bias)$", rest):
                for n, name in enumerate(("q_proj", "k_proj", "v_proj")):
                    out.add(f"{layer}self_attn.{name}.{pm[1]}", key, lambda x, n=n: x[n * w : (n + 1) * w].clone())
            else:
                for old, new in names.items():
                    if rest.startswith(old + "."):
                        out.add(layer + new + rest[len(old) :], key)
                        break
    return out, unused


# --- public API --------------------------------------------------------------------------------------------------

COMPONENTS = ("unet", "controlnet", "vae", "cond_encoder", "text_encoder")


def split_checkpoint(
    sd: Mapping[str, Tensor],
    cfg: CCSRConfig,
    expected: Mapping[str, Iterable[str]],
    *,
    source: str = "",
    with_text: bool = True,
) -> dict[str, dict[str, Tensor]]:
    """Convert an LDM state dict into one diffusers state dict per component.

    ``expected`` gives, per component, the key set of the freshly built diffusers module; the conversion fails with
    :class:`CheckpointKeyError` unless the checkpoint fills exactly those keys and every source key is accounted for.
    """
    keys = list(sd.keys())
    mappers = {
        "unet": _unet_map(keys, cfg),
        "controlnet": _controlnet_map(keys, cfg),
        "vae": _vae_map(keys, cfg),
        "cond_encoder": _cond_encoder_map(keys, cfg),
    }
    # transformers < 5 nests the CLIP text weights under "text_model."; 5.x does not.
    text_base = "text_model." if any(k.startswith("text_model.") for k in expected.get("text_encoder", ())) else ""
    text_mapper, consumed = _text_map(keys, cfg, text_base)
    if with_text:
        mappers["text_encoder"] = text_mapper
    else:
        consumed |= {k for k in keys if k.startswith(TEXT_PREFIX)}

    missing: list[str] = []
    unexpected: list[str] = []
    result: dict[str, dict[str, Tensor]] = {}
    for name, mapper in mappers.items():
        want = set(expected[name])
        have = set(mapper.pairs)
        missing += [f"{name}:{k}" for k in sorted(want - have)]
        for target in sorted(t for t in have - want if mapper.pairs[t][0] in sd):
            unexpected.append(f"{mapper.pairs[target][0]} (as {name}:{target}, which the config does not have)")
        comp: dict[str, Tensor] = {}
        for target, (src, fn) in mapper.pairs.items():
            if target in want and src in sd:
                comp[target] = fn(sd[src]) if fn else sd[src]
                consumed.add(src)
            elif target in want:
                missing.append(f"{name}:{target} (needs {src})")
        result[name] = comp
    unexpected += sorted(k for k in keys if k not in consumed and not _IGNORED.search(k))
    if missing or unexpected:
        raise CheckpointKeyError(missing, unexpected, source)
    return result
