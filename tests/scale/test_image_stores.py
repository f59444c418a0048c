"""The shared image stores: S3 (moto's server mode on loopback) and a shared directory, each seen from two
processes' worth of store objects (a replica writes, another reads), with exact expiry and sweeping."""

from __future__ import annotations

import time
import uuid

import pytest

from ccsr.jobs.distributed import S3ImageStore, SharedDirImageStore, image_store_from_url

pytestmark = pytest.mark.timeout(60)


@pytest.fixture(params=["s3", "shared"])
def pair(request, tmp_path):
    """Two independent store objects over the same storage."""
    if request.param == "s3":
        endpoint = request.getfixturevalue("s3_endpoint")
        prefix = f"t-{uuid.uuid4().hex[:8]}"
        url = f"s3://ccsr/{prefix}?endpoint_url={endpoint}"
        a, b = image_store_from_url(url, default_ttl=3600), image_store_from_url(url, default_ttl=3600)
        assert isinstance(a, S3ImageStore) and a.prefix == f"{prefix}/"
    else:
        a = image_store_from_url(f"shared:{tmp_path}/img", default_ttl=3600)
        b = image_store_from_url(str(tmp_path / "img"), default_ttl=3600)
        assert isinstance(a, SharedDirImageStore)
    return a, b


def test_put_on_one_read_on_other(pair):
    a, b = pair
    rec = a.put(b"\x89PNG data", content_type="image/png", width=3, height=2, kind="input")
    got = b.get(rec.id)
    assert got is not None and (got.width, got.height, got.size, got.extension) == (3, 2, 9, "png")
    assert got.kind == "input" and got.filename == f"{rec.id}.png"
    assert b.read(rec.id) == b"\x89PNG data"
    fixed = str(uuid.uuid4())
    rec2 = b.put(b"jpeg", content_type="image/jpeg", width=1, height=1, image_id=fixed, ttl=0)
    assert rec2.id == fixed and rec2.extension == "jpg" and rec2.expires_at is None
    assert a.read(fixed) == b"jpeg"
    assert a.get("../../etc/passwd") is None and a.read("not-a-uuid") is None
    a.delete(rec.id)
    assert b.get(rec.id) is None and b.read(rec.id) is None


def test_expiry_is_exact_and_swept(pair):
    a, b = pair
    short = a.put(b"x", content_type="image/png", width=1, height=1, ttl=0.5)
    keep = a.put(b"y", content_type="image/png", width=1, height=1)
    forever = a.put(b"z", content_type="image/png", width=1, height=1, ttl=-1)
    time.sleep(0.6)
    assert b.get(short.id) is None and b.read(short.id) is None  # expired on read, before any sweep
    time.sleep(1.5)  # the expiry index has one-second buckets
    assert b.sweep() == 1
    assert b.sweep() == 0
    assert a.read(keep.id) == b"y" and a.read(forever.id) == b"z"
