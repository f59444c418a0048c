"""``ccsr serve``: options, environment variables, and running uvicorn.

``add_arguments(parser)`` declares the options; ``run(args) -> int`` starts the server. Every option has a
``CCSR_*`` environment variable (shown in ``--help``); options win over the environment.
``python -m ccsr.api.serve …`` runs the same thing.
"""

from __future__ import annotations

import argparse
import os
import signal
import sys
from pathlib import Path

from .settings import Settings, default_data_dir, is_loopback


def _env(name: str, default=None):
    v = os.environ.get(name)
    return v if v not in (None, "") else default


def add_arguments(parser: argparse.ArgumentParser) -> None:
    g = parser.add_argument_group("server")
    g.add_argument("--host", default=_env("CCSR_HOST", "127.0.0.1"), help="bind address [CCSR_HOST, 127.0.0.1]")
    g.add_argument("--port", type=int, default=int(_env("CCSR_PORT", 8000)), help="port [CCSR_PORT, 8000]")
    g.add_argument(
        "--data-dir",
        default=str(default_data_dir()),
        help="job database and image store [CCSR_DATA_DIR, $XDG_DATA_HOME/ccsr or ~/.local/share/ccsr]",
    )
    g.add_argument(
        "--api-key",
        action="append",
        default=None,
        help="accepted API key; repeat for several [CCSR_API_KEYS, comma-separated]. Without any, "
        "only loopback clients are served",
    )
    g.add_argument(
        "--api-keys-file",
        default=_env("CCSR_API_KEYS_FILE"),
        help="file of sha256 key digests, one per line, optionally 'name rate=R burst=B quota=Q'; re-read when"
        " it changes or on SIGHUP (revocation) [CCSR_API_KEYS_FILE]. Digest: printf %%s KEY | sha256sum",
    )
    g.add_argument(
        "--rate-limit",
        type=float,
        default=float(_env("CCSR_RATE_LIMIT", 0)),
        help="requests per second per key, 429 + Retry-After past it; 0: off [CCSR_RATE_LIMIT, 0]",
    )
    g.add_argument(
        "--rate-burst", type=int, default=int(_env("CCSR_RATE_BURST", 0)), help="[CCSR_RATE_BURST, the rate]"
    )
    g.add_argument(
        "--key-max-queue",
        type=int,
        default=int(_env("CCSR_KEY_MAX_QUEUE", 0)),
        help="queued+running jobs per key before 429; 0: only --max-queue [CCSR_KEY_MAX_QUEUE, 0]",
    )
    g.add_argument(
        "--max-body-bytes",
        type=int,
        default=_env("CCSR_MAX_BODY_BYTES"),
        help="largest request body / WebSocket frame [CCSR_MAX_BODY_BYTES, a data URI of --max-input-bytes + 1 MiB]",
    )
    g.add_argument(
        "--max-json-depth", type=int, default=int(_env("CCSR_MAX_JSON_DEPTH", 32)), help="[CCSR_MAX_JSON_DEPTH, 32]"
    )
    g.add_argument(
        "--max-tasks",
        type=int,
        default=int(_env("CCSR_MAX_TASKS", 16)),
        help="Runware tasks per request or frame [CCSR_MAX_TASKS, 16]",
    )
    g.add_argument(
        "--ws-idle-timeout",
        type=float,
        default=float(_env("CCSR_WS_IDLE_TIMEOUT", 300)),
        help="close a WebSocket silent this long with no task pending [CCSR_WS_IDLE_TIMEOUT, 300]",
    )
    g.add_argument(
        "--webhook-timeout",
        type=float,
        default=float(_env("CCSR_WEBHOOK_TIMEOUT", 15)),
        help="seconds per webhook / upload attempt [CCSR_WEBHOOK_TIMEOUT, 15]",
    )
    g.add_argument(
        "--webhook-attempts",
        type=int,
        default=int(_env("CCSR_WEBHOOK_ATTEMPTS", 5)),
        help="attempts (with backoff) before a delivery gives up [CCSR_WEBHOOK_ATTEMPTS, 5]",
    )
    g.add_argument(
        "--drain-timeout",
        type=float,
        default=float(_env("CCSR_DRAIN_TIMEOUT", 600)),
        help="on SIGTERM, longest wait for the running job [CCSR_DRAIN_TIMEOUT, 600]",
    )
    g.add_argument(
        "--log-format",
        choices=("text", "json"),
        default=_env("CCSR_LOG_FORMAT", "text"),
        help="json: one object per line with the task id [CCSR_LOG_FORMAT, text]",
    )
    g.add_argument(
        "--broker",
        default=_env("CCSR_BROKER_URL"),
        help="Redis URL: run as one API replica of the distributed backend (jobs run on `ccsr worker`) "
        "[CCSR_BROKER_URL]",
    )
    g.add_argument(
        "--store",
        default=_env("CCSR_STORE"),
        help="with --broker: image store shared with the workers, s3://bucket/prefix or a shared directory "
        "[CCSR_STORE]",
    )
    g.add_argument(
        "--public-url",
        default=_env("CCSR_PUBLIC_URL"),
        help="base URL of links to images (default: the request's scheme and Host) [CCSR_PUBLIC_URL]",
    )
    g.add_argument(
        "--max-queue",
        type=int,
        default=int(_env("CCSR_MAX_QUEUE", 64)),
        help="queued+running jobs before 429 [CCSR_MAX_QUEUE, 64]",
    )
    g.add_argument(
        "--image-ttl",
        type=float,
        default=float(_env("CCSR_IMAGE_TTL", 86400)),
        help="seconds uploads and outputs are kept [CCSR_IMAGE_TTL, 86400]",
    )
    g.add_argument(
        "--sync-timeout",
        type=float,
        default=float(_env("CCSR_SYNC_TIMEOUT", 600)),
        help="longest wait of a sync request [CCSR_SYNC_TIMEOUT, 600]",
    )
    g.add_argument(
        "--price-per-second",
        type=float,
        default=float(_env("CCSR_PRICE_PER_SECOND", 0)),
        help="cost reported with includeCost = inference seconds x this [CCSR_PRICE_PER_SECOND, 0]",
    )
    g.add_argument(
        "--allow-fetch-host",
        action="append",
        default=None,
        metavar="HOST[:PORT]",
        help="host the URL fetcher / webhooks may reach despite the SSRF rules (e.g. a loopback sink);"
        " repeatable [CCSR_ALLOW_FETCH_HOSTS]",
    )
    g.add_argument(
        "--fetch-workers",
        type=int,
        default=int(_env("CCSR_FETCH_WORKERS", 8)),
        help="concurrent input-image downloads, on threads of their own [CCSR_FETCH_WORKERS, 8]",
    )
    g.add_argument(
        "--max-input-bytes",
        type=int,
        default=int(_env("CCSR_MAX_INPUT_BYTES", 50 * 1024 * 1024)),
        help="largest accepted input file [CCSR_MAX_INPUT_BYTES, 50 MiB]",
    )
    g.add_argument(
        "--default-steps",
        type=int,
        default=_env("CCSR_DEFAULT_STEPS"),
        help="steps when a request gives none [CCSR_DEFAULT_STEPS, the model default]",
    )
    g.add_argument(
        "--max-output-side",
        type=int,
        default=int(_env("CCSR_MAX_OUTPUT_SIDE", 4096)),
        help="Runware output cap (both sides); larger requests shrink the input first [CCSR_MAX_OUTPUT_SIDE, 4096]",
    )
    g.add_argument(
        "--size-mode",
        choices=("reference", "pad"),
        default=_env("CCSR_SIZE_MODE", "reference"),
        help="reference: the original resize path (bit parity); pad: reflect-pad, no second resample,"
        " faster on small inputs [CCSR_SIZE_MODE, reference]",
    )
    g.add_argument("--log-level", default=_env("CCSR_LOG_LEVEL", "info"), help="[CCSR_LOG_LEVEL, info]")
    m = parser.add_argument_group("model")
    m.add_argument(
        "--weights",
        default=_env("CCSR_WEIGHTS"),
        help="checkpoint file or hub reference [CCSR_WEIGHTS, the default CCSR-v1 model]",
    )
    m.add_argument("--config", default=_env("CCSR_CONFIG"), help="model YAML [CCSR_CONFIG, bundled]")
    m.add_argument("--device", default=_env("CCSR_DEVICE", "auto"), help="cpu, cuda, cuda:1, … [CCSR_DEVICE, auto]")
    m.add_argument("--dtype", default=_env("CCSR_DTYPE", "auto"), help="float32, float16, bfloat16 [CCSR_DTYPE, auto]")
    m.add_argument("--quantize", default=_env("CCSR_QUANTIZE"), help=argparse.SUPPRESS)
    from .tls import add_tls_arguments

    add_tls_arguments(parser)


