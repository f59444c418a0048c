"""Prompts tokenize exactly like the references in every install: offline, without open-clip-torch, and a broken
vocabulary is a one-line error, never a tokenizer that maps words to the wrong ids."""

from __future__ import annotations

import gzip
import importlib.util
import json
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
from tests.conftest import FIXTURES, REPO

from ccsr.model.text import BPE_FILE, TokenizerError, load_tokenizer, tokenize

V2 = REPO / "tests" / "fixtures" / "ccsr_v2_tiny"
V2_TOKENIZER = V2 / "model" / "stable-diffusion-2-1-base" / "tokenizer"
PACKAGED_BPE = REPO / "src" / "ccsr" / "model" / "clip_bpe" / BPE_FILE
# Made once with open-clip-torch's own tokenizer (the v1 reference's), so this test runs in every install.
OPEN_CLIP_TOKENS = json.loads((REPO / "tests" / "fixtures" / "open_clip_tokens.json").read_text(encoding="utf-8"))
TRICKY = [case["text"] for case in OPEN_CLIP_TOKENS["tokens"]]

# Runs in a fresh interpreter: open_clip cannot be imported, nothing may be downloaded, no cache or home to use.
OFFLINE_SCRIPT = """
import importlib.abc, json, sys

class Blocker(importlib.abc.MetaPathFinder):
    def find_spec(self, name, path=None, target=None):
        if name.split(".")[0] == "open_clip":
            raise ImportError("open_clip is not installed here")

sys.meta_path.insert(0, Blocker())
from ccsr.model.text import load_tokenizer, tokenize
tok = load_tokenizer()
print(json.dumps({p: tokenize(tok, p)[0].tolist() for p in json.loads(sys.argv[1])}))
"""


def reference_prompts() -> dict[str, list[int]]:
    """Every prompt the golden fixtures tokenized, with the reference's ids (v1: open_clip, v2: CLIPTokenizer)."""
    v1 = FIXTURES / "components"
    manifest = json.loads((v1 / "manifest.json").read_text())
    refs = {manifest["text_context_prompt.npy"]["prompt"]: np.load(v1 / "text_tokens_prompt.npy")[0].tolist()}
    prompts = json.loads((V2 / "components" / "manifest.json").read_text())["text_prompts"]
    refs.update(zip(prompts, np.load(V2 / "components" / "text_tokens.npy").tolist(), strict=True))
    return {p: ids for p, ids in refs.items() if p}  # "" never needs a tokenizer


def test_prompts_tokenize_to_the_reference_ids_offline_without_open_clip(tmp_path):
    refs = reference_prompts()
    assert len(refs) == 5 and any(len(p) > 300 for p in refs)  # incl. one truncated to 77 with EOT kept last
    env = {"PATH": "/usr/bin:/bin", "PYTHONPATH": str(REPO / "src"), "HF_HUB_OFFLINE": "1",
           "TRANSFORMERS_OFFLINE": "1", "HOME": str(tmp_path), "XDG_CACHE_HOME": str(tmp_path / "cache")}
    r = subprocess.run([sys.executable, "-c", OFFLINE_SCRIPT, json.dumps(list(refs))], capture_output=True,
                       text=True, timeout=300, env=env)
    assert r.returncode == 0, r.stderr
    assert json.loads(r.stdout) == refs
    assert not (tmp_path / "cache").exists()  # nothing written or fetched


def test_a_hugging_face_tokenizer_folder_gives_the_same_ids():
    packaged, folder = load_tokenizer(), load_tokenizer(V2_TOKENIZER)
    for text in TRICKY:
        assert tokenize(folder, text).tolist() == tokenize(packaged, text).tolist(), text


def test_truncation_keeps_the_end_token_last():
    ids = tokenize(load_tokenizer(), "cat " * 200)[0]
    assert ids.shape == (77,) and ids[0] == 49406 and ids[-1] == 49407 and (ids[1:-1] == ids[1]).all()


