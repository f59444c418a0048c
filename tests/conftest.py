"""Shared test fixtures: where the golden data lives and one tiny pipeline per session."""

from __future__ import annotations

import os
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[1]
FIXTURES = REPO / "tests" / "fixtures" / "ccsr_v1_tiny"
TINY_WEIGHTS = FIXTURES / "model.safetensors"
TINY_CKPT = FIXTURES / "model.ckpt"
TINY_CONFIG = FIXTURES / "model.yaml"


def pytest_configure(config: pytest.Config) -> None:
    if not TINY_CONFIG.is_file():
        raise pytest.UsageError(f"golden fixtures not found at {FIXTURES}")
    # Tests never download: any accidental hub access fails fast instead of hanging.
    os.environ.setdefault("HF_HUB_OFFLINE", "1")


@pytest.fixture(scope="session")
def fixtures() -> Path:
    return FIXTURES


@pytest.fixture(scope="session")
def tiny_pipeline():
    from ccsr.pipeline import CCSRPipeline

    return CCSRPipeline.from_single_file(TINY_WEIGHTS, config=TINY_CONFIG, device="cpu")