def settings_from_args(args: argparse.Namespace) -> Settings:
    keys = list(getattr(args, "api_key", None) or [])
    if not keys:
        keys = [k.strip() for k in (_env("CCSR_API_KEYS") or _env("CCSR_API_KEY") or "").split(",") if k.strip()]
    allow = list(args.allow_fetch_host or [])
    if not allow:
        allow = [h.strip() for h in (_env("CCSR_ALLOW_FETCH_HOSTS") or "").split(",") if h.strip()]
    return Settings(
        host=args.host,
        port=args.port,
        weights=args.weights,
        config=args.config,
        device=args.device,
        dtype=args.dtype,
        data_dir=Path(args.data_dir),
        api_keys=keys,
        api_keys_file=args.api_keys_file,
        rate_limit=args.rate_limit,
        rate_burst=args.rate_burst,
        key_max_queue=args.key_max_queue,
        max_body_bytes=int(args.max_body_bytes) if args.max_body_bytes else None,
        max_json_depth=args.max_json_depth,
        max_tasks=args.max_tasks,
        ws_idle_timeout=args.ws_idle_timeout,
        drain_timeout=args.drain_timeout,
        webhook_timeout=args.webhook_timeout,
        webhook_attempts=args.webhook_attempts,
        log_format=args.log_format,
        public_url=args.public_url,
        max_queue=args.max_queue,
        image_ttl=args.image_ttl,
        sync_timeout=args.sync_timeout,
        price_per_second=args.price_per_second,
        fetch_allow_hosts=allow,
        fetch_workers=args.fetch_workers,
        max_input_bytes=args.max_input_bytes,
        default_steps=int(args.default_steps) if args.default_steps else None,
        log_level=args.log_level,
        size_mode=args.size_mode,
        max_output_side=args.max_output_side,
        quantize=args.quantize,
        broker_url=args.broker,
        store_url=args.store,
        extra={k: v for k, v in vars(args).items() if k.startswith("tls") or k.startswith("ssl")},
    )


