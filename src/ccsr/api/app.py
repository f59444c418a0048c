"""The app factory: one FastAPI app serving every protocol over one job engine.

Extending it: a protocol module listed in :data:`ROUTER_MODULES` is imported when present; if it defines
``router`` (a FastAPI ``APIRouter``) the router is included, and if it defines ``setup(app, engine,
settings)`` that is called once at creation (register job listeners there). Runware routes are included
first; ``ccsr.api.fal`` (when it exists) after them. Other code can call :func:`register_router_module`
before :func:`create_app`.

Shared helpers for adapters: :func:`get_engine`, :func:`get_settings`, :func:`public_base`,
:func:`client_host`, :func:`image_url`, :func:`model_readiness`.
"""

from __future__ import annotations

import asyncio
import contextlib
import importlib
import logging
from typing import Any

from fastapi import FastAPI, Request
from fastapi.responses import JSONResponse, Response

from ccsr.jobs import JobEngine, build_embedded_engine

from .intake import RETRY_AFTER_S, UNAVAILABLE, FetchPool
from .settings import Settings

log = logging.getLogger("ccsr.api")

ROUTER_MODULES: list[str] = ["ccsr.api.runware", "ccsr.api.fal", "ccsr.api.playground"]


def register_router_module(name: str) -> None:
    if name not in ROUTER_MODULES:
        ROUTER_MODULES.append(name)


def build_engine(settings: Settings) -> JobEngine:
    if settings.broker_url:
        from ccsr.jobs.distributed import build_distributed_engine

        return build_distributed_engine(
            settings.broker_url, settings.store_url, max_queue=settings.max_queue,
            image_ttl=settings.image_ttl, fetch_allow_hosts=settings.fetch_allow_hosts,
            queue=settings.celery_queue, max_attempts=settings.max_attempts,
        )
    from ccsr.jobs.runner import CCSRRunner

    runner = CCSRRunner(
        models=settings.served_models(),
        config=settings.config,
        device=settings.device,
        dtype=settings.dtype,
        quantize=settings.quantize,
        max_input_bytes=settings.max_input_bytes,
    )
    return build_embedded_engine(
        settings.data_dir,
        runner=runner,
        max_queue=settings.max_queue,
        image_ttl=settings.image_ttl,
        fetch_allow_hosts=settings.fetch_allow_hosts,
    )


