"""Server settings: one dataclass filled from command-line options and ``CCSR_*`` environment variables."""

from __future__ import annotations

import ipaddress
import os
from dataclasses import dataclass, field
from pathlib import Path


def _env_list(name: str) -> list[str]:
    raw = os.environ.get(name, "")
    return [x.strip() for x in raw.replace(";", ",").split(",") if x.strip()]


@dataclass
class Settings:
    host: str = "127.0.0.1"
    port: int = 8000
    weights: str | None = None  # None: the library's default model reference
    config: str | None = None
    device: str = "auto"
    dtype: str = "auto"
    data_dir: Path = field(default_factory=lambda: Path(os.environ.get("CCSR_DATA_DIR", "./ccsr-data")))
    api_keys: list[str] = field(default_factory=list)  # empty: open on loopback only
    public_url: str | None = None  # base of image URLs; None: the request's own scheme and Host
    max_queue: int = 64
    image_ttl: float = 24 * 3600.0  # default lifetime of uploads and outputs (seconds)
    min_ttl: float = 60.0
    sync_timeout: float = 600.0  # longest a sync request waits for its job
    price_per_second: float = 0.0  # includeCost: inference seconds x this
    fetch_allow_hosts: list[str] = field(default_factory=list)  # host[:port] allowed despite SSRF rules
    fetch_timeout: float = 30.0
    max_input_bytes: int = 50 * 1024 * 1024
    max_output_side: int = 4096  # Runware cap (width and height)
    default_steps: int | None = None  # None: UpscaleParams' default
    size_mode: str = "reference"  # how the model reaches its size: reference (parity) or pad (faster)
    log_level: str = "info"
    quantize: str | None = None
    extra: dict = field(default_factory=dict)  # room for other adapters' options (fal: tls files, …)

    def keys_required(self) -> bool:
        return bool(self.api_keys)

    def key_ok(self, key: str | None, client_host: str | None) -> bool:
        """Configured keys: the key must match. No keys: any key, but only from a loopback client."""
        if self.api_keys:
            return bool(key) and key in self.api_keys
        return is_loopback(client_host)

    @classmethod
    def from_env(cls, **overrides) -> Settings:
        s = cls()
        env = os.environ
        if env.get("CCSR_HOST"):
            s.host = env["CCSR_HOST"]
        if env.get("CCSR_PORT"):
            s.port = int(env["CCSR_PORT"])
        s.weights = env.get("CCSR_WEIGHTS") or s.weights
        s.config = env.get("CCSR_CONFIG") or s.config
        s.device = env.get("CCSR_DEVICE") or s.device
        s.dtype = env.get("CCSR_DTYPE") or s.dtype
        s.api_keys = _env_list("CCSR_API_KEYS") or _env_list("CCSR_API_KEY")
        s.public_url = env.get("CCSR_PUBLIC_URL") or None
        if env.get("CCSR_MAX_QUEUE"):
            s.max_queue = int(env["CCSR_MAX_QUEUE"])
        if env.get("CCSR_IMAGE_TTL"):
            s.image_ttl = float(env["CCSR_IMAGE_TTL"])
        if env.get("CCSR_SYNC_TIMEOUT"):
            s.sync_timeout = float(env["CCSR_SYNC_TIMEOUT"])
        if env.get("CCSR_PRICE_PER_SECOND"):
            s.price_per_second = float(env["CCSR_PRICE_PER_SECOND"])
        s.fetch_allow_hosts = _env_list("CCSR_ALLOW_FETCH_HOSTS")
        if env.get("CCSR_MAX_OUTPUT_SIDE"):
            s.max_output_side = int(env["CCSR_MAX_OUTPUT_SIDE"])
        if env.get("CCSR_DEFAULT_STEPS"):
            s.default_steps = int(env["CCSR_DEFAULT_STEPS"])
        s.size_mode = env.get("CCSR_SIZE_MODE") or s.size_mode
        for k, v in overrides.items():
            setattr(s, k, v)
        return s


def is_loopback(host: str | None) -> bool:
    if not host:
        return False
    if host in ("localhost", "testclient"):
        return True
    try:
        return ipaddress.ip_address(host.split("%")[0]).is_loopback
    except ValueError:
        return False
