"""Where weights come from: a local file or folder, or the Hugging Face hub; and how they are read.

Formats: the original LDM checkpoint (``.ckpt``/``.pt``, read with ``torch.load(weights_only=True)``), the same
layout in ``.safetensors``, and the folder ``ccsr convert`` writes (one safetensors file per component, fast to
load). Hub references look like ``hf://owner/repo/path/in/repo`` (optionally ``@revision``).
"""

from __future__ import annotations

import json
import os
import re
from pathlib import Path

import torch
from safetensors import safe_open
from safetensors.torch import load_file

Tensor = torch.Tensor

DEFAULT_WEIGHTS = "hf://camenduru/CCSR/real-world_ccsr.ckpt"
"""The released CCSR-v1 checkpoint (``real-world_ccsr.ckpt``), mirrored on the hub."""
CONVERTED_INDEX = "ccsr.json"
CONVERTED_FORMAT = "ccsr-diffusers"

_HUB_REF = re.compile(r"^(?:hf://)?(?P<repo>[\w.-]+/[\w.-]+)/(?P<file>[^@]+?)(?:@(?P<rev>[\w./-]+))?$")


class WeightsError(ValueError):
    """Weights cannot be found, downloaded or read; the message says what to do."""


def _offline_help(ref: str, repo: str, filename: str) -> str:
    return (
        f"cannot download the CCSR weights ({ref}): no network access or the hub refused. Download "
        f"'{filename}' from https://huggingface.co/{repo} on a machine with access (for example "
        f"`hf download {repo} {filename} --local-dir .`, hf comes with huggingface_hub), copy it here and "
        f"pass it with `--weights PATH` "
        f"(library: CCSRPipeline.from_single_file(PATH)), or set CCSR_WEIGHTS=PATH."
    )


def resolve_weights(ref: str | os.PathLike[str] | None = None) -> Path:
    """Turn a weights reference into a local path, downloading (once, cached, with a progress bar) if needed."""
    ref = str(ref) if ref is not None else os.environ.get("CCSR_WEIGHTS") or DEFAULT_WEIGHTS
    path = Path(ref).expanduser()
    if path.exists():
        return path
    m = _HUB_REF.match(ref)
    if not m or (not ref.startswith("hf://") and (ref.startswith((".", "/", "~")) or path.suffix == "")):
        raise WeightsError(f"weights not found: {ref} (not a file, a folder, or a hub reference hf://owner/repo/file)")
    repo, filename, rev = m["repo"], m["file"], m["rev"]
    try:
        from huggingface_hub import hf_hub_download
        from huggingface_hub.errors import (
            EntryNotFoundError,
            LocalEntryNotFoundError,
            RepositoryNotFoundError,
        )
    except ImportError as exc:  # pragma: no cover - huggingface_hub is a dependency
        raise WeightsError("huggingface_hub is required to download weights") from exc
    from huggingface_hub.utils import logging as hf_logging

    verbosity = hf_logging.get_verbosity()
    hf_logging.set_verbosity_error()  # retries are reported once, by our message, not line by line
    try:
        return Path(hf_hub_download(repo_id=repo, filename=filename, revision=rev))
    except LocalEntryNotFoundError as exc:  # offline (HF_HUB_OFFLINE) or no connection, and nothing cached
        raise WeightsError(_offline_help(ref, repo, filename)) from exc
    except (RepositoryNotFoundError, EntryNotFoundError) as exc:
        raise WeightsError(f"{ref}: no such repository or file on the hub") from exc
    except Exception as exc:  # offline, DNS failure, timeouts, 5xx: all say the same thing to a user
        raise WeightsError(_offline_help(ref, repo, filename)) from exc
    finally:
        hf_logging.set_verbosity(verbosity)


def read_checkpoint(path: Path, prefix: str | None = None) -> dict[str, Tensor]:
    """Read an LDM-layout state dict (``.ckpt``/``.pt``/``.pth``/``.bin`` or ``.safetensors``).

    With ``prefix``, only those keys are kept (a safetensors file then reads nothing else).
    """
    if not path.is_file():
        raise WeightsError(f"weights file not found: {path}")
    try:
        if path.suffix == ".safetensors" and prefix is not None:
            with safe_open(str(path), framework="pt") as f:
                sd: object = {k: f.get_tensor(k) for k in f.keys() if k.removeprefix("module.").startswith(prefix)}  # noqa: SIM118
        elif path.suffix == ".safetensors":
            sd = load_file(str(path))
        else:
            sd = torch.load(str(path), map_location="cpu", weights_only=True, mmap=True)
    except Exception as exc:
        raise WeightsError(
            f"{path}: not a readable checkpoint ({exc.__class__.__name__}); expected a PyTorch .ckpt of tensors "
            "or a .safetensors file (a truncated download or an HTML error page looks like this)"
        ) from exc
    if isinstance(sd, dict) and isinstance(sd.get("state_dict"), dict):
        sd = sd["state_dict"]
    if not isinstance(sd, dict) or not sd or not all(isinstance(v, Tensor) for v in sd.values()):
        raise WeightsError(f"{path}: does not hold a state dict of tensors")
    sd = {k.removeprefix("module."): v for k, v in sd.items()}
    return sd if prefix is None else {k: v for k, v in sd.items() if k.startswith(prefix)}


def is_converted(path: Path) -> bool:
    return path.is_dir() and (path / CONVERTED_INDEX).is_file()


def read_converted_index(path: Path) -> dict:
    index = json.loads((path / CONVERTED_INDEX).read_text())
    if index.get("format") != CONVERTED_FORMAT:
        raise WeightsError(f"{path}: not a folder written by `ccsr convert`")
    return index


def read_component(path: Path, name: str) -> dict[str, Tensor]:
    f = path / f"{name}.safetensors"
    if not f.is_file():
        raise WeightsError(f"{path}: component file {f.name} is missing")
    return load_file(str(f))
