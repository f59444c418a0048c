"""Job state in Redis: the :class:`~ccsr.jobs.store.JobStore` every API replica and GPU worker shares.

Each transition is one Lua script, so replicas and workers never race: a job is a hash ``<p>job:<id>``, its
log a list ``<p>logs:<id>``; ``<p>queue`` (sorted by submission sequence) gives queue positions,
``<p>queue:<model>`` the same per model (what a worker serving that model takes, oldest first; ``<p>models`` names
the models ever queued), ``<p>processing`` the running set, ``<p>owner:<name>`` an owner's queued and running jobs
(its quota), ``<p>workers`` and ``<p>workers:<model>`` the live workers (score: when their announcement runs out),
``<p>lease:<id>`` the running worker's lease (renewed while it works; a lease that runs out means the worker
died). Every terminal transition is appended to the stream
``<p>terminal`` (consumed by exactly one API replica, which sends webhooks) and every change is published on
``<p>events`` (every replica wakes its waiters, so progress stays live). Terminal jobs, their logs and their
idempotency keys expire after ``job_ttl`` seconds.
"""

from __future__ import annotations

import json
import uuid

import redis

from ccsr.params import UpscaleParams

from ..store import JobStore
from ..types import (
    DEFAULT_MODEL,
    PROCESSING,
    QUEUED,
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

# Shared Lua: a job's model queue; move a job to a terminal status and announce it (stream for delivery, channel
# for waiters). Jobs stored before models had no ``model`` field: they are the default model's.
_FINISH = """
local function model_queue(p, jk)
  return p .. 'queue:' .. (redis.call('HGET', jk, 'model') or '""" + DEFAULT_MODEL + """')
end
local function finish(p, id, status, result, ecode, emsg, t, ttl)
  local jk = p .. 'job:' .. id
  redis.call('HSET', jk, 'status', status, 'finished_at', t, 'updated_at', t)
  if result ~= '' then redis.call('HSET', jk, 'result', result) end
  if ecode ~= '' then redis.call('HSET', jk, 'error_code', ecode, 'error_message', emsg) end
  if status == 'success' then redis.call('HSET', jk, 'progress', 100) end
  redis.call('HDEL', jk, 'token')
  local owner = redis.call('HGET', jk, 'owner')
  if owner then redis.call('SREM', p .. 'owner:' .. owner, id) end
  redis.call('ZREM', p .. 'queue', id)
  redis.call('ZREM', model_queue(p, jk), id)
  redis.call('ZREM', p .. 'undispatched', id)
  redis.call('SREM', p .. 'processing', id)
  redis.call('DEL', p .. 'lease:' .. id)
  if ttl > 0 then
    redis.call('EXPIRE', jk, ttl)
    redis.call('EXPIRE', p .. 'logs:' .. id, ttl)
    local key = redis.call('HGET', jk, 'idem_key')
    if key then redis.call('EXPIRE', p .. 'idem:' .. key, ttl) end
  end
  redis.call('XADD', p .. 'terminal', 'MAXLEN', '~', 100000, '*', 'job', id, 'status', status)
  redis.call('PUBLISH', p .. 'events', id)
end
local function log(p, id, t, msg, level)
  redis.call('RPUSH', p .. 'logs:' .. id, cjson.encode({timestamp = tonumber(t), message = msg, level = level}))
  redis.call('LTRIM', p .. 'logs:' .. id, -200, -1)
end
"""

_CREATE = """
local p, id, key, max_active, t = ARGV[1], ARGV[2], ARGV[3], tonumber(ARGV[4]), ARGV[5]
if key ~= '' then
  local existing = redis.call('GET', p .. 'idem:' .. key)
  if existing and redis.call('EXISTS', p .. 'job:' .. existing) == 1 then return {'existing', existing} end
end
if max_active >= 0 then
  local depth = redis.call('ZCARD', p .. 'queue') + redis.call('SCARD', p .. 'processing')
  if depth >= max_active then return {'full', tostring(depth)} end
end
local owner, owner_max = ARGV[7], tonumber(ARGV[8])
if owner ~= '' and owner_max > 0 then
  local mine = redis.call('SCARD', p .. 'owner:' .. owner)
  if mine >= owner_max then return {'quota', tostring(mine)} end
end
local seq = redis.call('INCR', p .. 'seq')
local fields = cjson.decode(ARGV[6])
local args = {}
for k, v in pairs(fields) do args[#args + 1] = k; args[#args + 1] = v end
redis.call('HSET', p .. 'job:' .. id, 'seq', seq, unpack(args))
redis.call('ZADD', p .. 'queue', seq, id)
redis.call('ZADD', p .. 'queue:' .. ARGV[9], seq, id)
redis.call('SADD', p .. 'models', ARGV[9])
redis.call('ZADD', p .. 'undispatched', t, id)
if key ~= '' then redis.call('SET', p .. 'idem:' .. key, id) end
if owner ~= '' then redis.call('SADD', p .. 'owner:' .. owner, id) end
log(p, id, t, 'queued', 'INFO')
redis.call('PUBLISH', p .. 'events', id)
return {'created', id}
"""

# Claim a job for one worker. A processing job whose lease ran out was orphaned by a dead worker: it is
# taken over (attempts + 1) or, once max_attempts runs are spent, failed with a clear error.
_CLAIM = """
local p, id, token, lease, t, max_att, ttl = ARGV[1], ARGV[2], ARGV[3], ARGV[4], ARGV[5], tonumber(ARGV[6]),
  tonumber(ARGV[7])
local jk = p .. 'job:' .. id
local st = redis.call('HGET', jk, 'status')
if not st then return 'missing' end
if st == 'processing' then
  if redis.call('EXISTS', p .. 'lease:' .. id) == 1 then return 'busy' end
  if tonumber(redis.call('HGET', jk, 'attempts')) >= max_att then
    log(p, id, t, 'the worker running this job was lost; giving up', 'ERROR')
    finish(p, id, 'error', '', 'interrupted', 'the worker running this job died ' ..
      redis.call('HGET', jk, 'attempts') .. ' times; giving up', t, ttl)
    return 'failed'
  end
  log(p, id, t, 'the worker running this job was lost; running it again', 'WARNING')
elseif st ~= 'queued' then
  return 'done'
end
redis.call('HSET', jk, 'status', 'processing', 'token', token, 'started_at', t, 'updated_at', t, 'progress', 0)
local att = redis.call('HINCRBY', jk, 'attempts', 1)
redis.call('ZREM', p .. 'queue', id)
redis.call('ZREM', model_queue(p, jk), id)
redis.call('ZREM', p .. 'undispatched', id)
redis.call('SADD', p .. 'processing', id)
redis.call('SET', p .. 'lease:' .. id, token, 'PX', lease)
log(p, id, t, 'started (attempt ' .. att .. ')', 'INFO')
redis.call('PUBLISH', p .. 'events', id)
return 'claimed'
"""

# Orphaned processing job (lease gone): back to the queue at its old place, or failed after max_attempts.
_REAP = """
local p, id, t, max_att, ttl = ARGV[1], ARGV[2], ARGV[3], tonumber(ARGV[4]), tonumber(ARGV[5])
local jk = p .. 'job:' .. id
local st = redis.call('HGET', jk, 'status')
if st ~= 'processing' then
  redis.call('SREM', p .. 'processing', id)
  return 'gone'
end
if redis.call('EXISTS', p .. 'lease:' .. id) == 1 then return 'alive' end
local att = tonumber(redis.call('HGET', jk, 'attempts'))
if att >= max_att then
  log(p, id, t, 'the worker running this job was lost; giving up', 'ERROR')
  finish(p, id, 'error', '', 'interrupted', 'the worker running this job died ' .. att .. ' times; giving up',
    t, ttl)
  return 'failed'
end
redis.call('HSET', jk, 'status', 'queued', 'progress', 0, 'updated_at', t)
redis.call('HDEL', jk, 'token')
redis.call('SREM', p .. 'processing', id)
redis.call('ZADD', p .. 'queue', tonumber(redis.call('HGET', jk, 'seq')), id)
redis.call('ZADD', model_queue(p, jk), tonumber(redis.call('HGET', jk, 'seq')), id)
redis.call('ZADD', p .. 'undispatched', 0, id)
log(p, id, t, 'the worker running this job was lost; queued again (attempt ' .. (att + 1) .. ')', 'WARNING')
redis.call('PUBLISH', p .. 'events', id)
return 'requeued'
"""

# Finish: with a token only the worker holding the job may finish it; without one any active job.
_FINISH_JOB = """
local p, id, token, status, result, ecode, emsg, t, ttl = ARGV[1], ARGV[2], ARGV[3], ARGV[4], ARGV[5],
  ARGV[6], ARGV[7], ARGV[8], tonumber(ARGV[9])
local jk = p .. 'job:' .. id
local st = redis.call('HGET', jk, 'status')
if st ~= 'queued' and st ~= 'processing' then return 0 end
if token ~= '' and (st ~= 'processing' or redis.call('HGET', jk, 'token') ~= token) then return 0 end
finish(p, id, status, result, ecode, emsg, t, ttl)
return 1
"""

_CANCEL = """
local p, id, t, ttl = ARGV[1], ARGV[2], ARGV[3], tonumber(ARGV[4])
local jk = p .. 'job:' .. id
local st = redis.call('HGET', jk, 'status')
if not st then return 0 end
if st == 'queued' then
  redis.call('HSET', jk, 'cancel_requested', 1)
  log(p, id, t, 'cancelled', 'WARNING')
  finish(p, id, 'cancelled', '', 'cancelled', 'cancelled before it started', t, ttl)
elseif st == 'processing' then
  redis.call('HSET', jk, 'cancel_requested', 1, 'updated_at', t)
  log(p, id, t, 'cancellation requested', 'WARNING')
  redis.call('PUBLISH', p .. 'events', id)
end
return 1
"""

_PROGRESS = """
local p, id, value, t = ARGV[1], ARGV[2], ARGV[3], ARGV[4]
local jk = p .. 'job:' .. id
if redis.call('HGET', jk, 'status') ~= 'processing' then return 0 end
redis.call('HSET', jk, 'progress', value, 'updated_at', t)
redis.call('PUBLISH', p .. 'events', id)
return 1
"""

_RENEW = """
local p, id, token, lease = ARGV[1], ARGV[2], ARGV[3], ARGV[4]
if redis.call('GET', p .. 'lease:' .. id) ~= token then return 0 end
redis.call('PEXPIRE', p .. 'lease:' .. id, lease)
return 1
"""

_LOG = """
local p, id, t, msg, level = ARGV[1], ARGV[2], ARGV[3], ARGV[4], ARGV[5]
if redis.call('EXISTS', p .. 'job:' .. id) == 0 then return 0 end
log(p, id, t, msg, level)
redis.call('PUBLISH', p .. 'events', id)
return 1
"""

# A log line written once per job and note (``field``), while the job is queued.
_NOTE_ONCE = """
local p, id, field, t, msg, level = ARGV[1], ARGV[2], ARGV[3], ARGV[4], ARGV[5], ARGV[6]
local jk = p .. 'job:' .. id
if redis.call('HGET', jk, 'status') ~= 'queued' then return 0 end
if redis.call('HSETNX', jk, field, '1') == 0 then return 0 end
log(p, id, t, msg, level)
redis.call('PUBLISH', p .. 'events', id)
return 1
"""


class RedisJobStore(JobStore):
    """Job state shared by API replicas and workers through one Redis (``redis://host:port/db``)."""

    def __init__(
        self,
        client: redis.Redis | str,
        *,
        prefix: str = "ccsr:",
        job_ttl: float = 24 * 3600,
        max_attempts: int = 2,
    ):
        self.redis = redis.Redis.from_url(client) if isinstance(client, str) else client
        self.prefix = prefix
        self.job_ttl = int(job_ttl)
        self.max_attempts = max_attempts
        self._scripts = {
            name: self.redis.register_script(_FINISH + body)
            for name, body in (
                ("create", _CREATE),
                ("claim", _CLAIM),
                ("reap", _REAP),
                ("finish", _FINISH_JOB),
                ("cancel", _CANCEL),
                ("progress", _PROGRESS),
                ("renew", _RENEW),
                ("log", _LOG),
                ("note_once", _NOTE_ONCE),
            )
        }

    # ------------------------------------------------------------------ keys
    def key(self, *parts: str) -> str:
        return self.prefix + ":".join(parts)

    @property
    def events_channel(self) -> str:
        return self.key("events")

    @property
    def terminal_stream(self) -> str:
        return self.key("terminal")

    def _run(self, name: str, *args: object):
        out = self._scripts[name](keys=[], args=[self.prefix, *args])
        if isinstance(out, bytes):
            return out.decode()
        if isinstance(out, list):
            return [x.decode() if isinstance(x, bytes) else x for x in out]
        return out

    # ------------------------------------------------------------------ (de)serialisation
    @staticmethod
    def _fields(job_id: str, spec: JobSpec, t: float) -> dict[str, str]:
        f = {
            "id": job_id,
            "protocol": spec.protocol,
            "model": spec.model,
            "status": QUEUED,
            "params": json.dumps(spec.params.to_dict()),
            "input_image_id": spec.input_image_id,
            "output": json.dumps(spec.output.to_dict()),
            "output_image_id": str(uuid.uuid4()),
            "meta": json.dumps(spec.meta),
            "cost_per_second": repr(float(spec.cost_per_second)),
            "progress": "0",
            "attempts": "0",
            "cancel_requested": "0",
            "created_at": repr(t),
            "updated_at": repr(t),
        }
        if spec.idempotency_key:
            f["idem_key"] = spec.idempotency_key
        if spec.payload_hash:
            f["payload_hash"] = spec.payload_hash
        if spec.max_output:
            f["max_output"] = json.dumps(list(spec.max_output))
        if spec.owner:
            f["owner"] = spec.owner
        return f

    @staticmethod
    def _job(h: dict[bytes, bytes], logs: list[bytes]) -> Job:
        d = {k.decode(): v.decode() for k, v in h.items()}
        opt = lambda name: float(d[name]) if d.get(name) else None  # noqa: E731
        mo = json.loads(d["max_output"]) if d.get("max_output") else None
        return Job(
            id=d["id"],
            status=d["status"],
            params=UpscaleParams(**json.loads(d["params"])),
            input_image_id=d["input_image_id"],
            output=OutputOptions.from_dict(json.loads(d["output"])),
            output_image_id=d["output_image_id"],
            max_output=tuple(mo) if mo else None,
            protocol=d.get("protocol", ""),
            meta=json.loads(d.get("meta") or "{}"),
            idempotency_key=d.get("idem_key"),
            payload_hash=d.get("payload_hash"),
            cost_per_second=float(d.get("cost_per_second") or 0),
            model=d.get("model") or DEFAULT_MODEL,
            progress=int(d.get("progress") or 0),
            result=JobResult.from_dict(json.loads(d["result"]) if d.get("result") else None),
            error=JobError(d["error_code"], d.get("error_message", "")) if d.get("error_code") else None,
            attempts=int(d.get("attempts") or 0),
            cancel_requested=d.get("cancel_requested") == "1",
            created_at=float(d["created_at"]),
            started_at=opt("started_at"),
            finished_at=opt("finished_at"),
            updated_at=float(d["updated_at"]),
            logs=tuple(LogLine(**json.loads(x)) for x in logs),
        )

    # ------------------------------------------------------------------ JobStore
    def create(self, spec: JobSpec, *, max_active: int | None = None) -> tuple[Job, bool]:
        t = now()
        job_id = str(uuid.uuid4())
        fields = self._fields(job_id, spec, t)
        limit = -1 if max_active is None else max_active
        what, value = self._run(
            "create", job_id, spec.idempotency_key or "", limit, repr(t), json.dumps(fields), spec.owner or "",
            spec.owner_quota, spec.model,
        )
        if what == "full":
            raise QueueFull(int(value), limit)
        if what == "quota":
            raise QuotaFull(spec.owner or "", int(value), spec.owner_quota)
        job = self.get(value)
        if job is None:  # expired between the script and this read: vanishingly rare, treat as conflict
            raise JobConflict(spec.idempotency_key or "", value)
        if what == "existing":
            if job.payload_hash != spec.payload_hash:
                raise JobConflict(spec.idempotency_key or "", job.id)
            return job, False
        return job, True

    def get(self, job_id: str) -> Job | None:
        pipe = self.redis.pipeline(transaction=True)
        pipe.hgetall(self.key("job", job_id))
        pipe.lrange(self.key("logs", job_id), 0, -1)
        h, logs = pipe.execute()
        return self._job(h, logs) if h else None

    def get_by_key(self, key: str) -> Job | None:
        job_id = self.redis.get(self.key("idem", key))
        return self.get(job_id.decode()) if job_id else None

    def claim(self, job_id: str, token: str, lease: float) -> str:
        """``claimed`` | ``busy`` (another live worker has it) | ``done`` | ``failed`` (orphaned too often)
        | ``missing``."""
        return self._run("claim", job_id, token, int(lease * 1000), repr(now()), self.max_attempts, self.job_ttl)

    def queued_ids(self, limit: int, model: str | None = None) -> list[str]:
        """The first ``limit`` queued jobs (of ``model``, or of every model), oldest first (a requeued job keeps
        its submission place)."""
        queue = self.key("queue", model) if model else self.key("queue")
        return [x.decode() for x in self.redis.zrange(queue, 0, limit - 1)]

    def model_of(self, job_id: str) -> str | None:
        """The model a job runs on (None: no such job)."""
        pipe = self.redis.pipeline(transaction=False)
        pipe.hget(self.key("job", job_id), "model")
        pipe.exists(self.key("job", job_id))
        model, exists = pipe.execute()
        return model.decode() if model else DEFAULT_MODEL if exists else None

    def queued_models(self) -> list[str]:
        """The models that have queued jobs now."""
        models = sorted(m.decode() for m in self.redis.smembers(self.key("models")))
        return [m for m in models if self.redis.zcard(self.key("queue", m))]

    def live_workers(self, model: str | None = None) -> int:
        """Workers that announced themselves ready (for ``model``, or for any) and have not gone silent."""
        key = self.key("workers", model) if model else self.key("workers")
        return int(self.redis.zcount(key, now(), "+inf"))

    def claim_next(self) -> Job | None:
        for job_id in self.queued_ids(10):
            if self.claim(job_id, f"local:{uuid.uuid4().hex}", 3600.0) == "claimed":
                return self.get(job_id)
        return None

    def renew(self, job_id: str, token: str, lease: float) -> bool:
        """Extend a running job's lease; False when the lease was lost (the job is no longer ours)."""
        return bool(self._run("renew", job_id, token, int(lease * 1000)))

    def reap(self, job_id: str) -> str:
        """Requeue (or fail) a processing job whose worker's lease ran out: ``requeued`` | ``failed`` |
        ``alive`` | ``gone``."""
        return self._run("reap", job_id, repr(now()), self.max_attempts, self.job_ttl)

    def set_progress(self, job_id: str, progress: int) -> None:
        self._run("progress", job_id, max(0, min(100, int(progress))), repr(now()))

    def append_log(self, job_id: str, message: str, level: str = "INFO") -> None:
        self._run("log", job_id, repr(now()), message, level)

    def note_once(self, job_id: str, note: str, message: str, level: str = "WARNING") -> bool:
        """Append ``message`` to a queued job's log unless the ``note`` was written on it before."""
        return bool(self._run("note_once", job_id, f"note:{note}", repr(now()), message, level))

    def finish(
        self, job_id: str, status: str, *, result: JobResult | None = None, error: JobError | None = None
    ) -> Job | None:
        return self.finish_claimed(job_id, "", status, result=result, error=error)

    def finish_claimed(
        self,
        job_id: str,
        token: str,
        status: str,
        *,
        result: JobResult | None = None,
        error: JobError | None = None,
    ) -> Job | None:
        """Finish a job; with ``token`` only if that worker still holds it. None when nothing changed."""
        assert status in TERMINAL
        ok = self._run(
            "finish",
            job_id,
            token,
            status,
            json.dumps(result.to_dict()) if result else "",
            error.code if error else "",
            error.message if error else "",
            repr(now()),
            self.job_ttl,
        )
        return self.get(job_id) if ok else None

    def request_cancel(self, job_id: str) -> Job | None:
        if not self._run("cancel", job_id, repr(now()), self.job_ttl):
            return None
        return self.get(job_id)

    def requeue(self, job_id: str) -> None:
        self.redis.delete(self.key("lease", job_id))
        self.reap(job_id)

    def list_status(self, *statuses: str) -> list[Job]:
        ids: list[bytes] = []
        if QUEUED in statuses:
            ids += self.redis.zrange(self.key("queue"), 0, -1)
        if PROCESSING in statuses:
            ids += sorted(self.redis.smembers(self.key("processing")))
        jobs = [self.get(i.decode()) for i in ids]
        if set(statuses) & TERMINAL:
            for k in self.redis.scan_iter(match=self.key("job", "*"), count=500):
                j = self.get(k.decode()[len(self.key("job", "")) :])
                if j is not None and j.status in statuses:
                    jobs.append(j)
        return [j for j in jobs if j is not None and j.status in statuses]

    def processing_ids(self) -> list[str]:
        return [x.decode() for x in self.redis.smembers(self.key("processing"))]

    def undispatched(self, older_than: float) -> list[str]:
        """Queued jobs whose Celery message was never confirmed sent (a replica died in between)."""
        return [x.decode() for x in self.redis.zrangebyscore(self.key("undispatched"), 0, older_than)]

    def mark_dispatched(self, job_id: str) -> None:
        self.redis.zrem(self.key("undispatched"), job_id)

    def mark_undispatched(self, job_id: str) -> None:
        """The job's message was spent without a turn of its model: Maintenance sends another."""
        self.redis.zadd(self.key("undispatched"), {job_id: 0})

    def active_count(self) -> int:
        pipe = self.redis.pipeline(transaction=True)
        pipe.zcard(self.key("queue"))
        pipe.scard(self.key("processing"))
        q, r = pipe.execute()
        return int(q) + int(r)

    def queue_position(self, job_id: str) -> int | None:
        """Jobs ahead of this one among its model's: workers take each model's jobs from its own queue."""
        model = self.model_of(job_id)
        rank = self.redis.zrank(self.key("queue", model), job_id) if model else None
        if rank is None and model:  # queued before per-model queues existed: its place among all
            rank = self.redis.zrank(self.key("queue"), job_id)
        return None if rank is None else int(rank)

    def close(self) -> None:
        self.redis.close()


__all__ = ["RedisJobStore"]
