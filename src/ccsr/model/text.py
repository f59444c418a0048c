"""Prompt conditioning: the OpenCLIP text tower as a transformers ``CLIPTextModel``, loaded only when needed.

CCSR-v1 was trained with the empty prompt, so the common case is one constant ``[1, 77, D]`` tensor computed once at
load time; the text encoder (a third of SD-2.1's weights) is then released and only rebuilt for a real prompt.
"""

from __future__ import annotations

import gzip
import html
import itertools
import json
import os
from collections import OrderedDict
from collections.abc import Callable, Sequence
from functools import lru_cache
from importlib import resources
from pathlib import Path

import regex
import torch
from safetensors.torch import load_file, save_file

from ccsr.model.components import build_empty, fill, text_model_config
from ccsr.model.config import CCSRConfig

Tensor = torch.Tensor

SOT, EOT, PAD = 49406, 49407, 0
VOCAB_SIZE = 49408
BPE_FILE = "bpe_simple_vocab_16e6.txt.gz"  # OpenAI CLIP's merges, shipped in ccsr/model/clip_bpe (MIT)
# A few words and their ids in every CLIP BPE vocabulary: a vocabulary that tokenizes them otherwise is not CLIP's.
KNOWN_IDS = {"a photo of a cat, high quality": [320, 1125, 539, 320, 2368, 267, 1400, 3027]}
# Written in a prompt, OpenCLIP's names of the start and end tokens are those tokens.
SPECIAL_WORDS = {"<start_of_text>": SOT, "<end_of_text>": EOT}
# OpenCLIP's pre-tokenizer: its special tokens, English contractions, letter runs, single digits, symbol runs.
WORDS = regex.compile(
    r"""<start_of_text>|<end_of_text>|'s|'t|'re|'ve|'m|'ll|'d|[\p{L}]+|[\p{N}]|[^\s\p{L}\p{N}]+""",
    regex.IGNORECASE,
)


class TokenizerError(RuntimeError):
    """A non-empty prompt needs the CLIP BPE vocabulary, and it could not be loaded or is not CLIP's."""


# The text encoder's settings that change its output (``last_hidden_state``) beyond its tensors: two encoders equal
# in these and in every tensor compute the same thing (the token ids of the config only name the pooled output's).
TEXT_ARCHITECTURE = ("vocab_size", "hidden_size", "intermediate_size", "num_hidden_layers", "num_attention_heads",
                     "max_position_embeddings", "hidden_act", "layer_norm_eps")


def text_architecture(config) -> dict:  # type: ignore[no-untyped-def]
    """The :data:`TEXT_ARCHITECTURE` entries of a ``CLIPTextConfig``."""
    return {name: getattr(config, name) for name in TEXT_ARCHITECTURE}


def empty_tokens(context_length: int = 77) -> Tensor:
    """OpenCLIP's tokens for "": start, end, then zero padding (no vocabulary needed)."""
    ids = torch.zeros(1, context_length, dtype=torch.long)
    ids[0, 0], ids[0, 1] = SOT, EOT
    return ids


def _byte_chars() -> dict[int, str]:
    """CLIP's reversible byte -> character table: printable Latin-1 bytes stand for themselves, the others are
    written as chr(256 + n) in byte order."""
    printable = [*range(ord("!"), ord("~") + 1), *range(ord("¡"), ord("¬") + 1), *range(ord("®"), ord("ÿ") + 1)]
    others = [b for b in range(256) if b not in printable]
    return {**{b: chr(b) for b in printable}, **{b: chr(256 + i) for i, b in enumerate(others)}}


def clean(text: str) -> str:
    """OpenCLIP's prompt cleaning: ftfy's fix, HTML entities (twice), runs of whitespace to one space, lowercase."""
    try:
        import ftfy
    except ImportError as exc:  # a declared dependency: only a broken install gets here
        raise TokenizerError("prompts need the ftfy package (a ccsr dependency): pip install ftfy") from exc
    text = html.unescape(html.unescape(ftfy.fix_text(text))).strip()
    return regex.sub(r"\s+", " ", text).strip().lower()


