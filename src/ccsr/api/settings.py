"""Server settings: one dataclass, declared once; :data:`OPTIONS` names each setting on the command line
(``ccsr serve --flag``), in the environment (``CCSR_*``) and in ``--help``."""

from __future__ import annotations

import argparse
import ipaddress
import os
from dataclasses import dataclass, field, fields
from pathlib import Path

from .auth import Denied, KeyRing, Principal, RateLimiter


def default_data_dir() -> Path:
    """``$CCSR_DATA_DIR``, else the per-user data directory (``$XDG_DATA_HOME/ccsr``, ``~/.local/share/ccsr``):
    never the working directory, so a server started anywhere finds its jobs and images again."""
    if os.environ.get("CCSR_DATA_DIR"):
        return Path(os.environ["CCSR_DATA_DIR"])
    base = os.environ.get("XDG_DATA_HOME") or os.path.join(os.path.expanduser("~"), ".local", "share")
    return Path(base) / "ccsr"


@dataclass
class Settings:
    host: str = "127.0.0.1"
    port: int = 8000
    weights: str | None = None  # None: the library's default model reference
    models: list[str] = field(default_factory=list)  # NAME or NAME=WEIGHTS; empty: ccsr-v1 alone (from weights)
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
    # -- the distributed backend: replicas and `ccsr worker` (rows in the worker block of OPTIONS)
    celery_queue: str = "ccsr"  # base of the Celery queue names: a model's jobs go to <base>.<model>
    max_attempts: int = 2  # runs of a job cut off by dying workers before it fails
    worker_name: str | None = None  # None: host-pid
    redis_prefix: str = "ccsr:"
    soft_time_limit: float = 1800.0
    time_limit: float | None = None  # None: soft + 60
    visibility_timeout: float | None = None  # None: hard + 300
    lease: float = 30.0
    no_warmup: bool = False
    fal_app_ids: list[str] = field(default_factory=list)  # more fal ``owner/alias`` ids served, besides the models'
    tls_cert: str | None = None  # PEM files: serve HTTPS (ccsr.api.tls)
    tls_key: str | None = None
    tls_self_signed: str | None = None  # a folder for a self-signed localhost certificate, made once
    # runtime state of the key policy (built on first use; never compared or shown)
    _keyring: KeyRing | None = field(default=None, repr=False, compare=False)
    _limiter: RateLimiter = field(default_factory=RateLimiter, repr=False, compare=False)

    def served_models(self, *, loading: bool | None = None) -> dict[str, str | None]:
        """The models this server (or worker) serves, name -> weights (``None``: ccsr-v1's ``weights``, then the
        library's default). ``loading``: whether this process loads them (default: unless it is an API replica of
        the distributed backend, ``broker_url`` set, whose workers load them). Raises ValueError for an unknown
        name, a repeated one or, when loading, a ccsr-v2 without its folder."""
        from .intake import MODELS_BY_NAME

        loading = not self.broker_url if loading is None else loading
        served: dict[str, str | None] = {}
        for entry in self.models or ["ccsr-v1"]:
            name, _, weights = entry.partition("=")
            name, weights = name.strip(), weights.strip() or None
            if name not in MODELS_BY_NAME:
                raise ValueError(f"--model {entry}: unknown model {name!r} (known: {', '.join(MODELS_BY_NAME)})")
            if name in served:
                raise ValueError(f"--model {name} is given twice")
            if name == "ccsr-v1":
                weights = weights or self.weights
            elif weights is None and loading:
                raise ValueError(f"--model {name}: give its weights folder, --model {name}=FOLDER")
            served[name] = weights
        return served

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

    def admit_principal(self, who: Principal) -> None:
        """One token of ``who``'s rate limit (the per-process bucket every route shares); raises Denied(429) with a
        Retry-After. Routes call :func:`ccsr.api.intake.admit`."""
        wait = self._limiter.take(who)
        if wait > 0:
            raise Denied(429, f"rate limit of {who.rate:g} requests/s exceeded for {who.id}", retry_after=wait)

    @classmethod
    def from_env(cls, env: dict[str, str] | None = None, **overrides) -> Settings:
        """Defaults, then every :data:`OPTIONS` variable set in ``env`` (``os.environ``), then ``overrides``."""
        s = cls()
        env = os.environ if env is None else env
        for opt in OPTIONS:
            raw = next((env[name] for name in opt.env_names if env.get(name)), None)
            if raw is not None:
                setattr(s, opt.name, opt.parse(raw))
        for k, v in overrides.items():
            setattr(s, k, v)
        return s