def run(args: argparse.Namespace) -> int:
    import uvicorn

    from ccsr.logs import configure

    settings = settings_from_args(args)
    configure(settings.log_level, settings.log_format)
    if not settings.keys_required() and not is_loopback(settings.host):
        print(
            f"ccsr serve: listening on {settings.host} without --api-key; only loopback clients will be served",
            file=sys.stderr,
        )
    if settings.broker_url and not settings.store_url:
        print("ccsr serve: error: --broker needs --store (s3://bucket/prefix or a directory shared with the workers)",
              file=sys.stderr)
        return 2
    from .app import create_app

    app = create_app(settings)
    if hasattr(signal, "SIGHUP"):  # revoke / add keys without a restart
        signal.signal(signal.SIGHUP, lambda *_: settings.keyring().reload())
    kwargs: dict = {}
    if any(getattr(args, n, None) for n in ("tls_cert", "tls_key", "tls_self_signed")):
        from .tls import uvicorn_ssl_kwargs

        try:
            kwargs = uvicorn_ssl_kwargs(
                getattr(args, "tls_cert", None),
                getattr(args, "tls_key", None),
                getattr(args, "tls_self_signed", None),
            )
        except ValueError as e:
            print(f"ccsr serve: {e}", file=sys.stderr)
            return 2
    uvicorn.run(
        app,
        host=settings.host,
        port=settings.port,
        log_level=settings.log_level.lower(),
        ws_ping_interval=None,  # the Runware SDKs keep their own application-level pings
        ws_max_size=settings.frame_limit() + 1024,  # past our own limit: the handler answers in protocol shape
        timeout_graceful_shutdown=5,
        **({"log_config": None} if settings.log_format == "json" else {}),  # uvicorn's loggers -> our JSON
        **kwargs,
    )
    return 0


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="ccsr serve", description="Serve CCSR over the Runware and fal APIs")
    add_arguments(parser)
    return run(parser.parse_args(argv))


if __name__ == "__main__":
    sys.exit(main())
