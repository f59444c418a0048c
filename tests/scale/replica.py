"""An API replica for the scale tests: ``ccsr serve --broker ... --store ...`` plus ``--claim-idle``.

The chaos test needs a short takeover delay for announcements of a killed replica, which ``ccsr serve`` does not
expose; everything else is the real serve code path (same options, same app factory, same engine builder).
"""

from __future__ import annotations

import argparse
import logging
import sys

import uvicorn

from ccsr.api.app import create_app
from ccsr.api.serve import add_arguments, settings_from_args
from ccsr.jobs.distributed import build_distributed_engine


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="replica")
    add_arguments(parser)
    parser.add_argument("--claim-idle", type=float, default=60.0)
    args = parser.parse_args(argv)
    settings = settings_from_args(args)
    logging.basicConfig(level="INFO", format="%(asctime)s %(levelname)s %(name)s: %(message)s")
    engine = build_distributed_engine(
        settings.broker_url,
        settings.store_url,
        max_queue=settings.max_queue,
        image_ttl=settings.image_ttl,
        fetch_allow_hosts=settings.fetch_allow_hosts,
        queue=settings.celery_queue,
        max_attempts=settings.max_attempts,
        claim_idle=args.claim_idle,
    )
    app = create_app(settings, engine=engine)
    app.state.fal_storage_key = engine.shared_secret("fal_storage")  # upload tokens valid on every replica
    uvicorn.run(app, host=settings.host, port=settings.port, log_level="warning", timeout_graceful_shutdown=2)
    return 0


if __name__ == "__main__":
    sys.exit(main())
