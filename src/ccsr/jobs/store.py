"""Job stores: the :class:`JobStore` interface and its durable SQLite implementation.

A store is the single source of truth for job state; it also *is* the queue (queued jobs in FIFO order),
which is what makes jobs survive a restart in the embedded backend. A Redis store for the Celery backend
implements the same interface.
"""

from __future__ import annotations

import abc
import contextlib
import json
import sqlite3
import threading
import uuid
from collections.abc import Iterator
from pathlib import Path

from ccsr.params import UpscaleParams

from .types import (
    ACTIVE,
    CANCELLED,
    ERROR,
    PROCESSING,
    QUEUED,
    SUCCESS,
    TERMINAL,
    Job,
    JobConflict,
    JobError,
    JobResult,
    JobSpec,
    LogLine,
    OutputOptions,
    QueueFull,
    QuotaFull,
    now,
)

MAX_LOG_LINES = 200


class JobStore(abc.ABC):
    """Durable job state. All methods are thread-safe and return fresh :class:`Job` snapshots."""

    @abc.abstractmethod
    def create(self, spec: JobSpec, *, max_active: int | None = None) -> tuple[Job, bool]:
        """Insert a queued job; returns ``(job, created)``.

        With ``spec.idempotency_key`` already present: same ``payload_hash`` -> ``(existing, False)``,
        else :class:`JobConflict`. ``max_active`` bounds queued+processing jobs (:class:`QueueFull`), and
        ``spec.owner_quota`` those of ``spec.owner`` (:class:`QuotaFull`), checked in the same transaction.
        """

    @abc.abstractmethod
    def get(self, job_id: str) -> Job | None: ...

    @abc.abstractmethod
    def get_by_key(self, key: str) -> Job | None: ...

    @abc.abstractmethod
    def claim_next(self) -> Job | None:
        """Atomically move the oldest queued job to processing (attempts += 1) and return it."""

    @abc.abstractmethod
    def set_progress(self, job_id: str, progress: int) -> None: ...

    @abc.abstractmethod
    def append_log(self, job_id: str, message: str, level: str = "INFO") -> None: ...

    @abc.abstractmethod
    def finish(
        self, job_id: str, status: str, *, result: JobResult | None = None, error: JobError | None = None
    ) -> Job | None:
        """Move an active job to a terminal status; a job already terminal is left alone (returns None)."""

    @abc.abstractmethod
    def request_cancel(self, job_id: str) -> Job | None:
        """Queued -> cancelled at once; processing -> flag ``cancel_requested``; terminal -> unchanged."""

    @abc.abstractmethod
    def requeue(self, job_id: str) -> None:
        """Processing -> queued (used by recovery)."""

    @abc.abstractmethod
    def list_status(self, *statuses: str) -> list[Job]: ...

    @abc.abstractmethod
    def active_count(self) -> int: ...

    @abc.abstractmethod
    def queue_position(self, job_id: str) -> int | None:
        """0 for the next queued job, None when the job is not queued."""

    def announcements(self) -> list[str]:
        """Ids of finished jobs whose listeners' deliveries have not all ended: run them again on start. A store
        that announces terminal jobs another way (the Redis stream) keeps none here."""
        return []

    def acknowledge(self, job_id: str) -> None:  # noqa: B027 - optional hook
        """Every delivery of the finished job ``job_id`` has ended: forget its announcement."""

    def close(self) -> None:  # noqa: B027 - optional hook
        """Release resources (nothing by default)."""


