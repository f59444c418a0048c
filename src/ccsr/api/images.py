"""``GET /images/{uuid}.{ext}``: uploads and outputs at stable URLs, until their TTL runs out."""

from __future__ import annotations

import re
import uuid as _uuid

from fastapi import APIRouter, Request
from fastapi.responses import FileResponse, JSONResponse, Response

router = APIRouter(tags=["images"])

_NAME = re.compile(r"^([0-9a-fA-F-]{36})(?:\.([A-Za-z0-9]{1,5}))?$")


def parse_image_ref(ref: str) -> str | None:
    """The image id in ``<uuid>``, ``<uuid>.<ext>`` or a URL ending in ``/images/<uuid>.<ext>``; else None."""
    tail = ref.rsplit("/", 1)[-1].split("?", 1)[0]
    m = _NAME.match(tail)
    if not m:
        return None
    try:
        return str(_uuid.UUID(m.group(1)))
    except ValueError:
        return None


@router.get("/images/{name}", response_model=None, summary="An uploaded or produced image, until its TTL")
@router.head("/images/{name}", response_model=None, include_in_schema=False)
async def get_image(name: str, request: Request) -> Response:
    engine = request.app.state.engine
    image_id = parse_image_ref(name)
    rec = engine.images.get(image_id) if image_id else None
    if rec is None:
        return JSONResponse({"error": "image not found or expired"}, status_code=404)
    headers = {
        "Cache-Control": "public, max-age=3600",
        "X-Image-Width": str(rec.width),
        "X-Image-Height": str(rec.height),
    }
    path = engine.images.path_of(rec.id)
    if path is not None:
        return FileResponse(path, media_type=rec.content_type, headers=headers)
    data = engine.images.read(rec.id)
    if data is None:
        return JSONResponse({"error": "image not found or expired"}, status_code=404)
    return Response(data, media_type=rec.content_type, headers=headers)
