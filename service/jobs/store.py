"""Job records in Redis: state, progress, loss history, cancel flag and the owner lock.

Keys (all under ``simclr-embed:``)::

    job:<id>          hash: kind, state, name, request (JSON), dataset, progress (JSON), model_id,
                      error, created_at, started_at, finished_at, cancel_requested, attempts
    job:<id>:loss     list of JSON [step, loss], capped to the newest `loss_history_max`
    job:<id>:lock     the owner token of the worker running the job, with a TTL
    job:<id>:revive   set while a re-sent delivery of an orphaned job is on its way
    jobs              sorted set: id -> creation time of training jobs (listing, newest first)
    jobs:index        the same for bulk indexing jobs
    jobs:active       set: ids of jobs not yet finished (queued or running)

Why a lock: with Redis as broker, a task that runs longer than the visibility timeout is
delivered a second time while the first delivery still runs (celery #5935, #6229). Only the
holder of `job:<id>:lock` trains; a worker renews it with a heartbeat, so a killed worker's
lock lapses after the TTL and the next delivery resumes the run from its checkpoint.
State changes are Lua scripts, so a cancel and a worker's start cannot interleave.
"""

from __future__ import annotations

import builtins
import json
import time
from datetime import UTC, datetime
from enum import StrEnum
from typing import Any, Literal

import redis
from pydantic import BaseModel, Field
from redis.backoff import ExponentialBackoff
from redis.exceptions import ConnectionError as RedisConnectionError
from redis.exceptions import TimeoutError as RedisTimeoutError
from redis.retry import Retry

from service.settings import Settings, env_settings

PREFIX = "simclr-embed:"


class JobState(StrEnum):
    queued = "queued"
    running = "running"
    succeeded = "succeeded"
    failed = "failed"
    cancelled = "cancelled"


TERMINAL = frozenset({JobState.succeeded, JobState.failed, JobState.cancelled})
JobKind = Literal["train", "index"]  # training and fine-tuning jobs; bulk indexing jobs


class IndexCounts(BaseModel):
    """A bulk indexing job's tallies so far (service.items.bulk.IndexReport)."""

    added: int = 0
    replaced: int = 0
    skipped: int = 0  # already indexed with the same bytes
    failed: int = 0  # files that could not be read or decoded
    failed_ids: list[str] = Field(default_factory=list, description="the first 100 of them")
    vanished: int = 0  # ids of the previous run over this dataset whose files are gone
    vanished_ids: list[str] = Field(default_factory=list, description="the first 100 of them")
    deleted: int = 0  # vanished items deleted (with `delete_missing`)


class JobProgress(BaseModel):
    epoch: int = 0
    step: int = 0
    total_steps: int = 0
    loss: float | None = None
    lr: float | None = None
    images_per_s: float | None = None
    eta_s: float | None = None
    knn_top1: float | None = None  # the last kNN monitor reading (config knn_every_epochs)
    masked_images: int = 0  # batch slots of images whose pixels failed to decode, so far
    defaults: dict[str, Any] = {}  # the defaults decided for the run: {field: {"value", "source"}}
    precision: str | None = None  # what the run trains in: "fp32" or "bf16" (trainer/precision.py)
    warning: str | None = None  # e.g. a bf16 run resumed in fp32 on a machine without native bf16
    index: IndexCounts | None = None  # a bulk indexing job's tallies (step counts its images)


class JobRecord(BaseModel):
    """What a client sees of a job."""

    id: str
    kind: JobKind = "train"
    state: JobState
    name: str | None = None
    dataset: str
    request: dict[str, Any]
    progress: JobProgress | None = None
    loss_history: list[tuple[int, float]] = Field(default_factory=list, description="[step, loss], oldest first")
    model_id: str | None = None
    error: str | None = None
    created_at: str
    started_at: str | None = None
    finished_at: str | None = None
    cancel_requested: bool = False
    attempts: int = 0


def utcnow() -> str:
    return datetime.now(UTC).isoformat(timespec="milliseconds")


def model_id_for(job_id: str) -> str:
    """The model a job publishes: derived from the job id, so a redelivered job cannot publish twice."""
    return f"job-{job_id}"


def connect(url: str) -> redis.Redis:
    """A client that rides out short broker restarts (a few retries with backoff)."""
    return redis.Redis.from_url(
        url,
        decode_responses=True,
        socket_timeout=10,
        socket_connect_timeout=5,
        health_check_interval=15,
        retry=Retry(ExponentialBackoff(cap=1.0, base=0.05), 6),
        retry_on_error=[RedisConnectionError, RedisTimeoutError],
    )