_SCHEMA = """
CREATE TABLE IF NOT EXISTS jobs (
    seq INTEGER PRIMARY KEY AUTOINCREMENT,
    id TEXT NOT NULL UNIQUE,
    idem_key TEXT UNIQUE,
    payload_hash TEXT,
    protocol TEXT NOT NULL DEFAULT '',
    status TEXT NOT NULL,
    params TEXT NOT NULL,
    input_image_id TEXT NOT NULL,
    output TEXT NOT NULL,
    output_image_id TEXT NOT NULL,
    max_output TEXT,
    meta TEXT NOT NULL DEFAULT '{}',
    cost_per_second REAL NOT NULL DEFAULT 0,
    progress INTEGER NOT NULL DEFAULT 0,
    result TEXT,
    error_code TEXT,
    error_message TEXT,
    attempts INTEGER NOT NULL DEFAULT 0,
    cancel_requested INTEGER NOT NULL DEFAULT 0,
    created_at REAL NOT NULL,
    started_at REAL,
    finished_at REAL,
    updated_at REAL NOT NULL,
    logs TEXT NOT NULL DEFAULT '[]',
    owner TEXT,
    model TEXT NOT NULL DEFAULT 'ccsr-v1'
);
CREATE INDEX IF NOT EXISTS jobs_status ON jobs(status, seq);
-- written with every terminal status, deleted once the job's webhooks / uploads have ended
CREATE TABLE IF NOT EXISTS announcements (job_id TEXT PRIMARY KEY, created_at REAL NOT NULL);
-- confirmed deliveries of announced jobs (OnceDelivery markers), deleted with the announcement
CREATE TABLE IF NOT EXISTS deliveries (
    job_id TEXT NOT NULL,
    key TEXT NOT NULL,
    detail TEXT NOT NULL,
    created_at REAL NOT NULL,
    PRIMARY KEY (job_id, key)
);
"""


