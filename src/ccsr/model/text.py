"""Prompt conditioning: the OpenCLIP text tower as a transformers ``CLIPTextModel``, loaded only when needed.

CCSR-v1 was trained with the empty prompt, so the common case is one constant ``[1, 77, D]`` tensor computed once at
load time; the text encoder (a third of SD-2.1's weights) is then released and only rebuilt for a real prompt.
"""

from __future__ import annotations

import gzip
import importlib.util
import json
import os
from collections import OrderedDict
from collections.abc import Callable
from pathlib import Path

import torch
from safetensors.torch import load_file, save_file

from ccsr.model.components import build_empty, fill
from ccsr.model.config import CCSRConfig

Tensor = torch.Tensor

SOT, EOT = 49406, 49407
DEFAULT_TOKENIZER = "hf://stabilityai/stable-diffusion-2-1-base/tokenizer"


class TokenizerError(RuntimeError):
    """A non-empty prompt needs the CLIP BPE vocabulary, and it could not be loaded."""


def empty_tokens(context_length: int = 77) -> Tensor:
    """OpenCLIP's tokens for "": start, end, then zero padding (no vocabulary needed)."""
    ids = torch.zeros(1, context_length, dtype=torch.long)
    ids[0, 0], ids[0, 1] = SOT, EOT
    return ids


def _bundled_bpe() -> Path | None:
    """The CLIP BPE merges file that the ``open-clip-torch`` package ships, found without importing it."""
    spec = importlib.util.find_spec("open_clip")
    for folder in (spec.submodule_search_locations or []) if spec else []:
        candidate = Path(folder) / "bpe_simple_vocab_16e6.txt.gz"
        if candidate.is_file():
            return candidate
    return None


def _unicode_bytes() -> list[str]:
    """CLIP's reversible byte -> printable character table, in vocabulary order."""
    printable = [*range(ord("!"), ord("~") + 1), *range(ord("¡"), ord("¬") + 1), *range(ord("®"), ord("ÿ") + 1)]
    chars = {b: chr(b) for b in printable}
    extra = 0
    for b in range(256):
        if b not in chars:
            chars[b] = chr(256 + extra)
            extra += 1
    return [chars[b] for b in printable] + [chars[b] for b in range(256) if b not in printable]


def tokenizer_files_from_bpe(bpe_gz: Path, out_dir: Path) -> Path:
    """Write vocab.json + merges.txt for ``CLIPTokenizer`` from CLIP's merges list (49152 - 258 merges)."""
    with gzip.open(bpe_gz, "rt", encoding="utf-8") as f:
        lines = f.read().split("\n")
    merges = [tuple(m.split()) for m in lines[1 : 49152 - 256 - 2 + 1]]
    base = _unicode_bytes()
    vocab = base + [c + "</w>" for c in base] + ["".join(m) for m in merges]
    vocab += ["<|startoftext|>", "<|endoftext|>"]
    out_dir.mkdir(parents=True, exist_ok=True)
    files = {
        "merges.txt": "#version: 0.2\n" + "\n".join(" ".join(m) for m in merges) + "\n",
        "vocab.json": json.dumps({tok: i for i, tok in enumerate(vocab)}),  # last: its presence marks completion
    }
    for name, text in files.items():  # atomic, so concurrent processes never read a half-written file
        tmp = out_dir / f".{name}.{os.getpid()}"
        tmp.write_text(text)
        os.replace(tmp, out_dir / name)
    return out_dir


def load_tokenizer(source: str | None = None):  # type: ignore[no-untyped-def]
    """A ``CLIPTokenizer``: from ``source`` (a folder with vocab.json + merges.txt, or ``hf://owner/repo/sub``),
    else from the vocabulary bundled with ``open-clip-torch`` when installed, else from the hub."""
    from transformers import CLIPTokenizer

    source = source or os.environ.get("CCSR_TOKENIZER")
    if source is None and (bpe := _bundled_bpe()) is not None:
        cache = Path(os.environ.get("XDG_CACHE_HOME", Path.home() / ".cache")) / "ccsr" / "clip-tokenizer"
        if not (cache / "vocab.json").is_file():
            tokenizer_files_from_bpe(bpe, cache)
        return CLIPTokenizer.from_pretrained(str(cache))
    source = source or DEFAULT_TOKENIZER
    try:
        if Path(source).is_dir():
            return CLIPTokenizer.from_pretrained(source)
        repo, _, sub = source.removeprefix("hf://").partition("/")[2].partition("/")
        owner = source.removeprefix("hf://").split("/")[0]
        return CLIPTokenizer.from_pretrained(f"{owner}/{repo}", subfolder=sub or None)
    except Exception as exc:
        raise TokenizerError(
            f"prompts need the CLIP tokenizer ({source}) and it could not be loaded: download the tokenizer folder "
            "(vocab.json, merges.txt) of stabilityai/stable-diffusion-2-1-base and pass it with --tokenizer PATH "
            "or CCSR_TOKENIZER=PATH; the empty prompt needs no tokenizer"
        ) from exc


