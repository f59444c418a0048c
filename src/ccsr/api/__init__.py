"""The HTTP surfaces of ``ccsr serve``: one FastAPI app (:func:`ccsr.api.app.create_app`) over one job engine.

- ``app``: the factory, ``/healthz`` + ``/readyz``, and the hook that mounts protocol routers.
- ``runware``: the Runware task API (REST ``POST /v1`` and WebSocket ``/v1``, both also at ``/``).
- ``fal``: the fal ``fal-ai/ccsr`` sync and queue API.
- ``images``: ``GET /images/{uuid}.{ext}`` for uploads and outputs.
- ``settings`` / ``serve``: configuration (options and ``CCSR_*`` variables) and the uvicorn entry point.

Run it with ``ccsr serve …``, ``python -m ccsr.api.serve …`` or ``uvicorn --factory ccsr.api.app:create_app``
(settings from ``CCSR_*`` variables).
"""
