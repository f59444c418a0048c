"""Image stores: the :class:`ImageStore` interface and the local-disk implementation.

Uploaded inputs and produced outputs live here under a UUID, with a content type, dimensions and an
expiry. Protocols serve them at stable URLs (Runware ``/images/{id}.{ext}``, fal ``/files/{name}``) and read
their own URLs back from here instead of fetching themselves. An S3 store implements the same interface.
"""

from __future__ import annotations

import abc
import contextlib
import os
import sqlite3
import threading
import uuid
from dataclasses import dataclass
from pathlib import Path

from .types import now

EXT_FOR_TYPE = {"image/png": "png", "image/jpeg": "jpg", "image/webp": "webp"}


@dataclass(frozen=True)
class StoredImage:
    id: str
    content_type: str
    extension: str  # without dot: png, jpg, webp
    width: int
    height: int
    size: int
    created_at: float
    expires_at: float | None  # None: never
    kind: str = "output"  # "input" | "output"

    @property
    def filename(self) -> str:
        return f"{self.id}.{self.extension}"

    def expired(self, at: float | None = None) -> bool:
        return self.expires_at is not None and (at if at is not None else now()) >= self.expires_at


class ImageStore(abc.ABC):
    """Bytes plus metadata keyed by a UUID, each with an optional expiry."""

    default_ttl: float | None

    @abc.abstractmethod
    def put(
        self,
        data: bytes,
        *,
        content_type: str,
        width: int,
        height: int,
        extension: str | None = None,
        ttl: float | None = None,
        image_id: str | None = None,
        kind: str = "output",
    ) -> StoredImage:
        """Store bytes (``ttl`` None = ``default_ttl``; <= 0 = never expires) and return the record."""

    @abc.abstractmethod
    def get(self, image_id: str) -> StoredImage | None:
        """The record, or None when unknown or expired."""

    @abc.abstractmethod
    def read(self, image_id: str) -> bytes | None:
        """The bytes, or None when unknown or expired."""

    @abc.abstractmethod
    def delete(self, image_id: str) -> None: ...

    @abc.abstractmethod
    def sweep(self) -> int:
        """Delete expired images; returns how many."""

    def path_of(self, image_id: str) -> Path | None:
        """A local file path for zero-copy serving, when the store has one."""
        return None

    def close(self) -> None:  # noqa: B027 - optional hook
        """Release resources (nothing by default)."""


class LocalImageStore(ImageStore):
    """Files under ``root/ab/<id>.<ext>`` plus an SQLite index (``root/index.db``)."""

    def __init__(self, root: str | Path, default_ttl: float | None = 24 * 3600):
        self.root = Path(root)
        self.root.mkdir(parents=True, exist_ok=True)
        self.default_ttl = default_ttl
        self._lock = threading.RLock()
        self._db = sqlite3.connect(str(self.root / "index.db"), check_same_thread=False, isolation_level=None)
        self._db.row_factory = sqlite3.Row
        with self._lock:
            self._db.execute("PRAGMA journal_mode=WAL")
            self._db.execute(
                "CREATE TABLE IF NOT EXISTS images (id TEXT PRIMARY KEY, content_type TEXT, ext TEXT,"
                " width INT, height INT, size INT, created_at REAL, expires_at REAL, kind TEXT)"
            )
            self._db.execute("CREATE INDEX IF NOT EXISTS images_exp ON images(expires_at)")

    def _file(self, image_id: str, ext: str) -> Path:
        return self.root / image_id[:2] / f"{image_id}.{ext}"

    def put(
        self,
        data: bytes,
        *,
        content_type: str,
        width: int,
        height: int,
        extension: str | None = None,
        ttl: float | None = None,
        image_id: str | None = None,
        kind: str = "output",
    ) -> StoredImage:
        image_id = image_id or str(uuid.uuid4())
        uuid.UUID(image_id)  # ids are UUIDs: never a path component an attacker controls
        ext = (extension or EXT_FOR_TYPE.get(content_type, "bin")).lstrip(".")
        if ext == "jpeg":
            ext = "jpg"
        t = now()
        ttl = self.default_ttl if ttl is None else ttl
        expires = t + ttl if ttl is not None and ttl > 0 else None
        path = self._file(image_id, ext)
        path.parent.mkdir(parents=True, exist_ok=True)
        tmp = path.with_suffix(path.suffix + f".{os.getpid()}.{threading.get_ident()}.tmp")
        try:
            tmp.write_bytes(data)
            os.replace(tmp, path)
        except OSError:  # a full disk must not keep the partial file, nor grow fuller with each try
            with contextlib.suppress(OSError):
                tmp.unlink()
            raise
        rec = StoredImage(image_id, content_type, ext, int(width), int(height), len(data), t, expires, kind)
        with self._lock:
            old = self._db.execute("SELECT ext FROM images WHERE id=?", (image_id,)).fetchone()
            if old is not None and old["ext"] != ext:
                with contextlib.suppress(OSError):
                    self._file(image_id, old["ext"]).unlink()
            self._db.execute(
                "INSERT OR REPLACE INTO images VALUES (?,?,?,?,?,?,?,?,?)",
                (image_id, content_type, ext, rec.width, rec.height, rec.size, t, expires, kind),
            )
        return rec

    def _record(self, image_id: str) -> StoredImage | None:
        try:
            uuid.UUID(image_id)
        except (ValueError, AttributeError, TypeError):
            return None
        with self._lock:
            row = self._db.execute("SELECT * FROM images WHERE id=?", (image_id,)).fetchone()
        if row is None:
            return None
        return StoredImage(
            row["id"],
            row["content_type"],
            row["ext"],
            row["width"],
            row["height"],
            row["size"],
            row["created_at"],
            row["expires_at"],
            row["kind"],
        )

    def get(self, image_id: str) -> StoredImage | None:
        rec = self._record(image_id)
        if rec is None or rec.expired():
            return None
        return rec

    def path_of(self, image_id: str) -> Path | None:
        rec = self.get(image_id)
        if rec is None:
            return None
        p = self._file(rec.id, rec.extension)
        return p if p.exists() else None

    def read(self, image_id: str) -> bytes | None:
        p = self.path_of(image_id)
        if p is None:
            return None
        try:
            return p.read_bytes()
        except OSError:
            return None

    def delete(self, image_id: str) -> None:
        rec = self._record(image_id)
        if rec is None:
            return
        with contextlib.suppress(OSError):
            self._file(rec.id, rec.extension).unlink()
        with self._lock:
            self._db.execute("DELETE FROM images WHERE id=?", (image_id,))

    def sweep(self) -> int:
        with self._lock:
            rows = self._db.execute(
                "SELECT id, ext FROM images WHERE expires_at IS NOT NULL AND expires_at<=?", (now(),)
            ).fetchall()
        for r in rows:
            with contextlib.suppress(OSError):
                self._file(r["id"], r["ext"]).unlink()
            with self._lock:
                self._db.execute("DELETE FROM images WHERE id=?", (r["id"],))
        return len(rows)

    def close(self) -> None:
        with self._lock:
            self._db.close()
