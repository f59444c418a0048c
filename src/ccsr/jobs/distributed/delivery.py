"""Delivery markers in Redis, so webhook / upload delivery survives API replicas dying.

A terminal job is announced on a Redis stream read by a consumer group: exactly one API replica handles
each announcement and acknowledges it only after its deliveries ended; a replica that dies leaves the
entry pending and another one claims it. :class:`~ccsr.jobs.delivery.OnceDelivery` checks these markers
before sending and sets one right after a 2xx, so a reclaimed announcement re-sends only what had not been
confirmed.
"""

from __future__ import annotations

import redis


class RedisMarkers:
    """:class:`~ccsr.jobs.delivery.DeliveryMarkers` as keys ``<prefix>delivered:<job>:<key>`` with a TTL."""

    def __init__(self, client: redis.Redis, *, prefix: str = "ccsr:", ttl: float = 7 * 86400):
        self.redis, self.prefix, self.ttl = client, prefix, int(ttl)

    def _name(self, job_id: str, key: str) -> str:
        return f"{self.prefix}delivered:{job_id}:{key}"

    def delivered(self, job_id: str, key: str) -> bool:
        return bool(self.redis.exists(self._name(job_id, key)))

    def mark_delivered(self, job_id: str, key: str, detail: str) -> None:
        self.redis.set(self._name(job_id, key), detail, ex=self.ttl)