# KEYS: job hash, active set. ARGV: new state, allowed current states (comma list), then field/value pairs.
# Returns {1, old} when moved, {0, current} when not allowed, {0, ""} when the job does not exist.
_TRANSITION = """
local cur = redis.call('HGET', KEYS[1], 'state')
if not cur then return {0, ''} end
if not string.find(',' .. ARGV[2] .. ',', ',' .. cur .. ',', 1, true) then return {0, cur} end
redis.call('HSET', KEYS[1], 'state', ARGV[1])
for i = 3, #ARGV, 2 do redis.call('HSET', KEYS[1], ARGV[i], ARGV[i + 1]) end
if ARGV[1] == 'succeeded' or ARGV[1] == 'failed' or ARGV[1] == 'cancelled' then
  redis.call('SREM', KEYS[2], KEYS[1])
end
return {1, cur}
"""

# KEYS: lock. ARGV: token, ttl ms. Renew our lock, or take it back if it lapsed; 0 if another owns it.
_RENEW = """
local owner = redis.call('GET', KEYS[1])
if owner == ARGV[1] then return redis.call('PEXPIRE', KEYS[1], ARGV[2]) end
if not owner then redis.call('SET', KEYS[1], ARGV[1], 'PX', ARGV[2]) return 1 end
return 0
"""

_RELEASE = """
if redis.call('GET', KEYS[1]) == ARGV[1] then return redis.call('DEL', KEYS[1]) end
return 0
"""