class ClipTokenizer:
    """CLIP's byte-level BPE (the tokenizer OpenCLIP and SD-2's ``CLIPTokenizer`` implement) from its merges.

    The vocabulary is the 256 byte characters, the same with the end-of-word mark ``</w>``, one entry per merge in
    rank order, then start and end of text; :meth:`check` proves a loaded one is CLIP's.
    """

    def __init__(self, merges: Sequence[tuple[str, str]], vocab: dict[str, int] | None = None):
        self.byte_chars = _byte_chars()
        base = list(self.byte_chars.values())  # printable bytes first, then the others
        derived = [*base, *(c + "</w>" for c in base), *("".join(m) for m in merges), "<|startoftext|>",
                   "<|endoftext|>"]
        self.implied = {tok: i for i, tok in enumerate(derived)}  # what a vocabulary with these merges must be
        self.vocab = vocab if vocab is not None else self.implied
        self.ranks = {pair: i for i, pair in enumerate(merges)}
        self.bpe = lru_cache(maxsize=8192)(self._bpe)

    @classmethod
    def from_bpe_gz(cls, path: Path) -> ClipTokenizer:
        """From CLIP's ``bpe_simple_vocab_16e6.txt.gz``: a header line, then the merges (the first 48894 used)."""
        with gzip.open(path, "rt", encoding="utf-8") as f:
            lines = f.read().split("\n")[1 : VOCAB_SIZE - 512 - 2 + 1]
        return cls([_merge(line) for line in lines])

    @classmethod
    def from_folder(cls, folder: Path) -> ClipTokenizer:
        """From a Hugging Face tokenizer folder (``vocab.json`` + ``merges.txt``, as SD-2.1's)."""
        vocab = json.loads((folder / "vocab.json").read_text(encoding="utf-8"))
        lines = (folder / "merges.txt").read_text(encoding="utf-8").splitlines()
        return cls([_merge(line) for line in lines if line and not line.startswith("#version")], vocab)

    def _bpe(self, word: str) -> tuple[str, ...]:
        """Merge the word's characters, lowest-ranked pair first (every occurrence, left to right)."""
        parts = [*word[:-1], word[-1] + "</w>"]
        while len(parts) > 1:
            best = min(itertools.pairwise(parts), key=lambda pair: self.ranks.get(pair, len(self.ranks)))
            if best not in self.ranks:
                break
            merged, i = [], 0
            while i < len(parts):
                if i + 1 < len(parts) and (parts[i], parts[i + 1]) == best:
                    merged.append(parts[i] + parts[i + 1])
                    i += 2
                else:
                    merged.append(parts[i])
                    i += 1
            parts = merged
        return tuple(parts)

    def encode(self, text: str) -> list[int]:
        """BPE ids of ``text`` after OpenCLIP's cleaning, without start and end tokens."""
        ids: list[int] = []
        for word in WORDS.findall(clean(text)):
            if word in SPECIAL_WORDS:
                ids.append(SPECIAL_WORDS[word])
                continue
            chars = "".join(self.byte_chars[b] for b in word.encode("utf-8"))
            ids.extend(self.vocab[piece] for piece in self.bpe(chars))
        return ids

    def check(self, source: str) -> ClipTokenizer:
        """Refuse a vocabulary that is not CLIP's (wrong size, special ids or known words), naming ``source``."""
        problems = []
        if len(self.vocab) != VOCAB_SIZE:
            problems.append(f"{len(self.vocab)} entries instead of {VOCAB_SIZE}")
        specials = {"<|startoftext|>": SOT, "<|endoftext|>": EOT, "!": PAD}
        problems += [f"{tok} is id {self.vocab.get(tok)}, not {i}" for tok, i in specials.items()
                     if self.vocab.get(tok) != i]
        if not problems and self.vocab != self.implied:
            differ = sum(self.vocab.get(tok) != i for tok, i in self.implied.items())
            problems.append(f"its ids disagree with its merges for {differ} entries")
        if not problems:  # the ids are the merges' own: known words tell whether the merges are CLIP's
            for text, expected in KNOWN_IDS.items():
                if (got := self.encode(text)) != expected:
                    problems.append(f"{text!r} tokenizes to {got}, not {expected}")
        if problems:
            raise TokenizerError(f"{source} is not the CLIP BPE vocabulary: {'; '.join(problems)}")
        return self


def _merge(line: str) -> tuple[str, str]:
    first, second = line.split()
    return first, second


def load_tokenizer(source: str | Path | None = None) -> ClipTokenizer:
    """The CLIP tokenizer, checked: from ``source`` or ``$CCSR_TOKENIZER`` (a Hugging Face tokenizer folder or a
    ``bpe_simple_vocab_16e6.txt.gz``), else from the vocabulary shipped with ccsr. Never downloads."""
    source = source or os.environ.get("CCSR_TOKENIZER")
    path = Path(source) if source else Path(str(resources.files("ccsr.model") / "clip_bpe" / BPE_FILE))
    try:
        tok = ClipTokenizer.from_folder(path) if path.is_dir() else ClipTokenizer.from_bpe_gz(path)
    except (OSError, EOFError, ValueError, UnicodeDecodeError) as exc:  # missing, truncated or not a merges list
        raise TokenizerError(f"the CLIP tokenizer at {path} could not be read ({type(exc).__name__}: {exc}); "
                             "pass a tokenizer folder (vocab.json, merges.txt) with --tokenizer or "
                             "CCSR_TOKENIZER, or reinstall ccsr") from None
    return tok.check(str(path))


def tokenize(tokenizer: ClipTokenizer, prompt: str, context_length: int = 77) -> Tensor:
    """Tokens as OpenCLIP makes them: SOT, BPE ids, EOT (kept last when truncated), padded with zeros."""
    ids = tokenizer.encode(prompt)[: context_length - 2]
    row = [SOT, *ids, EOT]
    return torch.tensor([row + [PAD] * (context_length - len(row))], dtype=torch.long)


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
        self._build: Callable[[], torch.nn.Module] = self.build_encoder  # another model's, once shared
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

    def architecture(self) -> dict | None:
        """What the encoder computes besides its tensors (None: these weights carry no text encoder)."""
        return None if self._state_loader is None else text_architecture(text_model_config(self.cfg))

    def build_encoder(self) -> torch.nn.Module:
        """A new text encoder from the weights, on this conditioner's device and in its dtype."""
        if self._state_loader is None:
            raise TokenizerError("these weights carry no text encoder: only the empty prompt is available")
        return fill(build_empty(self.cfg)["text_encoder"], self._state_loader(), self.dtype).to(self.device)

    def share_encoder(self, build: Callable[[], torch.nn.Module]) -> None:
        """Get the encoder from ``build`` from now on (one module held by several models)."""
        self._build, self._encoder = build, None

    def _encoder_module(self) -> torch.nn.Module:
        if self._encoder is None:
            self._encoder = self._build()
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