@dataclass(frozen=True)
class Option:
    """One server setting as the outside names it: the :class:`Settings` field it fills (its type and default
    come from there), the ``--flag`` and the ``CCSR_*`` variable (both derived from the name unless given), and
    the help line. ``ccsr serve`` flags, the environment and ``--help`` are all made from :data:`OPTIONS`."""

    name: str
    help: str
    group: str = "server"
    flag: str | None = None
    env: tuple[str, ...] = ()
    choices: tuple[str, ...] | None = None
    shown_default: str | None = None  # how --help names a default that is computed
    hidden: bool = False
    commands: tuple[str, ...] = ("serve",)  # the commands that take it: serve, worker
    metavar: str | None = None  # how --help names the value (default: the flag's name)

    @property
    def flag_name(self) -> str:
        return self.flag or "--" + self.name.replace("_", "-")

    @property
    def env_names(self) -> tuple[str, ...]:
        return self.env or ("CCSR_" + self.name.upper(),)

    @property
    def many(self) -> bool:
        """A list: a repeatable flag, a comma-separated variable."""
        return _FIELD_TYPES[self.name].startswith("list")

    @property
    def switch(self) -> bool:
        """A yes/no setting: a flag without a value, a variable read as 1/true/yes/on."""
        return _FIELD_TYPES[self.name] == "bool"

    def convert(self, text: str):
        kind = _FIELD_TYPES[self.name].split("|")[0].strip()
        if kind == "bool":
            return text.strip().lower() in ("1", "true", "yes", "on")
        return {"int": int, "float": float, "Path": Path}.get(kind, str)(text)

    def parse(self, raw: str):
        if self.many:
            return [x.strip() for x in raw.replace(";", ",").split(",") if x.strip()]
        return self.convert(raw)

    def help_text(self) -> str:
        default = self.shown_default
        if default is None:
            value = getattr(Settings(), self.name)
            default = ("" if value in (None, []) or isinstance(value, bool) else f", {value:g}"
                       if isinstance(value, float) else f", {value}")
        else:
            default = f", {default}"
        return f"{self.help} [{'/'.join(self.env_names)}{default}]"


_FIELD_TYPES = {f.name: str(f.type) for f in fields(Settings)}

