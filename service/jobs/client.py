"""The API's handle on jobs: records in Redis plus Celery messages sent by task name."""

from __future__ import annotations

import secrets
from collections.abc import Callable
from datetime import UTC, datetime
from pathlib import Path
from typing import TYPE_CHECKING, Any, TypeVar

import redis
from celery import Celery
from redis.backoff import NoBackoff
from redis.exceptions import RedisError
from redis.retry import Retry

from service.contract.finetune_config import FinetuneJobRequest
from service.contract.index_config import IndexJobRequest
from service.contract.train_config import TrainJobRequest
from service.jobs.celery_app import JOB_TASKS, create_celery
from service.jobs.store import JobKind, JobRecord, JobStore
from service.settings import Settings, env_settings

if TYPE_CHECKING:  # the classifier service (onnxruntime) is not needed to send a job
    from service.classifiers.schemas import ClassifierFitJob, WriteBackJob

    # What a job record's `request` holds, by the route that queued it.
    JobRequest = TrainJobRequest | FinetuneJobRequest | WriteBackJob | ClassifierFitJob | IndexJobRequest

T = TypeVar("T")


class JobsUnavailableError(Exception):
    """No broker configured, or it does not answer; the API maps this to 503."""

    code = "jobs_unavailable"


def new_job_id() -> str:
    """Sortable by creation time and safe in paths and model ids."""
    return f"{datetime.now(UTC):%Y%m%d-%H%M%S}-{secrets.token_hex(4)}"


class JobClient:
    def __init__(self, broker_url: str | None, settings: Settings | None = None) -> None:
        self.broker_url = broker_url
        settings = settings or env_settings()
        self._celery: Celery | None = None
        self._store: JobStore | None = None
        self._probe: redis.Redis | None = None
        if broker_url:
            # /readyz wants a quick answer: one try, one second, no backoff.
            self._probe = redis.Redis.from_url(
                broker_url, socket_timeout=1, socket_connect_timeout=1, retry=Retry(NoBackoff(), 0)
            )
            self._celery = create_celery(broker_url, settings)
            self._store = JobStore.from_url(broker_url, settings)

    @property
    def store(self) -> JobStore:
        if self._store is None:
            raise JobsUnavailableError(
                "no job broker is configured: set SIMCLR_EMBED_BROKER_URL, or run `simclr-embed up`"
            )
        return self._store

    def _call(self, fn: Callable[..., T], *args: Any, **kwargs: Any) -> T:
        try:
            return fn(*args, **kwargs)
        except RedisError as exc:
            raise JobsUnavailableError(f"the job broker at {self.broker_url} does not answer: {exc}") from exc

    def submit(
        self,
        request: JobRequest,
        dataset: Path | str,
        queue: str | None = None,
    ) -> JobRecord:
        """Record the job as queued, then queue its kind's task (on `queue`, default the task's
        own route); undone if the message cannot be sent."""
        store = self.store
        job_id = new_job_id()
        kind: JobKind = "index" if isinstance(request, IndexJobRequest) else "train"
        body = request.model_dump(mode="json")
        record = self._call(
            store.create, job_id, request=body, dataset=str(dataset), name=request.name, kind=kind, queue=queue
        )
        try:
            assert self._celery is not None
            routing = {"queue": queue} if queue else {}  # else the task's route
            self._celery.send_task(JOB_TASKS[kind], args=[job_id], task_id=job_id, **routing)
        except Exception as exc:
            self._call(store.delete, job_id)
            raise JobsUnavailableError(f"could not queue the job: {exc}") from exc
        return record

    def list(self, *, offset: int = 0, limit: int = 50, kind: JobKind = "train") -> tuple[int, list[JobRecord]]:
        return self._call(self.store.list, offset=offset, limit=limit, kind=kind)

    def get(self, job_id: str) -> JobRecord | None:
        return self._call(self.store.get, job_id)

    def cancel(self, job_id: str) -> JobRecord | None:
        return self._call(self.store.request_cancel, job_id)

    def ping(self) -> bool:
        """For /readyz: True when the broker answers (False when none is configured)."""
        if self._probe is None:
            return False
        try:
            return bool(self._probe.ping())
        except RedisError:
            return False

    def close(self) -> None:
        if self._store is not None and self._probe is not None:
            self._store.redis.close()
            self._probe.close()


def build_job_client(settings: Settings) -> JobClient:
    """The job client the app keeps on `app.state.jobs`."""
    return JobClient(settings.broker_url, settings)
