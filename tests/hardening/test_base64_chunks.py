"""``intake.decode_base64`` decodes in chunks (the event loop is never stalled for a whole upload): the result and
the refusals must be those of one whole-string ``b64decode``, at every chunk boundary."""

from __future__ import annotations

import base64
import os

import pytest

from ccsr.api import intake


@pytest.fixture(autouse=True)
def small_chunks(monkeypatch):
    monkeypatch.setattr(intake, "BASE64_CHUNK", 8)  # many boundaries on small inputs


@pytest.mark.parametrize("n", [0, 1, 2, 3, 5, 6, 7, 12, 13, 64, 1001])
def test_chunked_decode_equals_whole(n):
    raw = os.urandom(n)
    text = base64.b64encode(raw).decode()
    assert intake.decode_base64(text) == raw
    assert intake.decode_base64(text.rstrip("=")) == raw  # missing padding tolerated
    spaced = "\n".join(text[i : i + 7] for i in range(0, len(text), 7))
    assert intake.decode_base64(spaced) == raw  # whitespace tolerated
    assert intake.decode_base64(base64.urlsafe_b64encode(raw).decode()) == raw


@pytest.mark.parametrize("text", ["AAAA=AAA", "AAAAAAA=AAAAAAAA", "AA==AAAA", "AAA*", "AAAAAAAA!AAAAAAA", "A"])
def test_refused_like_the_whole_string(text):
    with pytest.raises(ValueError):
        base64.b64decode(text + "=" * (-len(text) % 4), validate=True)  # what one call refuses ...
    with pytest.raises(ValueError):
        intake.decode_base64(text)  # ... is refused chunked too


def test_padding_then_whitespace_is_the_end_and_nothing_may_follow_it():
    raw = os.urandom(10)
    text = base64.b64encode(raw).decode()
    assert intake.decode_base64(text + "\n  ") == raw
    with pytest.raises(ValueError):
        intake.decode_base64(text + "\nQUFB")