BOTH = ("serve", "worker")  # Option.commands of a row `ccsr serve` and `ccsr worker` share
OPTIONS: tuple[Option, ...] = (
    Option("host", "bind address"),
    Option("port", "port"),
    Option("data_dir", "job database and image store", shown_default="$XDG_DATA_HOME/ccsr or ~/.local/share/ccsr"),
    Option("api_keys", "accepted API key; repeat for several (comma-separated in the variable). Without any, only "
           "loopback clients are served", flag="--api-key", env=("CCSR_API_KEYS", "CCSR_API_KEY")),
    Option("api_keys_file", "file of sha256 key digests, one per line, optionally 'name rate=R burst=B quota=Q'; "
           "re-read when it changes or on SIGHUP (revocation). Digest: printf %%s KEY | sha256sum"),
    Option("rate_limit", "requests per second per key, 429 + Retry-After past it; 0: off"),
    Option("rate_burst", "rate-limit bucket size; 0: the rate"),
    Option("key_max_queue", "queued+running jobs per key before 429, counted by the job store; 0: only --max-queue"),
    Option("max_body_bytes", "largest request body / WebSocket frame",
           shown_default="a data URI of --max-input-bytes + 1 MiB"),
    Option("max_json_depth", "deepest JSON nesting accepted"),
    Option("max_tasks", "Runware tasks per request or frame"),
    Option("ws_idle_timeout", "close a WebSocket silent this long with no task pending"),
    Option("webhook_timeout", "seconds per webhook / upload attempt"),
    Option("webhook_attempts", "attempts (with backoff) before a delivery gives up"),
    Option("drain_timeout", "on SIGTERM, longest wait for the running job"),
    Option("log_format", "json: one object per line with the task id", choices=("text", "json"), commands=BOTH),
    Option("broker_url", "Redis URL of the distributed backend: `ccsr serve` runs as one API replica, jobs run on "
           "`ccsr worker`s", flag="--broker", commands=BOTH),
    Option("store_url", "with --broker: image store shared by replicas and workers, s3://bucket/prefix or a shared "
           "directory", flag="--store", env=("CCSR_STORE",), commands=BOTH),
    Option("public_url", "base URL of links to images (default: the request's scheme and Host)"),
    Option("max_queue", "queued+running jobs before 429"),
    Option("image_ttl", "seconds uploads and outputs are kept", commands=BOTH),
    Option("sync_timeout", "longest wait of a sync request"),
    Option("price_per_second", "cost reported with includeCost = inference seconds x this"),
    Option("fetch_allow_hosts", "HOST[:PORT] the URL fetcher / webhooks may reach despite the SSRF rules (e.g. a "
           "loopback sink); repeatable", flag="--allow-fetch-host", env=("CCSR_ALLOW_FETCH_HOSTS",)),
    Option("fetch_timeout", "seconds per input-image download (connect, each read; four times that in all)"),
    Option("fetch_workers", "concurrent input-image downloads, on threads of their own"),
    Option("max_input_bytes", "largest accepted input file", commands=BOTH),
    Option("default_steps", "steps when a request gives none", shown_default="the model default"),
    Option("max_output_side", "Runware output cap (both sides); larger requests shrink the input first"),
    Option("size_mode", "reference: the original resize path (bit parity); pad: reflect-pad, no second resample, "
           "faster on small inputs", choices=("reference", "pad")),
    Option("log_level", "debug, info, warning, error", commands=BOTH),
    Option("fal_app_ids", "another fal app id (owner/alias) served like fal-ai/ccsr; repeatable", flag="--fal-app-id"),
    Option("models", "a model to load and serve, NAME or NAME=WEIGHTS; repeatable (comma-separated in the "
           "variable). ccsr-v1 (Runware runware:501@1, fal fal-ai/ccsr) takes its weights from --weights unless "
           "given; ccsr-v2 (Runware ccsr:2@1, fal fal-ai/ccsr-v2) needs its folder: --model ccsr-v1 --model "
           "ccsr-v2=/models/ccsr-v2 serves both. An API replica (--broker) names the models its workers serve",
           group="model", flag="--model", shown_default="ccsr-v1", commands=BOTH),
    Option("weights", "CCSR-v1 checkpoint file or hub reference", group="model",
           shown_default="the default CCSR-v1 model", commands=BOTH),
    Option("config", "model YAML", group="model", shown_default="bundled", commands=BOTH),
    Option("device", "cpu, cuda, cuda:1, …", group="model", commands=BOTH),
    Option("dtype", "float32, float16, bfloat16", group="model", commands=BOTH),
    Option("quantize", "", group="model", hidden=True, commands=BOTH),
    Option("tls_cert", "PEM certificate: serve HTTPS instead of HTTP", group="tls", metavar="FILE"),
    Option("tls_key", "PEM private key for --tls-cert", group="tls", metavar="FILE"),
    Option("tls_self_signed", "make (or reuse) DIR/cert.pem + DIR/key.pem for localhost/127.0.0.1 and serve HTTPS "
           "with them; point clients at DIR/cert.pem with SSL_CERT_FILE", group="tls", metavar="DIR"),
    # `ccsr worker`'s own rows and those both commands take (the Celery scale-out)
    Option("celery_queue", "base of the Celery queue names: a model's jobs go to BASE.MODEL (ccsr.ccsr-v2); the "
           "same on replicas and workers", flag="--queue", env=("CCSR_QUEUE",), commands=BOTH),
    Option("max_attempts", "runs of a job cut off by dying workers before it fails", commands=BOTH),
    Option("worker_name", "worker name", group="worker", flag="--name", shown_default="host-pid",
           commands=("worker",)),
    Option("redis_prefix", "", group="worker", flag="--prefix", hidden=True, commands=("worker",)),
    Option("soft_time_limit", "seconds before a job fails with a timeout", group="worker", commands=("worker",)),
    Option("time_limit", "seconds before the worker process is killed", group="worker", shown_default="soft + 60",
           commands=("worker",)),
    Option("visibility_timeout", "seconds before the broker re-delivers an unacknowledged message; above the hard "
           "limit", group="worker", shown_default="hard + 300", commands=("worker",)),
    Option("lease", "a running job's lease: a worker silent this long is taken for dead", group="worker",
           commands=("worker",)),
    Option("no_warmup", "skip the warm-up upscale (one per model) before ready", group="worker",
           commands=("worker",)),
)
GROUPS = {  # --help sections, by Option.group ("server": the command's own section)
    "server": None,
    "model": "model",
    "tls": "TLS (optional; an unmodified fal_client speaks only https: README, Server)",
    "worker": None,
}




def options_for(command: str) -> tuple[Option, ...]:
    """The rows of :data:`OPTIONS` that ``ccsr COMMAND`` takes."""
    return tuple(o for o in OPTIONS if command in o.commands)


def add_arguments(parser: argparse.ArgumentParser, command: str) -> None:
    """One flag per row of :data:`OPTIONS` that ``ccsr COMMAND`` takes, in its ``--help`` section; an unset flag
    leaves the environment's value (:func:`settings_from_args`)."""
    sections: dict[str, argparse._ArgumentGroup] = {}
    for opt in options_for(command):
        title = GROUPS[opt.group] or command
        group = sections.get(title) or sections.setdefault(title, parser.add_argument_group(title))
        kind: dict = {"action": "store_true"} if opt.switch else {
            "type": opt.convert, "action": "append" if opt.many else "store", "choices": opt.choices,
            "metavar": None if opt.choices else opt.metavar or opt.flag_name[2:].upper().replace("-", "_")}
        group.add_argument(opt.flag_name, dest=opt.name, default=None,
                           help=argparse.SUPPRESS if opt.hidden else opt.help_text(), **kind)


def settings_from_args(args: argparse.Namespace) -> Settings:
    """Defaults, then the environment, then the flags given."""
    given = {o.name: getattr(args, o.name) for o in OPTIONS if getattr(args, o.name, None) is not None}
    return Settings.from_env(**given)


def is_loopback(host: str | None) -> bool:
    if not host:
        return False
    if host in ("localhost", "testclient"):
        return True
    try:
        return ipaddress.ip_address(host.split("%")[0]).is_loopback
    except ValueError:
        return False
