"""Outbound deliveries: webhook POSTs and upload PUTs, retried with backoff, through the safe fetcher.

Protocol adapters build the body (Runware ``{"data":[item]}``, fal ``{"request_id",…,"payload"}``) and call
:meth:`Delivery.post_json` / :meth:`Delivery.put_bytes`; both return at once and run on a small thread pool,
so a slow receiver never holds a worker (or the model) up.

:class:`OnceDelivery` adds what makes a finished job's deliveries survive a restart (or a replica dying): the
deliveries started by one job's listeners are collected (``scope``), the engine forgets the job's announcement
only once they have all ended, and every 2xx is remembered in :class:`DeliveryMarkers` (the SQLite store, or
Redis), so running the listeners again re-sends only what was never confirmed. At least once, and once in
practice: a process killed between a receiver's 2xx and the marker sends a second copy, which receivers
deduplicate on the ids every body carries (Runware ``taskUUID``, fal ``request_id``).
"""

from __future__ import annotations

import contextlib
import hashlib
import json
import logging
import threading
from collections.abc import Callable, Iterator
from concurrent.futures import Future, ThreadPoolExecutor
from typing import Protocol

log = logging.getLogger("ccsr.jobs.delivery")

_PERMANENT = frozenset({"blocked_address", "bad_url", "bad_scheme"})  # retrying cannot help


class DeliveryStopped(Exception):
    """The process is shutting down: a delivery cut off here is still owed (it runs again after a restart)."""


def _refused(status: int | None) -> bool:
    """A 4xx other than 408/429: the receiver rejected the delivery itself."""
    return status is not None and 400 <= status < 500 and status not in (408, 429)


class Delivery:
    def __init__(
        self,
        *,
        allow_hosts: list[str] | tuple[str, ...] | None = None,
        attempts: int = 5,
        base_delay: float = 0.5,
        max_delay: float = 30.0,
        timeout: float = 15.0,
        workers: int = 4,
    ):
        self.allow_hosts = list(allow_hosts or [])
        self.attempts = attempts
        self.base_delay = base_delay
        self.max_delay = max_delay
        self.timeout = timeout
        self._pool = ThreadPoolExecutor(max_workers=workers, thread_name_prefix="ccsr-delivery")
        self._closed = threading.Event()
        self.history: list[dict] = []  # last deliveries (for /debug and tests)

    def close(self) -> None:
        self._closed.set()
        self._pool.shutdown(wait=False, cancel_futures=True)

    # ------------------------------------------------------------------ public
    def post_json(self, url: str, body: object, *, on_done: Callable[[bool, str], None] | None = None) -> Future:
        data = json.dumps(body).encode()
        return self._pool.submit(self._send, "POST", url, data, {"Content-Type": "application/json"}, on_done)

    def put_bytes(
        self, url: str, data: bytes, content_type: str, *, on_done: Callable[[bool, str], None] | None = None
    ) -> Future:
        return self._pool.submit(self._send, "PUT", url, data, {"Content-Type": content_type}, on_done)

    # ------------------------------------------------------------------ internals
    def _send(self, method, url, data, headers, on_done) -> bool:
        from ccsr import imaging

        last = ""
        made = 0
        for attempt in range(self.attempts):
            backoff = min(self.max_delay, self.base_delay * 2 ** (attempt - 1)) if attempt else 0.0
            if self._closed.wait(backoff):  # shutting down: leave the delivery owed
                log.info("%s %s stopped after %d attempt(s); it is sent again after a restart", method, url, made)
                raise DeliveryStopped(f"{method} {url}: stopped after {made} attempt(s)")
            made = attempt + 1
            try:
                resp = imaging.fetch(
                    url,
                    max_bytes=1 << 20,
                    timeout=self.timeout,
                    allow_hosts=frozenset(self.allow_hosts),
                    method=method,
                    body=data,
                    headers=headers,
                )
                self._record(method, url, True, f"HTTP {resp.status}", made)
                if on_done:
                    on_done(True, f"HTTP {resp.status}")
                return True
            except imaging.FetchError as e:  # blocked, unreachable, timed out, or a non-2xx answer
                last = str(e)
                if e.code in _PERMANENT or (e.code == "http_error" and _refused(e.status)):
                    break
        log.warning("%s %s failed after %d attempt(s): %s", method, url, made, last)
        self._record(method, url, False, last, made)
        if on_done:
            on_done(False, last)
        return False

    def _record(self, method, url, ok, detail, attempts) -> None:
        self.history.append({"method": method, "url": url, "ok": ok, "detail": detail, "attempts": attempts})
        del self.history[:-100]


class DeliveryMarkers(Protocol):
    """Where confirmed deliveries are remembered, per job and delivery key."""

    def delivered(self, job_id: str, key: str) -> bool: ...

    def mark_delivered(self, job_id: str, key: str, detail: str) -> None: ...


def owed(futures: list[Future]) -> bool:
    """True when a delivery among ``futures`` was cut off by shutdown (or crashed), so the job's announcement
    must stay for a restart; False when every one ended (delivered, or given up after its retries)."""
    return any(f.cancelled() or f.exception() is not None for f in futures)


class OnceDelivery(Delivery):
    """:class:`Delivery` that skips what ``markers`` says was delivered, with futures collected per job."""

    def __init__(self, markers: DeliveryMarkers, **kw):
        super().__init__(**kw)
        self.markers = markers
        self._local = threading.local()

    @contextlib.contextmanager
    def scope(self, job_id: str) -> Iterator[list[Future]]:
        """Deliveries started in this thread inside the block belong to ``job_id``; their futures are kept."""
        self._local.job_id, self._local.futures = job_id, []
        try:
            yield self._local.futures
        finally:
            self._local.job_id = None

    @staticmethod
    def key(method: str, url: str) -> str:
        return hashlib.sha256(f"{method} {url}".encode()).hexdigest()[:24]

    def _once(self, method: str, url: str, on_done, send: Callable[[Callable], Future]) -> Future:
        job_id = getattr(self._local, "job_id", None)
        if job_id is None:
            return send(on_done)
        key = self.key(method, url)
        if self.markers.delivered(job_id, key):
            log.info("%s %s for job %s was already delivered; not sending again", method, url, job_id)
            fut: Future = Future()
            fut.set_result(True)
            return fut

        def done(ok: bool, detail: str) -> None:
            if ok:
                self.markers.mark_delivered(job_id, key, detail)
            if on_done is not None:
                on_done(ok, detail)

        fut = send(done)
        self._local.futures.append(fut)
        return fut

    def post_json(self, url: str, body: object, *, on_done=None) -> Future:
        return self._once("POST", url, on_done, lambda cb: Delivery.post_json(self, url, body, on_done=cb))

    def put_bytes(self, url: str, data: bytes, content_type: str, *, on_done=None) -> Future:
        return self._once("PUT", url, on_done, lambda cb: Delivery.put_bytes(self, url, data, content_type, on_done=cb))