def create_app(settings: Settings | None = None, engine: JobEngine | None = None) -> FastAPI:
    settings = settings or Settings.from_env()
    engine = engine or build_engine(settings)

    fetch_pool = FetchPool(settings.fetch_workers)

    @contextlib.asynccontextmanager
    async def lifespan(app: FastAPI):
        engine.start()
        try:
            yield
        finally:
            log.info("shutting down: waiting up to %.0fs for the running job", settings.drain_timeout)
            fetch_pool.close()
            engine.stop(settings.drain_timeout)

    app = FastAPI(
        title="ccsr",
        description="Self-hosted CCSR upscaler: Runware task API (REST, WebSocket) and fal queue API.",
        version="0.1.0",
        lifespan=lifespan,
    )
    app.state.settings = settings
    app.state.engine = engine
    app.state.fetch_pool = fetch_pool
    if hasattr(engine, "shared_secret"):  # replicas must agree on the fal storage upload-token key
        app.state.fal_storage_key = engine.shared_secret("fal_storage")
    settings.keyring()  # hash configured keys now; the plaintext is dropped
    if engine.delivery is not None and hasattr(engine.delivery, "attempts"):
        engine.delivery.timeout = settings.webhook_timeout
        engine.delivery.attempts = max(1, settings.webhook_attempts)

    from .limits import LimitsMiddleware, error_body, error_headers, error_status
    from .metrics import HTTPErrorCounter, Metrics

    metrics = Metrics(engine)
    app.state.metrics = metrics
    app.add_middleware(LimitsMiddleware, settings=settings)
    app.add_middleware(HTTPErrorCounter, metrics=metrics)

    @app.get("/metrics", tags=["ops"], summary="Prometheus metrics (an API key when keys are configured)")
    async def metrics_endpoint(request: Request) -> Response:
        _, _, key = (request.headers.get("authorization") or "").partition(" ")
        if not settings.key_ok(key.strip() or None, client_host(request)):
            return JSONResponse({"detail": "Unauthorized"}, status_code=401)
        body, ctype = metrics.exposition()
        return Response(body, media_type=ctype)

    async def store_outage(request: Request, exc: Exception) -> Response:
        log.warning("%s %s: the job store is unreachable: %s", request.method, request.url.path, exc)
        path = request.url.path
        body = error_body(path, "unavailable", UNAVAILABLE)
        return JSONResponse(body, error_status(path, "unavailable"), headers=error_headers(path, "unavailable"))

    for outage in engine.outages:
        app.add_exception_handler(outage, store_outage)

    from . import images

    app.include_router(images.router)

    @app.get("/healthz", tags=["ops"])
    async def healthz() -> dict:
        return {"status": "ok"}

    @app.get("/readyz", tags=["ops"])
    async def readyz() -> Any:
        """200 once every model this server serves has a ready worker; ``models`` says which have how many."""
        def snapshot() -> tuple[dict, int]:
            return model_readiness(engine, settings), engine.store.active_count()

        try:
            models, queue = await asyncio.to_thread(snapshot)
        except engine.outages:
            body = {"status": "unavailable", "error": UNAVAILABLE, "models": {}}
            return JSONResponse(body, status_code=503, headers={"Retry-After": str(RETRY_AFTER_S)})
        if all(m["status"] == "ready" for m in models.values()):
            return {"status": "ready", "queue": queue, "models": models}
        status = "loading" if engine.load_error is None else "failed"
        body = {"status": status, "error": engine.load_error, "queue": queue, "models": models}
        return JSONResponse(body, status_code=503)

    for name in ROUTER_MODULES:
        try:
            mod = importlib.import_module(name)
        except ModuleNotFoundError as e:
            if e.name == name:
                continue
            raise
        setup = getattr(mod, "setup", None)
        if callable(setup):
            setup(app, engine, settings)
        router = getattr(mod, "router", None)
        if router is not None:
            app.include_router(router)
    return app


# ---------------------------------------------------------------------------------------- helpers


def get_engine(conn: Request | Any) -> JobEngine:
    return conn.app.state.engine


def get_settings(conn: Request | Any) -> Settings:
    return conn.app.state.settings


def model_readiness(engine: JobEngine, settings: Settings) -> dict[str, dict[str, Any]]:
    """Each model this server serves (``--model``) -> ``{"status", "workers"}``: ``workers`` ready to run its jobs
    (this process's loaded runners, or the cluster's live ``ccsr worker``s announcing it); ``status`` ``ready``
    with at least one, else ``failed`` when this process's load failed, else ``loading`` (a replica: no worker
    for it has announced itself ready yet). Blocking; raises one of ``engine.outages`` in a store outage."""
    out: dict[str, dict[str, Any]] = {}
    for name in settings.served_models(loading=False):
        n = engine.ready_workers(name)
        out[name] = {"status": "ready" if n else "loading" if engine.load_error is None else "failed", "workers": n}
    return out


def client_host(conn: Request | Any) -> str | None:
    return conn.client.host if conn.client else None


def public_base(conn: Request | Any) -> str:
    """Base URL for links we hand out: ``--public-url`` if set, else the request's own scheme and Host."""
    settings = get_settings(conn)
    if settings.public_url:
        return settings.public_url.rstrip("/")
    scheme = conn.url.scheme
    scheme = {"ws": "http", "wss": "https"}.get(scheme, scheme)
    host = conn.headers.get("host") or f"{conn.url.hostname}:{conn.url.port}"
    return f"{scheme}://{host}"


def image_url(base: str, image_id: str, extension: str) -> str:
    return f"{base.rstrip('/')}/images/{image_id}.{extension}"
