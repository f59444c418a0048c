"""The protocol-neutral job vocabulary: :class:`Job`, :class:`JobSpec`, :class:`OutputOptions`, results.

Nothing here knows about HTTP, Runware or fal. Protocol adapters translate their wire fields into a
:class:`JobSpec`, hand it to the engine, and translate the resulting :class:`Job` back.
"""

from __future__ import annotations

import dataclasses
import hashlib
import json
import time
from dataclasses import dataclass, field
from typing import Any

from ccsr.params import UpscaleParams

# --------------------------------------------------------------------------------------------- statuses

DEFAULT_MODEL = "ccsr-v1"  # what a job runs when its spec names no model (and jobs stored before models)
QUEUED = "queued"
PROCESSING = "processing"
SUCCESS = "success"
ERROR = "error"
CANCELLED = "cancelled"

STATUSES: tuple[str, ...] = (QUEUED, PROCESSING, SUCCESS, ERROR, CANCELLED)
TERMINAL: frozenset[str] = frozenset({SUCCESS, ERROR, CANCELLED})
ACTIVE: frozenset[str] = frozenset({QUEUED, PROCESSING})


class JobStatus:
    """Namespace of the five job statuses (plain strings, stored as such)."""

    QUEUED = QUEUED
    PROCESSING = PROCESSING
    SUCCESS = SUCCESS
    ERROR = ERROR
    CANCELLED = CANCELLED


class ErrorCode:
    """Protocol-neutral error codes a :class:`JobError` carries; adapters map them to their own vocabulary."""

    INVALID_INPUT = "invalid_input"  # the input image cannot be read / decoded / is too large
    INVALID_PARAMS = "invalid_params"  # a parameter is out of range (found late, by the runner)
    INFERENCE_FAILED = "inference_failed"  # the model raised
    INTERRUPTED = "interrupted"  # the server died twice while running this job
    CANCELLED = "cancelled"
    INPUT_MISSING = "input_missing"  # the referenced input image expired or vanished before the run
    TIMEOUT = "timeout"
    INTERNAL = "internal"


# --------------------------------------------------------------------------------------------- exceptions


class JobsError(Exception):
    """Base class of the engine's exceptions."""


class QueueFull(JobsError):
    """The bounded queue is full: answer 429 / the protocol's rate-limit error."""

    def __init__(self, depth: int, limit: int):
        super().__init__(f"queue is full ({depth} of {limit} jobs waiting or running); retry later")
        self.depth = depth
        self.limit = limit


class QuotaFull(QueueFull):
    """The submitting owner already has its quota of queued+running jobs (counted by the store, atomically,
    so the quota holds across API replicas): answer 429 / the protocol's rate-limit error."""

    def __init__(self, owner: str, depth: int, limit: int):
        JobsError.__init__(self, f"{owner} already has {depth} of {limit} jobs waiting or running; retry later")
        self.owner = owner
        self.depth = depth
        self.limit = limit


class JobConflict(JobsError):
    """The idempotency key is already used by a job with a different payload."""

    def __init__(self, key: str, job_id: str):
        super().__init__(f"idempotency key {key!r} is already used by another request with a different payload")
        self.key = key
        self.job_id = job_id


class JobNotFound(JobsError):
    pass


# --------------------------------------------------------------------------------------------- values


@dataclass(frozen=True)
class OutputOptions:
    """How the output image is encoded and kept.

    ``format``: an output format of :mod:`ccsr.imaging.formats` by name or extension (``png``, ``jpeg``);
    ``quality``: 1-100 for lossy formats (None = encoder default);
    ``ttl``: seconds the stored output lives (None = the store's default).
    """

    format: str = "png"
    quality: int | None = None
    ttl: float | None = None

    def to_dict(self) -> dict:
        return dataclasses.asdict(self)

    @classmethod
    def from_dict(cls, d: dict) -> OutputOptions:
        return cls(**{k: d.get(k) for k in ("format", "quality", "ttl") if k in d})


