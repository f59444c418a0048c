"""Webhook / upload delivery that survives replicas dying: at least once, and once in practice.

A terminal job is announced on a Redis stream read by a consumer group: exactly one API replica handles
each announcement and acknowledges it only after its deliveries ended; a replica that dies leaves the
entry pending and another one claims it. Before sending, a per-(job, method, URL) marker is checked and it
is set right after a 2xx: so a reclaimed announcement re-sends only what had not been confirmed. The one
gap (a replica killed between the receiver's 2xx and setting the marker) sends a second copy; receivers
deduplicate on the ids every body carries (Runware ``taskUUID``, fal ``request_id``).
"""

from __future__ import annotations

import contextlib
import hashlib
import logging
import threading
from collections.abc import Callable, Iterator
from concurrent.futures import Future

import redis

from ..delivery import Delivery

log = logging.getLogger("ccsr.jobs.distributed")


class OnceDelivery(Delivery):
    """:class:`~ccsr.jobs.delivery.Delivery` with Redis markers, and futures collected per job (``scope``)."""

    def __init__(self, client: redis.Redis, *, prefix: str = "ccsr:", marker_ttl: float = 7 * 86400, **kw):
        super().__init__(**kw)
        self.redis = client
        self.prefix = prefix
        self.marker_ttl = int(marker_ttl)
        self._local = threading.local()

    @contextlib.contextmanager
    def scope(self, job_id: str) -> Iterator[list[Future]]:
        """Deliveries started in this thread inside the block belong to ``job_id``; their futures are kept."""
        self._local.job_id, self._local.futures = job_id, []
        try:
            yield self._local.futures
        finally:
            self._local.job_id = None

    def _marker(self, job_id: str, method: str, url: str) -> str:
        digest = hashlib.sha256(f"{method} {url}".encode()).hexdigest()[:24]
        return f"{self.prefix}delivered:{job_id}:{digest}"

    def _once(self, method: str, url: str, on_done, send: Callable[[Callable], Future]) -> Future:
        job_id = getattr(self._local, "job_id", None)
        if job_id is None:
            return send(on_done)
        marker = self._marker(job_id, method, url)
        if self.redis.exists(marker):
            log.info("%s %s for job %s was already delivered; not sending again", method, url, job_id)
            fut: Future = Future()
            fut.set_result(True)
            return fut

        def done(ok: bool, detail: str) -> None:
            if ok:
                self.redis.set(marker, detail, ex=self.marker_ttl)
            if on_done is not None:
                on_done(ok, detail)

        fut = send(done)
        self._local.futures.append(fut)
        return fut

    def post_json(self, url: str, body: object, *, on_done=None) -> Future:
        return self._once("POST", url, on_done, lambda cb: Delivery.post_json(self, url, body, on_done=cb))

    def put_bytes(self, url: str, data: bytes, content_type: str, *, on_done=None) -> Future:
        return self._once("PUT", url, on_done, lambda cb: Delivery.put_bytes(self, url, data, content_type, on_done=cb))
