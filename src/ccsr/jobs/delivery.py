"""Outbound deliveries: webhook POSTs and upload PUTs, retried with backoff, through the safe fetcher.

Protocol adapters build the body (Runware ``{"data":[item]}``, fal ``{"request_id",…,"payload"}``) and call
:meth:`Delivery.post_json` / :meth:`Delivery.put_bytes`; both return at once and run on a small thread pool,
so a slow receiver never holds a worker (or the model) up.
"""

from __future__ import annotations

import json
import logging
import threading
import time
from collections.abc import Callable
from concurrent.futures import Future, ThreadPoolExecutor

log = logging.getLogger("ccsr.jobs.delivery")

_PERMANENT = frozenset({"blocked_address", "bad_url", "bad_scheme"})  # retrying cannot help


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
            if self._closed.is_set():
                break
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
            if attempt + 1 < self.attempts:
                time.sleep(min(self.max_delay, self.base_delay * (2**attempt)))
        log.warning("%s %s failed after %d attempt(s): %s", method, url, made, last)
        self._record(method, url, False, last, made)
        if on_done:
            on_done(False, last)
        return False

    def _record(self, method, url, ok, detail, attempts) -> None:
        self.history.append({"method": method, "url": url, "ok": ok, "detail": detail, "attempts": attempts})
        del self.history[:-100]