class JobStore:
    """Job records and locks in one Redis database (the broker's)."""

    def __init__(self, client: redis.Redis, *, lock_ttl_s: float = 60.0, loss_history_max: int = 2000) -> None:
        # redis-py annotates replies as bytes; this client decodes them (decode_responses=True).
        self.redis: Any = client
        self.lock_ttl_ms = int(lock_ttl_s * 1000)
        self.loss_history_max = loss_history_max
        self._transition = client.register_script(_TRANSITION)
        self._renew = client.register_script(_RENEW)
        self._release = client.register_script(_RELEASE)

    @classmethod
    def from_url(cls, url: str, settings: Settings | None = None) -> JobStore:
        """A store on the broker at `url`, sized by the `SIMCLR_EMBED_*` job settings."""
        settings = settings or env_settings()
        return cls(connect(url), lock_ttl_s=settings.job_lock_ttl_s, loss_history_max=settings.loss_history_max)

    @staticmethod
    def _key(job_id: str, suffix: str = "") -> str:
        return f"{PREFIX}job:{job_id}{suffix}"

    @staticmethod
    def _listing(kind: JobKind) -> str:
        return f"{PREFIX}jobs" if kind == "train" else f"{PREFIX}jobs:{kind}"

    # -- records ----------------------------------------------------------------------------

    def create(
        self,
        job_id: str,
        *,
        request: dict[str, Any],
        dataset: str,
        name: str | None,
        kind: JobKind = "train",
        queue: str | None = None,
    ) -> JobRecord:
        """`queue`: where the job's message was sent when not its task's own route; a re-send
        (after its worker died) goes there too."""
        now = utcnow()
        fields = {
            "id": job_id,
            "kind": kind,
            "queue": queue or "",
            "state": JobState.queued.value,
            "request": json.dumps(request),
            "dataset": dataset,
            "name": name or "",
            "created_at": now,
            "cancel_requested": "0",
            "attempts": "0",
        }
        with self.redis.pipeline() as pipe:
            pipe.hset(self._key(job_id), mapping=fields)
            pipe.zadd(self._listing(kind), {job_id: time.time()})
            pipe.sadd(f"{PREFIX}jobs:active", self._key(job_id))
            pipe.execute()
        return self._record(fields, [])

    def delete(self, job_id: str) -> None:
        """Forget a job that could not be queued (the API answers 503 for it)."""
        with self.redis.pipeline() as pipe:
            pipe.delete(self._key(job_id), self._key(job_id, ":loss"))
            for listing in (self._listing("train"), self._listing("index")):
                pipe.zrem(listing, job_id)
            pipe.srem(f"{PREFIX}jobs:active", self._key(job_id))
            pipe.execute()

    def get(self, job_id: str, *, with_history: bool = True) -> JobRecord | None:
        fields = self.redis.hgetall(self._key(job_id))
        if not fields:
            return None
        history = self.redis.lrange(self._key(job_id, ":loss"), 0, -1) if with_history else []
        return self._record(fields, history)

    def list(self, *, offset: int = 0, limit: int = 50, kind: JobKind = "train") -> tuple[int, list[JobRecord]]:
        """(total, a page of jobs of `kind` newest first); pages carry no loss history."""
        total = self.redis.zcard(self._listing(kind))
        ids = self.redis.zrevrange(self._listing(kind), offset, offset + limit - 1)
        with self.redis.pipeline() as pipe:
            for job_id in ids:
                pipe.hgetall(self._key(job_id))
            rows = pipe.execute()
        return total, [self._record(row, []) for row in rows if row]

    @staticmethod
    def _record(fields: dict[str, str], history: builtins.list[str]) -> JobRecord:
        return JobRecord(
            id=fields["id"],
            kind=fields.get("kind") or "train",
            state=JobState(fields["state"]),
            name=fields.get("name") or None,
            dataset=fields["dataset"],
            request=json.loads(fields["request"]),
            progress=JobProgress.model_validate_json(fields["progress"]) if fields.get("progress") else None,
            loss_history=[tuple(json.loads(item)) for item in history],
            model_id=fields.get("model_id") or None,
            error=fields.get("error") or None,
            created_at=fields["created_at"],
            started_at=fields.get("started_at") or None,
            finished_at=fields.get("finished_at") or None,
            cancel_requested=fields.get("cancel_requested") == "1",
            attempts=int(fields.get("attempts", "0")),
        )

    # -- state changes ----------------------------------------------------------------------

    def transition(self, job_id: str, to: JobState, allowed_from: set[JobState], **fields: str) -> tuple[bool, str]:
        """Move to `to` if the current state is in `allowed_from`; (moved, state before or now)."""
        argv: list[str] = [to.value, ",".join(s.value for s in allowed_from)]
        for key, value in fields.items():
            argv += [key, value]
        moved, state = self._transition(keys=[self._key(job_id), f"{PREFIX}jobs:active"], args=argv)
        return bool(moved), state

    def start(self, job_id: str) -> bool:
        """queued (or running, on redelivery) -> running; False when the job is finished or gone."""
        moved, _ = self.transition(job_id, JobState.running, {JobState.queued, JobState.running})
        if moved:
            self.redis.hsetnx(self._key(job_id), "started_at", utcnow())
            self.redis.hincrby(self._key(job_id), "attempts", 1)
        return moved

    def requeue(self, job_id: str) -> bool:
        """running -> queued: the worker is shutting down and hands the job back."""
        return self.transition(job_id, JobState.queued, {JobState.running})[0]

    def finish(self, job_id: str, state: JobState, *, model_id: str | None = None, error: str | None = None) -> bool:
        fields = {"finished_at": utcnow()}
        if model_id:
            fields["model_id"] = model_id
        if error:
            fields["error"] = error
        return self.transition(job_id, state, {JobState.queued, JobState.running}, **fields)[0]

    def request_cancel(self, job_id: str) -> JobRecord | None:
        """Flag the job; a queued job is cancelled at once, a running one at its next step."""
        if not self.redis.exists(self._key(job_id)):
            return None
        self.redis.hset(self._key(job_id), "cancel_requested", "1")
        self.transition(job_id, JobState.cancelled, {JobState.queued}, finished_at=utcnow())
        return self.get(job_id)

    def kind(self, job_id: str) -> JobKind:
        """Which task runs the job (a record written before kinds existed is a training job)."""
        kind = self.redis.hget(self._key(job_id), "kind")
        return "index" if kind == "index" else "train"

    def queue(self, job_id: str) -> str | None:
        """The queue the job was sent to, None for its task's own route."""
        return self.redis.hget(self._key(job_id), "queue") or None

    def cancel_requested(self, job_id: str) -> bool:
        return self.redis.hget(self._key(job_id), "cancel_requested") == "1"

    def record_progress(self, job_id: str, progress: dict[str, Any]) -> None:
        snapshot = JobProgress.model_validate({k: progress.get(k) for k in JobProgress.model_fields if k in progress})
        with self.redis.pipeline() as pipe:
            pipe.hset(self._key(job_id), "progress", snapshot.model_dump_json())
            if snapshot.loss is not None:
                pipe.rpush(self._key(job_id, ":loss"), json.dumps([snapshot.step, snapshot.loss]))
                pipe.ltrim(self._key(job_id, ":loss"), -self.loss_history_max, -1)
            pipe.execute()

    # -- the owner lock ---------------------------------------------------------------------

    def acquire(self, job_id: str, token: str) -> bool:
        return bool(self.redis.set(self._key(job_id, ":lock"), token, nx=True, px=self.lock_ttl_ms))

    def renew(self, job_id: str, token: str) -> bool:
        """Heartbeat: extend our lock (or retake a lapsed one); False once another worker owns it."""
        return bool(self._renew(keys=[self._key(job_id, ":lock")], args=[token, self.lock_ttl_ms]))

    def release(self, job_id: str, token: str) -> None:
        self._release(keys=[self._key(job_id, ":lock")], args=[token])

    def orphans(self) -> builtins.list[str]:
        """Running jobs whose owner stopped renewing its lock (its worker died): to be re-sent."""
        found = []
        for key in self.redis.smembers(f"{PREFIX}jobs:active"):
            job_id = key.removeprefix(f"{PREFIX}job:")
            if self.redis.hget(key, "state") == JobState.running and not self.redis.exists(self._key(job_id, ":lock")):
                found.append(job_id)
        return found

    def claim_revival(self, job_id: str) -> bool:
        """One re-send per lock TTL across all workers watching for orphans."""
        return bool(self.redis.set(self._key(job_id, ":revive"), "1", nx=True, px=2 * self.lock_ttl_ms))