class SQLiteJobStore(JobStore):
    """One SQLite file (WAL), one connection guarded by a lock: simple and safe across threads. It also keeps
    the announcements of finished jobs and their confirmed deliveries (:class:`~ccsr.jobs.delivery.DeliveryMarkers`)."""

    def __init__(self, path: str | Path):
        self.path = Path(path)
        self.path.parent.mkdir(parents=True, exist_ok=True)
        self._lock = threading.RLock()
        self._db = sqlite3.connect(str(self.path), check_same_thread=False, isolation_level=None)
        self._db.row_factory = sqlite3.Row
        with self._lock:
            self._db.execute("PRAGMA journal_mode=WAL")
            self._db.execute("PRAGMA synchronous=NORMAL")
            self._db.executescript(_SCHEMA)
            columns = {r["name"] for r in self._db.execute("PRAGMA table_info(jobs)")}
            if "owner" not in columns:  # a database from before per-owner quotas
                self._db.execute("ALTER TABLE jobs ADD COLUMN owner TEXT")
            if "model" not in columns:  # a database from before CCSR-v2: every job ran CCSR-v1
                self._db.execute("ALTER TABLE jobs ADD COLUMN model TEXT NOT NULL DEFAULT 'ccsr-v1'")
            self._db.execute("CREATE INDEX IF NOT EXISTS jobs_owner ON jobs(owner, status)")

    # ------------------------------------------------------------------ helpers
    @staticmethod
    def _row_to_job(row: sqlite3.Row) -> Job:
        params_d = json.loads(row["params"])
        mo = json.loads(row["max_output"]) if row["max_output"] else None
        err = JobError(row["error_code"], row["error_message"] or "") if row["error_code"] else None
        return Job(
            id=row["id"],
            status=row["status"],
            params=UpscaleParams(**params_d),
            input_image_id=row["input_image_id"],
            output=OutputOptions.from_dict(json.loads(row["output"])),
            output_image_id=row["output_image_id"],
            max_output=tuple(mo) if mo else None,
            protocol=row["protocol"],
            meta=json.loads(row["meta"]),
            idempotency_key=row["idem_key"],
            payload_hash=row["payload_hash"],
            cost_per_second=row["cost_per_second"],
            model=row["model"],
            progress=row["progress"],
            result=JobResult.from_dict(json.loads(row["result"]) if row["result"] else None),
            error=err,
            attempts=row["attempts"],
            cancel_requested=bool(row["cancel_requested"]),
            created_at=row["created_at"],
            started_at=row["started_at"],
            finished_at=row["finished_at"],
            updated_at=row["updated_at"],
            logs=tuple(LogLine(**d) for d in json.loads(row["logs"])),
        )

    @contextlib.contextmanager
    def _transaction(self) -> Iterator[None]:
        """One write transaction (the connection autocommits otherwise); call with the lock held."""
        self._db.execute("BEGIN IMMEDIATE")
        try:
            yield
        except BaseException:
            self._db.execute("ROLLBACK")
            raise
        self._db.execute("COMMIT")

    def _announce(self, job_id: str, t: float) -> None:
        self._db.execute("INSERT OR REPLACE INTO announcements (job_id, created_at) VALUES (?, ?)", (job_id, t))

    def _one(self, sql: str, args: tuple = ()) -> Job | None:
        row = self._db.execute(sql, args).fetchone()
        return self._row_to_job(row) if row else None

    # ------------------------------------------------------------------ API
    def create(self, spec: JobSpec, *, max_active: int | None = None) -> tuple[Job, bool]:
        t = now()
        with self._lock:
            self._db.execute("BEGIN IMMEDIATE")
            try:
                if spec.idempotency_key:
                    existing = self._one("SELECT * FROM jobs WHERE idem_key=?", (spec.idempotency_key,))
                    if existing is not None:
                        self._db.execute("COMMIT")
                        if existing.payload_hash != spec.payload_hash:
                            raise JobConflict(spec.idempotency_key, existing.id)
                        return existing, False
                if max_active is not None:
                    depth = self._db.execute(
                        "SELECT COUNT(*) FROM jobs WHERE status IN (?, ?)", (QUEUED, PROCESSING)
                    ).fetchone()[0]
                    if depth >= max_active:
                        self._db.execute("COMMIT")
                        raise QueueFull(depth, max_active)
                if spec.owner and spec.owner_quota > 0:
                    mine = self._db.execute(
                        "SELECT COUNT(*) FROM jobs WHERE owner=? AND status IN (?, ?)", (spec.owner, QUEUED, PROCESSING)
                    ).fetchone()[0]
                    if mine >= spec.owner_quota:
                        self._db.execute("COMMIT")
                        raise QuotaFull(spec.owner, mine, spec.owner_quota)
                job_id = str(uuid.uuid4())
                self._db.execute(
                    "INSERT INTO jobs (id, idem_key, payload_hash, protocol, status, params, input_image_id,"
                    " output, output_image_id, max_output, meta, cost_per_second, created_at, updated_at, owner,"
                    " model) VALUES (?,?,?,?,?,?,?,?,?,?,?,?,?,?,?,?)",
                    (
                        job_id,
                        spec.idempotency_key,
                        spec.payload_hash,
                        spec.protocol,
                        QUEUED,
                        json.dumps(spec.params.to_dict()),
                        spec.input_image_id,
                        json.dumps(spec.output.to_dict()),
                        str(uuid.uuid4()),
                        json.dumps(list(spec.max_output)) if spec.max_output else None,
                        json.dumps(spec.meta),
                        float(spec.cost_per_second),
                        t,
                        t,
                        spec.owner,
                        spec.model,
                    ),
                )
                self._db.execute("COMMIT")
            except (JobConflict, QueueFull):
                raise
            except BaseException:
                self._db.execute("ROLLBACK")
                raise
            return self._one("SELECT * FROM jobs WHERE id=?", (job_id,)), True  # type: ignore[return-value]

    def get(self, job_id: str) -> Job | None:
        with self._lock:
            return self._one("SELECT * FROM jobs WHERE id=?", (job_id,))

    def get_by_key(self, key: str) -> Job | None:
        with self._lock:
            return self._one("SELECT * FROM jobs WHERE idem_key=?", (key,))

    def claim_next(self) -> Job | None:
        with self._lock:
            row = self._db.execute("SELECT id FROM jobs WHERE status=? ORDER BY seq LIMIT 1", (QUEUED,)).fetchone()
            if row is None:
                return None
            t = now()
            self._db.execute(
                "UPDATE jobs SET status=?, attempts=attempts+1, started_at=?, updated_at=?, progress=0 WHERE id=?",
                (PROCESSING, t, t, row["id"]),
            )
            return self._one("SELECT * FROM jobs WHERE id=?", (row["id"],))

    def set_progress(self, job_id: str, progress: int) -> None:
        with self._lock:
            self._db.execute(
                "UPDATE jobs SET progress=?, updated_at=? WHERE id=? AND status=?",
                (max(0, min(100, int(progress))), now(), job_id, PROCESSING),
            )

    def append_log(self, job_id: str, message: str, level: str = "INFO") -> None:
        with self._lock:
            row = self._db.execute("SELECT logs FROM jobs WHERE id=?", (job_id,)).fetchone()
            if row is None:
                return
            logs = json.loads(row["logs"])
            logs.append(LogLine(now(), message, level).to_dict())
            self._db.execute(
                "UPDATE jobs SET logs=?, updated_at=? WHERE id=?",
                (json.dumps(logs[-MAX_LOG_LINES:]), now(), job_id),
            )

    def finish(
        self, job_id: str, status: str, *, result: JobResult | None = None, error: JobError | None = None
    ) -> Job | None:
        assert status in TERMINAL
        t = now()
        with self._lock, self._transaction():
            cur = self._db.execute(
                "UPDATE jobs SET status=?, result=?, error_code=?, error_message=?, finished_at=?,"
                " updated_at=?, progress=CASE WHEN ?='success' THEN 100 ELSE progress END"
                " WHERE id=? AND status IN (?, ?)",
                (
                    status,
                    json.dumps(result.to_dict()) if result else None,
                    error.code if error else None,
                    error.message if error else None,
                    t,
                    t,
                    status,
                    job_id,
                    QUEUED,
                    PROCESSING,
                ),
            )
            if cur.rowcount == 0:
                return None
            self._announce(job_id, t)
            return self._one("SELECT * FROM jobs WHERE id=?", (job_id,))

    def request_cancel(self, job_id: str) -> Job | None:
        t = now()
        with self._lock, self._transaction():
            job = self._one("SELECT * FROM jobs WHERE id=?", (job_id,))
            if job is None:
                return None
            if job.status == QUEUED:
                self._announce(job_id, t)
                self._db.execute(
                    "UPDATE jobs SET status=?, error_code=?, error_message=?, finished_at=?, updated_at=?,"
                    " cancel_requested=1 WHERE id=?",
                    (CANCELLED, "cancelled", "cancelled before it started", t, t, job_id),
                )
            elif job.status == PROCESSING:
                self._db.execute("UPDATE jobs SET cancel_requested=1, updated_at=? WHERE id=?", (t, job_id))
            return self._one("SELECT * FROM jobs WHERE id=?", (job_id,))

    def requeue(self, job_id: str) -> None:
        with self._lock:
            self._db.execute(
                "UPDATE jobs SET status=?, progress=0, updated_at=? WHERE id=? AND status=?",
                (QUEUED, now(), job_id, PROCESSING),
            )

    def list_status(self, *statuses: str) -> list[Job]:
        with self._lock:
            q = ",".join("?" * len(statuses))
            rows = self._db.execute(f"SELECT * FROM jobs WHERE status IN ({q}) ORDER BY seq", statuses).fetchall()
            return [self._row_to_job(r) for r in rows]

    def active_count(self) -> int:
        with self._lock:
            q = ",".join("?" * len(ACTIVE))
            return self._db.execute(f"SELECT COUNT(*) FROM jobs WHERE status IN ({q})", tuple(ACTIVE)).fetchone()[0]

    def queue_position(self, job_id: str) -> int | None:
        with self._lock:
            row = self._db.execute("SELECT seq, status FROM jobs WHERE id=?", (job_id,)).fetchone()
            if row is None or row["status"] != QUEUED:
                return None
            return self._db.execute(
                "SELECT COUNT(*) FROM jobs WHERE status=? AND seq<?", (QUEUED, row["seq"])
            ).fetchone()[0]

    def announcements(self) -> list[str]:
        with self._lock:
            return [r[0] for r in self._db.execute("SELECT job_id FROM announcements ORDER BY created_at")]

    def acknowledge(self, job_id: str) -> None:
        with self._lock, self._transaction():
            self._db.execute("DELETE FROM announcements WHERE job_id=?", (job_id,))
            self._db.execute("DELETE FROM deliveries WHERE job_id=?", (job_id,))

    def delivered(self, job_id: str, key: str) -> bool:
        with self._lock:
            row = self._db.execute("SELECT 1 FROM deliveries WHERE job_id=? AND key=?", (job_id, key)).fetchone()
            return row is not None

    def mark_delivered(self, job_id: str, key: str, detail: str) -> None:
        with self._lock:
            self._db.execute(
                "INSERT OR REPLACE INTO deliveries (job_id, key, detail, created_at) VALUES (?,?,?,?)",
                (job_id, key, detail, now()),
            )

    def close(self) -> None:
        with self._lock:
            self._db.close()


__all__ = ["ERROR", "SUCCESS", "JobStore", "SQLiteJobStore"]
