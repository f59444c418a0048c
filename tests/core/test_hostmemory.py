"""The host heap policy: freed large blocks stay for reuse inside ``reuse_freed``, and go back to the OS after."""

from __future__ import annotations

import threading

import pytest
import torch

from ccsr import hostmemory
from ccsr.bench import rss_mb

BLOCK_MB = 96


def _touch_and_free() -> float:
    """RSS growth (MiB) left behind by allocating, touching and freeing one large block."""
    before = rss_mb()
    block = torch.ones(BLOCK_MB * 2**20 // 4)
    del block
    return rss_mb() - before


@pytest.fixture(autouse=True)
def _glibc() -> None:
    if not hostmemory.trim():
        pytest.skip("not glibc: the policy does not apply")


def test_large_blocks_are_kept_only_inside() -> None:
    assert _touch_and_free() < BLOCK_MB / 4  # glibc's default: a large block is unmapped when freed
    with hostmemory.reuse_freed() as active:
        assert active
        assert _touch_and_free() > BLOCK_MB * 0.9  # freed, but still resident for the next allocation
        before_exit = rss_mb()
    assert rss_mb() < before_exit - BLOCK_MB * 0.9  # leaving gives the kept pages back
    assert _touch_and_free() < BLOCK_MB / 4


def test_the_policy_ends_when_the_last_user_leaves() -> None:
    """Two users (threads) overlap: the first one leaving must not end the policy for the other."""
    entered, release = threading.Event(), threading.Event()

    def other() -> None:
        with hostmemory.reuse_freed():
            entered.set()
            release.wait(30)

    t = threading.Thread(target=other)
    t.start()
    assert entered.wait(30)
    with hostmemory.reuse_freed():
        pass
    try:
        assert _touch_and_free() > BLOCK_MB * 0.9  # still active: the other user is inside
    finally:
        release.set()
        t.join()
    hostmemory.trim()
    assert _touch_and_free() < BLOCK_MB / 4
