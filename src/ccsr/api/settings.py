"""Server settings: one dataclass filled from command-line options and ``CCSR_*`` environment variables."""

from __future__ import annotations

import ipaddress
import os
from dataclasses import dataclass, field
from pathlib import Path

from .auth import Denied, KeyRing, Principal, RateLimiter


def default_data_dir() -> Path:
    """``$CCSR_DATA_DIR``, else the per-user data directory (``$XDG_DATA_HOME/ccsr``, ``~/.local/share/ccsr``):
    never the working directory, so a server started anywhere finds its jobs and images again."""
    if os.environ.get("CCSR_DATA_DIR"):
        return Path(os.environ["CCSR_DATA_DIR"])
    base = os.environ.get("XDG_DATA_HOME") or os.path.join(os.path.expanduser("~"), ".local", "share")
    return Path(base) / "ccsr"


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
    data_dir: Path = field(default_factory=default_data_dir)
    api_keys: list[str] = field(default_factory=list)  # empty: open on loopback only; hashed, then cleared
    api_keys_file: str | None = None  # sha256 digests, one per line (see ccsr.api.auth); re-read on change
    rate_limit: float = 0.0  # requests per second per key (0: off); a keys-file line may override it
    rate_burst: int = 0  # bucket size (0: ceil(rate_limit))
    key_max_queue: int = 0  # queued+running jobs per key (0: only the global max_queue)
    max_body_bytes: int | None = None  # None: room for a data URI of max_input_bytes plus 1 MiB
    max_json_depth: int = 32
    max_tasks: int = 16  # Runware tasks per request or WebSocket frame
    ws_max_frame: int | None = None  # None: max_body_bytes
    ws_idle_timeout: float = 300.0  # seconds without a frame (and no task pending) before the server closes
    webhook_timeout: float = 15.0  # per webhook / upload attempt
    webhook_attempts: int = 5  # then the delivery gives up (logged, kept in the delivery history)
    drain_timeout: float = 600.0  # on SIGTERM: longest wait for the running job
    log_format: str = "text"  # text or json
    public_url: str | None = None  # base of image URLs; None: the request's own scheme and Host
    max_queue: int = 64
    image_ttl: float = 24 * 3600.0  # default lifetime of uploads and outputs (seconds)
    min_ttl: float = 60.0
    sync_timeout: float = 600.0  # longest a sync request waits for its job
    price_per_second: float = 0.0  # includeCost: inference seconds x this
    fetch_allow_hosts: list[str] = field(default_factory=list)  # host[:port] allowed despite SSRF rules
    fetch_timeout: float = 30.0
    fetch_workers: int = 8  # concurrent input-image downloads (their own threads); more wait up to fetch_timeout
    max_input_bytes: int = 50 * 1024 * 1024
    max_output_side: int = 4096  # Runware cap (width and height)
    default_steps: int | None = None  # None: UpscaleParams' default
    size_mode: str = "reference"  # how the model reaches its size: reference (parity) or pad (faster)
    log_level: str = "info"
    quantize: str | None = None
    broker_url: str | None = None  # redis://...: this server is one API replica; jobs run on `ccsr worker`s
    store_url: str | None = None  # with broker_url: s3://bucket/prefix[?endpoint_url=...] or a shared directory
    extra: dict = field(default_factory=dict)  # room for other adapters' options (fal: tls files, …)
    # runtime state of the key policy (built on first use; never compared or shown)
    _keyring: KeyRing | None = field(default=None, repr=False, compare=False)
    _limiter: RateLimiter = field(default_factory=RateLimiter, repr=False, compare=False)

    def body_limit(self) -> int:
        return self.max_body_bytes or self.max_input_bytes * 4 // 3 + (1 << 20)

    def frame_limit(self) -> int:
        return self.ws_max_frame or self.body_limit()

    def keyring(self) -> KeyRing:
        """The accepted keys as digests; the first call hashes ``api_keys`` and drops the plaintext."""
        ring = self._keyring
        if ring is None:
            ring = self._keyring = KeyRing([], self.api_keys_file)
        if self.api_keys:
            ring.add(self.api_keys)
            self.api_keys = []
        return ring

    def keys_required(self) -> bool:
        return self.keyring().configured()

    def key_ok(self, key: str | None, client_host: str | None) -> bool:
        """Configured keys: the key must match. No keys: any key, but only from a loopback client."""
        ring = self.keyring()
        if ring.configured():
            return ring.lookup(key) is not None
        return is_loopback(client_host)

    def principal(self, key: str | None, client_host: str | None) -> Principal:
        """Who is calling, with their limits; raises Denied(401) for a bad key or a remote keyless client."""
        ring = self.keyring()
        if ring.configured():
            entry = ring.lookup(key)
            if entry is None:
                raise Denied(401, "invalid API key")
            rate = self.rate_limit if entry.rate is None else entry.rate
            burst = self.rate_burst if entry.burst is None else entry.burst
            quota = self.key_max_queue if entry.quota is None else entry.quota
            return Principal(entry.name, rate, burst, quota)
        if not is_loopback(client_host):
            raise Denied(401, "this server has no API keys configured and accepts loopback clients only")
        return Principal(f"anon:{client_host}", self.rate_limit, self.rate_burst, self.key_max_queue)

    def admit(self, key: str | None, client_host: str | None) -> Principal:
        """:meth:`principal` plus one token of its rate limit; raises Denied(429) with a Retry-After."""
        who = self.principal(key, client_host)
        self.admit_principal(who)
        return who

    def admit_principal(self, who: Principal) -> None:
        wait = self._limiter.take(who)
        if wait > 0:
            raise Denied(429, f"rate limit of {who.rate:g} requests/s exceeded for {who.id}", retry_after=wait)

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
        s.broker_url = env.get("CCSR_BROKER_URL") or s.broker_url
        s.store_url = env.get("CCSR_STORE") or s.store_url
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
        if env.get("CCSR_FETCH_WORKERS"):
            s.fetch_workers = int(env["CCSR_FETCH_WORKERS"])
        if env.get("CCSR_MAX_OUTPUT_SIDE"):
            s.max_output_side = int(env["CCSR_MAX_OUTPUT_SIDE"])
        if env.get("CCSR_DEFAULT_STEPS"):
            s.default_steps = int(env["CCSR_DEFAULT_STEPS"])
        s.size_mode = env.get("CCSR_SIZE_MODE") or s.size_mode
        s.api_keys_file = env.get("CCSR_API_KEYS_FILE") or s.api_keys_file
        for name, conv in (("rate_limit", float), ("rate_burst", int), ("key_max_queue", int), ("max_tasks", int)):
            if env.get(f"CCSR_{name.upper()}"):
                setattr(s, name, conv(env[f"CCSR_{name.upper()}"]))
        s.log_format = env.get("CCSR_LOG_FORMAT") or s.log_format
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
