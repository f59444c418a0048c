"""Helpers shared by the hardening tests (imported as a plain module: tests/ has no packages)."""

from __future__ import annotations

import base64
import io
import uuid
from pathlib import Path

from PIL import Image

from ccsr.api.auth import hash_key


def png_bytes(size=(16, 16), color=(200, 30, 30)) -> bytes:
    buf = io.BytesIO()
    Image.new("RGB", size, color).save(buf, "PNG")
    return buf.getvalue()


def keys_file(path: Path, lines: dict[str, str]) -> Path:
    """Write ``{plaintext key: options}`` as digests, the way an operator would."""
    path.write_text("".join(f"{hash_key(k)} {opts}\n" for k, opts in lines.items()))
    return path


def rw_upscale(image: str, **extra) -> dict:
    return {
        "taskType": "upscale",
        "taskUUID": str(uuid.uuid4()),
        "inputs": {"image": image},
        "upscaleFactor": 2,
        "deliveryMethod": "async",
        **extra,
    }


def data_uri(data: bytes) -> str:
    return "data:image/png;base64," + base64.b64encode(data).decode()
