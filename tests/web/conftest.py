"""Fixtures for the playground's browser tests: a real ``ccsr serve`` subprocess with the tiny models (CCSR-v1,
the page's first choice, and CCSR-v2) on 127.0.0.1, and Debian's headless Chromium driven by Selenium through
``/usr/bin/chromedriver``.

A missing browser is a failure, not a skip: ``apt-get install -y chromium chromium-driver``.
"""

from __future__ import annotations

import os
import shutil
import socket
import subprocess
import sys
import time
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path

import httpx
import pytest
from tests.conftest import TINY_CONFIG, TINY_WEIGHTS

REPO = Path(__file__).resolve().parents[2]
ARTIFACTS = REPO / "tests" / "_artifacts"
TINY_V2 = REPO / "tests" / "fixtures" / "ccsr_v2_tiny" / "model"
CHROMIUM = Path(os.environ.get("CCSR_CHROMIUM", "/usr/bin/chromium"))
CHROMEDRIVER = Path(os.environ.get("CCSR_CHROMEDRIVER", "/usr/bin/chromedriver"))


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@dataclass
class Server:
    base: str
    proc: subprocess.Popen
    log_path: Path

    def log(self) -> str:
        return self.log_path.read_text(errors="replace")[-6000:]


@contextmanager
def serve(tmp: Path, args: list[str], ready: Callable[[httpx.Response], bool], threads: int = 2) -> Iterator[Server]:
    """``ccsr serve ARGS`` on a free loopback port (host, port and data dir added), yielded once ``ready`` accepts
    its /readyz answer; stopped on exit. A server that exits or is not ready within 120 s fails the test."""
    port = _free_port()
    log_path = tmp / "server.log"
    env = dict(os.environ, OMP_NUM_THREADS=str(threads), HF_HUB_OFFLINE="1")
    env["PYTHONPATH"] = os.pathsep.join([str(REPO / "src"), str(REPO), env.get("PYTHONPATH", "")])
    cmd = [sys.executable, "-m", "ccsr.api.serve", "--host", "127.0.0.1", "--port", str(port),
           "--data-dir", str(tmp / "data"), "--log-level", "warning", *args]  # fmt: skip
    with open(log_path, "wb") as log:
        proc = subprocess.Popen(cmd, stdout=log, stderr=subprocess.STDOUT, env=env, cwd=REPO)
    srv = Server(f"http://127.0.0.1:{port}", proc, log_path)
    try:
        deadline = time.monotonic() + 120
        while True:
            if proc.poll() is not None:
                pytest.fail(f"ccsr serve exited with {proc.returncode}:\n{srv.log()}")
            try:
                if ready(httpx.get(f"{srv.base}/readyz", timeout=2)):
                    break
            except (httpx.HTTPError, ValueError):
                pass
            if time.monotonic() > deadline:
                pytest.fail(f"ccsr serve not ready after 120 s:\n{srv.log()}")
            time.sleep(0.25)
        yield srv
    finally:
        proc.terminate()
        try:
            proc.wait(15)
        except subprocess.TimeoutExpired:
            proc.kill()
            proc.wait(5)


@pytest.fixture(scope="session")
def server(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Server]:
    """A real ``ccsr serve`` process with the tiny models on a free loopback port."""
    args = [
        "--weights", str(TINY_WEIGHTS), "--config", str(TINY_CONFIG), "--device", "cpu", "--size-mode", "pad",
        "--model", "ccsr-v1", "--model", f"ccsr-v2={TINY_V2}",
    ]  # fmt: skip
    with serve(tmp_path_factory.mktemp("playground-server"), args, lambda r: r.status_code == 200) as srv:
        yield srv


@pytest.fixture(scope="session")
def downloads(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return tmp_path_factory.mktemp("downloads")


@pytest.fixture(scope="session")
def browser(tmp_path_factory: pytest.TempPathFactory, downloads: Path):
    """Headless Chromium; fails (never skips) with the install command when it is missing."""
    missing = [str(p) for p in (CHROMIUM, CHROMEDRIVER) if not p.is_file()]
    if missing:
        pytest.fail(
            f"browser tests need Debian's Chromium and its driver, missing: {', '.join(missing)}. "
            "Install them with: apt-get update && apt-get install -y chromium chromium-driver"
        )
    from selenium import webdriver
    from selenium.webdriver.chrome.service import Service

    os.environ["SE_AVOID_STATS"] = "true"  # Selenium Manager never runs: both paths are given
    opts = webdriver.ChromeOptions()
    opts.binary_location = str(CHROMIUM)
    for flag in (
        "--headless", "--no-sandbox", "--disable-gpu", "--disable-quic", "--no-first-run",
        "--disable-background-networking", "--disable-component-update", "--disable-sync",
        "--disable-dev-shm-usage", "--window-size=1280,1100",
        f"--user-data-dir={tmp_path_factory.mktemp('chromium-profile')}",
    ):  # fmt: skip
        opts.add_argument(flag)
    opts.set_capability("goog:loggingPrefs", {"browser": "ALL"})
    opts.add_experimental_option(
        "prefs", {"download.default_directory": str(downloads), "download.prompt_for_download": False}
    )
    if not shutil.which(str(CHROMEDRIVER)):
        pytest.fail(f"{CHROMEDRIVER} is not executable")
    driver = webdriver.Chrome(options=opts, service=Service(executable_path=str(CHROMEDRIVER)))
    driver.execute_cdp_cmd("Browser.setDownloadBehavior", {"behavior": "allow", "downloadPath": str(downloads)})
    try:
        yield driver
    finally:
        driver.quit()