@dataclass(frozen=True)
class JobSpec:
    """What a protocol adapter submits.

    - ``params``: the core parameters (``scale`` is the requested upscale factor).
    - ``input_image_id``: an image already in the engine's image store (adapters store uploads / data URIs /
      fetched URLs first, so that a job survives a restart without re-fetching anything).
    - ``output``: encoding and TTL of the output.
    - ``max_output``: optional (width, height) cap of the output; the input is shrunk first so that
      ``input x scale`` fits (Runware: 4096x4096).
    - ``model``: the model that runs it (``ccsr-v1``, ``ccsr-v2``: ``ccsr.api.intake.MODELS``).
    - ``protocol``: free string naming the adapter (``"runware"``, ``"fal"``), used by listeners to filter.
    - ``meta``: JSON-serialisable, protocol-private data returned untouched on the :class:`Job`.
    - ``idempotency_key`` / ``payload_hash``: same key + same hash -> the existing job is returned; same key +
      different hash -> :class:`JobConflict`. Keys are global: prefix them with the protocol.
    - ``cost_per_second``: price multiplied by inference seconds into ``JobResult.cost``.
    - ``owner`` / ``owner_quota``: who submits (an API key's name) and how many of its jobs may be queued or
      running at once (0: no limit beyond the engine's queue bound); :class:`QuotaFull` past it.
    """

    params: UpscaleParams
    input_image_id: str
    output: OutputOptions = field(default_factory=OutputOptions)
    max_output: tuple[int, int] | None = None
    protocol: str = ""
    meta: dict = field(default_factory=dict)
    idempotency_key: str | None = None
    payload_hash: str | None = None
    cost_per_second: float = 0.0
    owner: str | None = None
    model: str = DEFAULT_MODEL
    owner_quota: int = 0


@dataclass(frozen=True)
class JobResult:
    """A finished job's output: where the image is, what it is, and what it cost."""

    image_id: str
    width: int
    height: int
    content_type: str
    extension: str
    size: int
    seed: int | None
    inference_seconds: float
    cost: float = 0.0
    input_width: int | None = None
    input_height: int | None = None

    def to_dict(self) -> dict:
        return dataclasses.asdict(self)

    @classmethod
    def from_dict(cls, d: dict | None) -> JobResult | None:
        if not d:
            return None
        names = {f.name for f in dataclasses.fields(cls)}
        return cls(**{k: v for k, v in d.items() if k in names})


@dataclass(frozen=True)
class JobError:
    code: str
    message: str

    def to_dict(self) -> dict:
        return {"code": self.code, "message": self.message}


@dataclass(frozen=True)
class LogLine:
    timestamp: float
    message: str
    level: str = "INFO"

    def to_dict(self) -> dict:
        return {"timestamp": self.timestamp, "message": self.message, "level": self.level}


@dataclass(frozen=True)
class Job:
    """A snapshot of one job as stored. Immutable: ask the engine for a fresh one to see changes."""

    id: str
    status: str
    params: UpscaleParams
    input_image_id: str
    output: OutputOptions
    output_image_id: str  # pre-allocated at submission (Runware shows it in processing items)
    max_output: tuple[int, int] | None = None
    protocol: str = ""
    meta: dict = field(default_factory=dict)
    idempotency_key: str | None = None
    payload_hash: str | None = None
    cost_per_second: float = 0.0
    model: str = DEFAULT_MODEL
    progress: int = 0
    result: JobResult | None = None
    error: JobError | None = None
    attempts: int = 0
    cancel_requested: bool = False
    created_at: float = 0.0
    started_at: float | None = None
    finished_at: float | None = None
    updated_at: float = 0.0
    logs: tuple[LogLine, ...] = ()

    @property
    def done(self) -> bool:
        return self.status in TERMINAL

    @property
    def active(self) -> bool:
        return self.status in ACTIVE


def payload_hash(payload: Any) -> str:
    """A stable hash of a JSON-serialisable payload (keys sorted), for idempotency checks."""
    text = json.dumps(payload, sort_keys=True, separators=(",", ":"), default=str)
    return hashlib.sha256(text.encode()).hexdigest()


def now() -> float:
    return time.time()
