"""``ccsr serve``: options, environment variables, and running uvicorn.

``add_arguments(parser)`` declares the options (made from :data:`ccsr.api.settings.OPTIONS`, where each setting
is declared once); ``run(args) -> int`` starts the server. Every option has a ``CCSR_*`` environment variable
(shown in ``--help``); options win over the environment.
``python -m ccsr.api.serve …`` runs the same thing.
"""

from __future__ import annotations

import argparse
import signal
import sys

from . import settings as settings_table
from .settings import is_loopback, settings_from_args


def add_arguments(parser: argparse.ArgumentParser) -> None:
    """One flag per :data:`~ccsr.api.settings.OPTIONS` row that ``ccsr serve`` takes."""
    settings_table.add_arguments(parser, "serve")


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
    try:
        settings.served_models()
    except ValueError as e:
        print(f"ccsr serve: error: {e}", file=sys.stderr)
        return 2
    from .app import create_app

    app = create_app(settings)
    if hasattr(signal, "SIGHUP"):  # revoke / add keys without a restart
        signal.signal(signal.SIGHUP, lambda *_: settings.keyring().reload())
    kwargs: dict = {}
    if settings.tls_cert or settings.tls_key or settings.tls_self_signed:
        from .tls import uvicorn_ssl_kwargs

        try:
            kwargs = uvicorn_ssl_kwargs(settings.tls_cert, settings.tls_key, settings.tls_self_signed)
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
