"""Structured logs: one JSON object per line, carrying the task id of the job being worked on.

The job engine sets :data:`task_id` around each job (a context variable, so threads and asyncio tasks each
see their own); :class:`JsonFormatter` adds it, and any ``task_id`` passed in ``extra=``, to every record.
"""

from __future__ import annotations

import contextvars
import json
import logging
import time

task_id: contextvars.ContextVar[str | None] = contextvars.ContextVar("ccsr_task_id", default=None)


class JsonFormatter(logging.Formatter):
    def format(self, record: logging.LogRecord) -> str:
        out = {
            "ts": time.strftime("%Y-%m-%dT%H:%M:%S", time.gmtime(record.created)) + f".{int(record.msecs):03d}Z",
            "level": record.levelname,
            "logger": record.name,
            "msg": record.getMessage(),
        }
        tid = getattr(record, "task_id", None) or task_id.get()
        if tid:
            out["task_id"] = tid
        if record.exc_info:
            out["exc"] = self.formatException(record.exc_info)
        return json.dumps(out, ensure_ascii=False)


def configure(level: str = "info", fmt: str = "text") -> None:
    """Root logging for ``ccsr serve``: ``fmt`` is ``text`` (human) or ``json`` (one object per line)."""
    handler = logging.StreamHandler()
    if fmt == "json":
        handler.setFormatter(JsonFormatter())
    else:
        handler.setFormatter(logging.Formatter("%(asctime)s %(levelname)s %(name)s: %(message)s"))
    root = logging.getLogger()
    root.handlers[:] = [handler]
    root.setLevel(level.upper())