def tokenize(tokenizer, prompt: str, context_length: int = 77) -> Tensor:  # type: ignore[no-untyped-def]
    """Tokens as OpenCLIP makes them: SOT, BPE ids, EOT, truncated to the context and padded with zeros."""
    ids = tokenizer(prompt, add_special_tokens=False).input_ids[: context_length - 2]
    row = [SOT, *ids, EOT]
    return torch.tensor([row + [0] * (context_length - len(row))], dtype=torch.long)


class TextConditioner:
    """Prompt -> cross-attention context, with the empty prompt precomputed and a small cache."""

    def __init__(
        self,
        cfg: CCSRConfig,
        state_loader: Callable[[], dict[str, Tensor]] | None,
        empty_context: Tensor,
        tokenizer_source: str | None = None,
    ):
        self.cfg = cfg
        self._state_loader = state_loader
        self.empty_context = empty_context
        self.tokenizer_source = tokenizer_source
        self._encoder: torch.nn.Module | None = None
        self._tokenizer = None
        self._cache: OrderedDict[str, Tensor] = OrderedDict()
        self.device = torch.device("cpu")
        self.dtype = torch.float32  # the encoder's; contexts are float32 whatever it is

    @classmethod
    def from_state(
        cls, cfg: CCSRConfig, state: dict[str, Tensor], reload: Callable[[], dict[str, Tensor]]
    ) -> TextConditioner:
        """Compute the "" embedding from ``state`` now, then let go of it; ``reload`` reads it again if needed."""
        encoder = fill(build_empty(cfg)["text_encoder"], state)
        with torch.no_grad():
            empty = encoder(input_ids=empty_tokens(cfg.text.context_length)).last_hidden_state
        return cls(cfg, reload, empty)

    @classmethod
    def from_converted(cls, cfg: CCSRConfig, folder: Path) -> TextConditioner:
        empty = load_file(str(folder / "empty_context.safetensors"))["context"].float()
        text_file = folder / "text_encoder.safetensors"
        loader = (lambda: load_file(str(text_file))) if text_file.is_file() else None
        tok = folder / "tokenizer"
        return cls(cfg, loader, empty, str(tok) if tok.is_dir() else None)

    @property
    def loaded(self) -> bool:
        return self._encoder is not None

    def to(self, device: torch.device | str, dtype: torch.dtype = torch.float32) -> None:
        """Where the encoder runs and in which dtype (the "" context, computed at load, stays float32)."""
        self.device, self.dtype = torch.device(device), dtype
        self.empty_context = self.empty_context.to(self.device)
        if self._encoder is not None:
            self._encoder.to(self.device, self.dtype)
        self._cache.clear()

    def _encoder_module(self) -> torch.nn.Module:
        if self._encoder is None:
            if self._state_loader is None:
                raise TokenizerError("these weights carry no text encoder: only the empty prompt is available")
            state = self._state_loader()
            self._encoder = fill(build_empty(self.cfg)["text_encoder"], state, self.dtype).to(self.device)
        return self._encoder

    def tokens(self, prompt: str) -> Tensor:
        if not prompt:
            return empty_tokens(self.cfg.text.context_length)
        if self._tokenizer is None:
            self._tokenizer = load_tokenizer(self.tokenizer_source)
        return tokenize(self._tokenizer, prompt, self.cfg.text.context_length)

    @torch.no_grad()
    def encode(self, prompt: str) -> Tensor:
        if not prompt:
            return self.empty_context
        if prompt not in self._cache:
            ids = self.tokens(prompt).to(self.device)
            self._cache[prompt] = self._encoder_module()(input_ids=ids).last_hidden_state.float()
            while len(self._cache) > 16:
                self._cache.popitem(last=False)
        return self._cache[prompt]

    def release(self) -> None:
        """Free the text encoder (it is rebuilt on the next prompt)."""
        self._encoder = None
        self._cache.clear()

    def save(self, folder: Path, dtype: torch.dtype) -> None:
        save_file({"context": self.empty_context.float().cpu().contiguous()}, str(folder / "empty_context.safetensors"))
        if self._state_loader is not None:
            state = {k: v.to(dtype).contiguous() for k, v in self._state_loader().items()}
            save_file(state, str(folder / "text_encoder.safetensors"))
