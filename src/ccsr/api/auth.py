"""API keys, hashed at rest, plus per-key rate limits and queue quotas (counted by the job store).

Keys are kept only as SHA-256 digests: keys given on the command line are hashed at startup and the
plaintext dropped; ``--api-keys-file`` holds digests, one per line::

    # sha256 hex digest          [name]   [rate=REQ_PER_S] [burst=N] [quota=ACTIVE_JOBS]
    9f86d081884c7d659a2feaa0…     ci       rate=5 quota=4

The file is re-read when its modification time changes (checked at most once a second) or on SIGHUP, so a
removed line revokes its key without a restart. Every digest is compared with ``hmac.compare_digest`` and
the loop never exits early, so timing reveals nothing about which key nearly matched.
"""

from __future__ import annotations

import hashlib
import hmac
import logging
import math
import os
import threading
import time
from dataclasses import dataclass
from pathlib import Path

log = logging.getLogger("ccsr.api.auth")


def hash_key(key: str) -> str:
    return hashlib.sha256(key.encode("utf-8")).hexdigest()


@dataclass(frozen=True)
class KeyEntry:
    digest: str
    name: str
    rate: float | None = None  # requests per second; None: the server default
    burst: int | None = None
    quota: int | None = None  # queued+running jobs; None: the server default


@dataclass(frozen=True)
class Principal:
    """Who is calling: ``id`` keys rate limits and quotas (a key's name, or ``anon:<host>`` on open loopback)."""

    id: str
    rate: float = 0.0
    burst: int = 0
    quota: int = 0


def parse_keys_file(text: str) -> list[KeyEntry]:
    out: list[KeyEntry] = []
    for n, line in enumerate(text.splitlines(), 1):
        line = line.split("#", 1)[0].strip()
        if not line:
            continue
        parts = line.split()
        digest = parts[0].lower().removeprefix("sha256:")
        if len(digest) != 64 or any(c not in "0123456789abcdef" for c in digest):
            log.warning("api keys file line %d: not a sha256 hex digest; ignored", n)
            continue
        opts: dict[str, str] = {}
        name = f"key-{digest[:8]}"
        for p in parts[1:]:
            if "=" in p:
                k, _, v = p.partition("=")
                opts[k.lower()] = v
            else:
                name = p
        try:
            out.append(
                KeyEntry(
                    digest,
                    name,
                    rate=float(opts["rate"]) if "rate" in opts else None,
                    burst=int(opts["burst"]) if "burst" in opts else None,
                    quota=int(opts["quota"]) if "quota" in opts else None,
                )
            )
        except ValueError:
            log.warning("api keys file line %d: bad rate/burst/quota; ignored", n)
    return out


class KeyRing:
    """The accepted keys (digests only), reloaded from a file when it changes."""

    def __init__(self, keys: list[str] | None = None, path: str | Path | None = None):
        self._static = [KeyEntry(hash_key(k), f"key-{hash_key(k)[:8]}") for k in keys or []]
        self.path = Path(path) if path else None
        self._file: list[KeyEntry] = []
        self._mtime: float | None = None
        self._checked = 0.0
        self._lock = threading.Lock()
        if self.path is not None:
            self.reload()

    def add(self, keys: list[str]) -> None:
        """Accept more plaintext keys; only their digests are kept."""
        self._static += [KeyEntry(hash_key(k), f"key-{hash_key(k)[:8]}") for k in keys]

    @property
    def entries(self) -> list[KeyEntry]:
        self._maybe_reload()
        return self._static + self._file

    def configured(self) -> bool:
        return bool(self._static) or self.path is not None

    def reload(self) -> None:
        """Re-read the keys file (SIGHUP, or a changed mtime). A missing file means no file keys."""
        if self.path is None:
            return
        with self._lock:
            try:
                st = self.path.stat()
                entries = parse_keys_file(self.path.read_text(encoding="utf-8"))
                self._mtime = st.st_mtime_ns
            except OSError as e:
                log.warning("api keys file %s unreadable (%s): no file keys accepted", self.path, e)
                entries, self._mtime = [], None
            self._file = entries
            self._checked = time.monotonic()
        log.info("api keys file %s: %d keys", self.path, len(entries))

    def _maybe_reload(self) -> None:
        if self.path is None or time.monotonic() - self._checked < 1.0:
            return
        self._checked = time.monotonic()
        try:
            mtime = os.stat(self.path).st_mtime_ns
        except OSError:
            mtime = None
        if mtime != self._mtime:
            self.reload()

    def lookup(self, key: str | None) -> KeyEntry | None:
        """The entry whose digest matches ``key``; every entry is compared (constant-time, no early exit)."""
        if not key:
            return None
        digest = hash_key(key).encode("ascii")
        found = None
        for e in self.entries:
            if hmac.compare_digest(digest, e.digest.encode("ascii")) and found is None:
                found = e
        return found


class RateLimiter:
    """Token buckets per principal id: ``rate`` tokens per second, at most ``burst`` saved up."""

    def __init__(self):
        self._buckets: dict[str, tuple[float, float]] = {}  # id -> (tokens, last time)
        self._lock = threading.Lock()

    def take(self, who: Principal) -> float:
        """0 if admitted, else the seconds until a token is free (the Retry-After)."""
        if who.rate <= 0:
            return 0.0
        burst = max(1, who.burst or math.ceil(who.rate))
        now = time.monotonic()
        with self._lock:
            tokens, last = self._buckets.get(who.id, (float(burst), now))
            tokens = min(float(burst), tokens + (now - last) * who.rate)
            if tokens >= 1.0:
                self._buckets[who.id] = (tokens - 1.0, now)
                return 0.0
            self._buckets[who.id] = (tokens, now)
            return (1.0 - tokens) / who.rate


class Denied(Exception):
    """Auth refused (401) or rate/quota exceeded (429, ``retry_after`` seconds)."""

    def __init__(self, status: int, message: str, retry_after: float | None = None):
        super().__init__(message)
        self.status = status
        self.message = message
        self.retry_after = retry_after

    def headers(self) -> dict[str, str]:
        return {"Retry-After": str(max(1, math.ceil(self.retry_after)))} if self.retry_after is not None else {}
