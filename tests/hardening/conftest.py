"""Fixtures for hardening tests: an in-process app over the real job engine with a stand-in runner (fast,
gated so tests control timing), keys files, and small images. Real-server fixtures live in the load/fault
modules that need them."""

from __future__ import annotations

import threading
from collections.abc import Callable
from pathlib import Path

import pytest
from fastapi.testclient import TestClient
from hardening_helpers import png_bytes

from ccsr.api.app import create_app
from ccsr.api.settings import Settings
from ccsr.jobs import JobCancelled, RunOutput, build_embedded_engine

OUT_PNG = png_bytes((32, 32))


class GatedRunner:
    """Holds each job until ``gate`` is set (set by default); honours cancellation like the sampler."""

    def __init__(self):
        self.gate = threading.Event()
        self.gate.set()
        self.started = threading.Event()

    def load(self) -> None:
        pass

    def run(self, job, input_bytes, *, progress, should_cancel, log):
        self.started.set()
        while not self.gate.wait(0.01):
            if should_cancel():
                raise JobCancelled()
        progress(1.0)
        return RunOutput(OUT_PNG, "image/png", "png", 32, 32, job.params.seed or 1)


@pytest.fixture
def runner() -> GatedRunner:
    return GatedRunner()


@pytest.fixture
def make_client(tmp_path: Path, runner: GatedRunner) -> Callable[..., TestClient]:
    """``make_client(**settings)`` -> a started TestClient; closed at teardown."""
    clients: list[TestClient] = []

    def make(**kw) -> TestClient:
        kw.setdefault("data_dir", tmp_path / f"data-{len(clients)}")
        kw.setdefault("default_steps", 2)
        settings = Settings(**kw)
        engine = build_embedded_engine(
            settings.data_dir,
            runner=runner,
            max_queue=settings.max_queue,
            fetch_allow_hosts=settings.fetch_allow_hosts,
        )
        engine.executor.idle_poll = 0.02
        client = TestClient(create_app(settings, engine))
        client.__enter__()
        clients.append(client)
        return client

    yield make
    runner.gate.set()
    for c in clients:
        c.__exit__(None, None, None)
