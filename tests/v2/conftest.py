"""CCSR-v2 golden data and one tiny v2 pipeline per session."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest
from tests.conftest import REPO

V2_FIXTURES = REPO / "tests" / "fixtures" / "ccsr_v2_tiny"
V2_MODEL = V2_FIXTURES / "model"
COMPONENTS = V2_FIXTURES / "components"
PUBLIC_CASES = sorted(p.name for p in V2_FIXTURES.glob("case_*") if not json.loads(
    (p / "case.json").read_text()).get("informational"))


def relative_error(actual, expected) -> float:  # type: ignore[no-untyped-def]
    """max |actual - expected| relative to max |expected| (the fixtures' tolerance measure)."""
    a, e = np.asarray(actual, np.float64), np.asarray(expected, np.float64)
    assert a.shape == e.shape, (a.shape, e.shape)
    return float(np.abs(a - e).max() / max(np.abs(e).max(), 1e-30))


@pytest.fixture(scope="session")
def v2_pipeline():
    from ccsr.pipeline_v2 import CCSRv2Pipeline

    return CCSRv2Pipeline.from_pretrained(V2_MODEL, device="cpu", dtype="float32")


@pytest.fixture(scope="session")
def manifest() -> dict:
    return json.loads((COMPONENTS / "manifest.json").read_text())


def component(name: str) -> np.ndarray:
    return np.load(COMPONENTS / name)


def case_meta(case: str) -> dict:
    return json.loads((V2_FIXTURES / case / "case.json").read_text())


def case_dir(case: str) -> Path:
    return V2_FIXTURES / case
