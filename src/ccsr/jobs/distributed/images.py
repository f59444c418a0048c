"""Image stores every API replica and worker can reach: an S3-compatible bucket, or a shared directory.

Both keep the metadata beside the bytes (S3 object metadata; a JSON sidecar file), so there is no index to
share and no database on a network filesystem. Expiry is exact on read (``expires_at`` is checked) and
``sweep`` deletes what has expired through an expiry index ordered by time (``_expiry/<epoch>/<id>``), so a
sweep only lists what is due.
"""

from __future__ import annotations

import contextlib
import json
import os
import threading
import uuid
from pathlib import Path
from urllib.parse import parse_qs, urlsplit

from ..images import EXT_FOR_TYPE, ImageStore, LocalImageStore, StoredImage
from ..types import now


def _prepare(
    image_id: str | None, content_type: str, extension: str | None, ttl: float | None, default: float | None
) -> tuple[str, str, float, float | None]:
    """Validated id, extension, creation time and expiry, with the same rules as the local store."""
    image_id = str(uuid.UUID(image_id)) if image_id else str(uuid.uuid4())
    ext = (extension or EXT_FOR_TYPE.get(content_type, "bin")).lstrip(".")
    ext = "jpg" if ext == "jpeg" else ext
    t = now()
    ttl = default if ttl is None else ttl
    return image_id, ext, t, (t + ttl if ttl is not None and ttl > 0 else None)


def _valid_id(image_id: str) -> str | None:
    try:
        return str(uuid.UUID(image_id))
    except (ValueError, AttributeError, TypeError):
        return None


def _expiry_name(expires_at: float, image_id: str) -> str:
    return f"{int(expires_at) + 1:012d}/{image_id}"  # zero-padded: lexical order is time order


def _metadata(rec: StoredImage) -> dict[str, str]:
    """String-only metadata (what S3 object metadata can hold); :func:`_record` reads it back."""
    return {
        "id": rec.id,
        "content_type": rec.content_type,
        "extension": rec.extension,
        "width": str(rec.width),
        "height": str(rec.height),
        "size": str(rec.size),
        "created_at": repr(rec.created_at),
        "expires_at": repr(rec.expires_at) if rec.expires_at is not None else "none",
        "kind": rec.kind,
    }


def _record(meta: dict) -> StoredImage:
    return StoredImage(
        meta["id"],
        meta["content_type"],
        meta["extension"],
        int(meta["width"]),
        int(meta["height"]),
        int(meta["size"]),
        float(meta["created_at"]),
        float(meta["expires_at"]) if meta.get("expires_at") not in (None, "", "none") else None,
        meta.get("kind", "output"),
    )


class S3ImageStore(ImageStore):
    """Objects ``<prefix><id>`` with the record in their metadata, in any S3-compatible bucket (boto3).

    Credentials and region come from boto3's usual sources (``AWS_*`` variables, profiles, instance roles);
    ``endpoint_url`` points at MinIO, Ceph, R2, a local test server... A bucket lifecycle rule expiring
    objects after the TTL is a good second line; ``sweep`` works without one.
    """

    def __init__(
        self,
        bucket: str,
        prefix: str = "",
        *,
        default_ttl: float | None = 24 * 3600,
        endpoint_url: str | None = None,
        client=None,
    ):
        import boto3
        from botocore.exceptions import ClientError

        self._missing = ClientError  # boto3 is an optional dependency: imported only when S3 is used
        self.bucket = bucket
        self.prefix = prefix.strip("/") + "/" if prefix.strip("/") else ""
        self.default_ttl = default_ttl
        self.s3 = client or boto3.client("s3", endpoint_url=endpoint_url)

    def _key(self, image_id: str) -> str:
        return f"{self.prefix}{image_id}"

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
        image_id, ext, t, expires = _prepare(image_id, content_type, extension, ttl, self.default_ttl)
        rec = StoredImage(image_id, content_type, ext, int(width), int(height), len(data), t, expires, kind)
        self.s3.put_object(
            Bucket=self.bucket, Key=self._key(image_id), Body=data, ContentType=content_type, Metadata=_metadata(rec)
        )
        if expires is not None:
            self.s3.put_object(
                Bucket=self.bucket, Key=f"{self.prefix}_expiry/{_expiry_name(expires, image_id)}", Body=b""
            )
        return rec

    def get(self, image_id: str) -> StoredImage | None:
        image_id = _valid_id(image_id)
        if image_id is None:
            return None
        try:
            head = self.s3.head_object(Bucket=self.bucket, Key=self._key(image_id))
        except self._missing:
            return None
        rec = _record(head.get("Metadata") or {})
        return None if rec.expired() else rec

    def read(self, image_id: str) -> bytes | None:
        image_id = _valid_id(image_id)
        if image_id is None:
            return None
        try:
            obj = self.s3.get_object(Bucket=self.bucket, Key=self._key(image_id))
        except self._missing:
            return None
        if _record(obj.get("Metadata") or {}).expired():
            return None
        return obj["Body"].read()

    def delete(self, image_id: str) -> None:
        image_id = _valid_id(image_id)
        if image_id is not None:
            self.s3.delete_object(Bucket=self.bucket, Key=self._key(image_id))

    def sweep(self) -> int:
        cutoff = int(now())
        done = 0
        pages = self.s3.get_paginator("list_objects_v2").paginate(Bucket=self.bucket, Prefix=f"{self.prefix}_expiry/")
        for page in pages:
            for obj in page.get("Contents", []):
                bucket, image_id = obj["Key"].rsplit("/", 2)[-2:]
                if int(bucket) > cutoff:  # sorted by expiry: nothing later is due yet
                    return done
                rec = self.get(image_id)
                if rec is None or rec.expired(now() + 1):  # a later put may have extended its life
                    self.delete(image_id)
                    done += 1
                self.s3.delete_object(Bucket=self.bucket, Key=obj["Key"])
        return done