def open_clip_tokenizer_module():  # type: ignore[no-untyped-def]
    """open_clip's tokenizer module, loaded on its own (the package's __init__ needs torchvision); None if absent."""
    spec = importlib.util.find_spec("open_clip")
    if spec is None or not spec.submodule_search_locations:
        return None
    path = Path(next(iter(spec.submodule_search_locations))) / "tokenizer.py"
    module_spec = importlib.util.spec_from_file_location("open_clip_tokenizer_for_tests", path)
    module = importlib.util.module_from_spec(module_spec)  # type: ignore[arg-type]
    module_spec.loader.exec_module(module)  # type: ignore[union-attr]
    return module


def test_tricky_text_tokenizes_as_open_clip_does():
    """Case, spacing, entities, mojibake, emoji, contractions, special-token lookalikes, truncation: the ids that
    open_clip gave (tests/fixtures/open_clip_tokens.json); also compared live where open-clip-torch is installed."""
    tok = load_tokenizer()
    live = open_clip_tokenizer_module()
    for case in OPEN_CLIP_TOKENS["tokens"]:
        ids = tokenize(tok, case["text"])[0].tolist()
        assert ids == case["ids"], case["text"]
        if live is not None:
            assert ids == live.tokenize([case["text"]])[0].tolist(), case["text"]


def write_gz(path: Path, text: str) -> Path:
    with gzip.open(path, "wt", encoding="utf-8") as f:
        f.write(text)
    return path


def broken_sources(tmp: Path) -> dict[str, Path]:
    data = PACKAGED_BPE.read_bytes()
    lines = gzip.decompress(data).decode("utf-8").split("\n")
    (tmp / "truncated.txt.gz").write_bytes(data[: len(data) // 2])
    (tmp / "not_gzip.txt.gz").write_bytes(b"merges? no")
    folder = tmp / "id2_folder"  # the failure seen after a plain pip install: every word an unknown id
    folder.mkdir()
    (folder / "vocab.json").write_text(json.dumps({"<|startoftext|>": 49406, "<|endoftext|>": 49407, "!": 0}))
    (folder / "merges.txt").write_text("#version: 0.2\n")
    swapped = tmp / "swapped_ids_folder"  # right size and special ids, two words' ids exchanged
    swapped.mkdir()
    vocab = json.loads((V2_TOKENIZER / "vocab.json").read_text())
    vocab["cat</w>"], vocab["dog</w>"] = vocab["dog</w>"], vocab["cat</w>"]
    (swapped / "vocab.json").write_text(json.dumps(vocab))
    (swapped / "merges.txt").write_text((V2_TOKENIZER / "merges.txt").read_text())
    return {
        "truncated.txt.gz": tmp / "truncated.txt.gz",
        "not_gzip.txt.gz": tmp / "not_gzip.txt.gz",
        "short.txt.gz": write_gz(tmp / "short.txt.gz", "\n".join(lines[:20000])),
        "shuffled.txt.gz": write_gz(tmp / "shuffled.txt.gz", "\n".join([lines[0], *reversed(lines[1:])])),
        "garbage.txt.gz": write_gz(tmp / "garbage.txt.gz", "header\nonly-one-field-per-line\n"),
        "id2_folder": folder,
        "swapped_ids_folder": swapped,
        "missing": tmp / "does_not_exist",
    }


@pytest.mark.parametrize("name", ["truncated.txt.gz", "not_gzip.txt.gz", "short.txt.gz", "shuffled.txt.gz",
                                  "garbage.txt.gz", "id2_folder", "swapped_ids_folder",
                                  "missing"])
def test_a_broken_tokenizer_source_is_a_one_line_error(tmp_path, monkeypatch, name):
    source = broken_sources(tmp_path)[name]
    with pytest.raises(TokenizerError) as err:
        load_tokenizer(source)
    assert str(source) in str(err.value) and "\n" not in str(err.value)
    monkeypatch.setenv("CCSR_TOKENIZER", str(source))  # the same through the environment
    with pytest.raises(TokenizerError):
        load_tokenizer()