class SharedDirImageStore(ImageStore):
    """``root/<ab>/<id>`` plus a ``<id>.json`` sidecar: safe on NFS and shared volumes (atomic renames, no
    database), so any number of replicas and workers on any hosts can share it."""

    def __init__(self, root: str | Path, default_ttl: float | None = 24 * 3600):
        self.root = Path(root)
        self.root.mkdir(parents=True, exist_ok=True)
        self.default_ttl = default_ttl

    def _data(self, image_id: str) -> Path:
        return self.root / image_id[:2] / image_id

    def _meta(self, image_id: str) -> Path:
        return self.root / image_id[:2] / f"{image_id}.json"

    @staticmethod
    def _write(path: Path, data: bytes) -> None:
        path.parent.mkdir(parents=True, exist_ok=True)
        tmp = path.with_name(f".{path.name}.{os.getpid()}.{threading.get_ident()}.tmp")
        try:
            tmp.write_bytes(data)
            os.replace(tmp, path)
        except OSError:
            tmp.unlink(missing_ok=True)  # a full disk must not fill up further with half-written files
            raise

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
        image_id, ext, t, expires = _prepare(image_id, content_type, extension, ttl, self.default_ttl)
        rec = StoredImage(image_id, content_type, ext, int(width), int(height), len(data), t, expires, kind)
        self._write(self._data(image_id), data)
        self._write(self._meta(image_id), json.dumps(_metadata(rec)).encode())  # the sidecar is the commit point
        if expires is not None:
            self._write(self.root / "_expiry" / _expiry_name(expires, image_id), b"")
        return rec

    def get(self, image_id: str) -> StoredImage | None:
        image_id = _valid_id(image_id)
        if image_id is None:
            return None
        try:
            rec = _record(json.loads(self._meta(image_id).read_bytes()))
        except (OSError, ValueError, KeyError):
            return None
        return None if rec.expired() else rec

    def path_of(self, image_id: str) -> Path | None:
        rec = self.get(image_id)
        if rec is None:
            return None
        p = self._data(rec.id)
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
        image_id = _valid_id(image_id)
        if image_id is None:
            return
        for p in (self._meta(image_id), self._data(image_id)):
            with contextlib.suppress(OSError):
                p.unlink()

    def sweep(self) -> int:
        base = self.root / "_expiry"
        if not base.is_dir():
            return 0
        cutoff = f"{int(now()):012d}"
        done = 0
        for bucket in sorted(os.listdir(base)):
            if bucket > cutoff:
                break
            for image_id in os.listdir(base / bucket):
                rec = self.get(image_id)
                if rec is None or rec.expired(now() + 1):
                    self.delete(image_id)
                    done += 1
                with contextlib.suppress(OSError):
                    (base / bucket / image_id).unlink()
            with contextlib.suppress(OSError):
                (base / bucket).rmdir()
        return done


def image_store_from_url(url: str | Path, *, default_ttl: float | None = 24 * 3600) -> ImageStore:
    """``s3://bucket/prefix[?endpoint_url=http://minio:9000]`` -> :class:`S3ImageStore`;
    ``shared:/path`` or a plain path -> :class:`SharedDirImageStore`; ``local:/path`` -> the embedded
    :class:`~ccsr.jobs.images.LocalImageStore` (one host only: its index is SQLite)."""
    text = str(url)
    parts = urlsplit(text)
    if parts.scheme == "s3":
        query = parse_qs(parts.query)
        endpoint = (query.get("endpoint_url") or query.get("endpoint") or [None])[0]
        endpoint = endpoint or os.environ.get("CCSR_S3_ENDPOINT_URL") or None
        return S3ImageStore(parts.netloc, parts.path, default_ttl=default_ttl, endpoint_url=endpoint)
    if parts.scheme == "local":
        return LocalImageStore(text[len("local:") :], default_ttl=default_ttl)
    if parts.scheme in ("shared", "file"):
        text = parts.path
    return SharedDirImageStore(text, default_ttl=default_ttl)
