"""Celery tasks: `train_job` runs a train-kind job record: a pretraining or fine-tuning job
(queue `train`), or a classifier's write-back of predictions into the items' metadata or a
classifier fit too large for the request (both sent to queue `index`, so they do not wait
behind training); `index_job` (queue `index`) a bulk indexing
job; `reindex` (queue `index`) re-embeds the items under a newly activated model.

A job may be delivered more than once (a worker died; Redis's visibility timeout ran out
while it still trained; a sweeper re-sent an orphan). Every delivery is safe:

* a finished job returns at once;
* only the holder of the job's owner lock runs it, renewing it with a heartbeat; a delivery
  that finds the lock held ends without touching the job;
* training resumes from `<jobs_dir>/<job_id>/checkpoints/last.pt`;
* the model id is derived from the job id, so the export runs only while that id is not yet
  in the registry: a redelivery after publishing never publishes twice;
* an indexing job commits each batch in one store transaction and skips ids stored with
  the same bytes, so a redelivery adds what is missing and never stores an image twice.
"""

from __future__ import annotations

import functools
import logging
import os
import socket
import threading
import time
import uuid
from collections.abc import Callable
from pathlib import Path
from typing import Any, TypeVar

from celery import signals
from celery.exceptions import Reject
from redis.exceptions import RedisError

from service.classifiers.fit_job import run_fit_job
from service.classifiers.schemas import ClassifierFitJob, WriteBackJob
from service.classifiers.service import ClassifierError
from service.classifiers.write_back import write_back
from service.contract.finetune_config import FinetuneJobRequest
from service.contract.index_config import IndexJobRequest
from service.contract.registry import ModelNotFoundError, ModelRegistry
from service.contract.train_config import TrainConfig, TrainJobRequest
from service.items.bulk import BulkIndexError, IndexReport, index_dataset
from service.items.reindex import reembed_all, space_of
from service.jobs.celery_app import INDEX_JOB_TASK, INDEX_TASK, TRAIN_TASK, app
from service.jobs.store import TERMINAL, IndexCounts, JobRecord, JobState, JobStore, model_id_for
from service.settings import Settings
from service.shutdown import StopFlag
from trainer.data import DatasetError
from trainer.engine import train
from trainer.export import export_run
from trainer.finetune import FINETUNE_CHECKPOINT, LabeledSplit, NoCheckpointError, finetune_run, items_split

log = logging.getLogger(__name__)
T = TypeVar("T")

# Set when this worker begins a warm shutdown (SIGTERM, Ctrl-C): the running job checkpoints
# and goes back to the queue instead of holding the worker open until it ends.
# Set from Celery's signal handler, so it must take no lock (service/shutdown.py).
_shutting_down = StopFlag()


@signals.worker_shutting_down.connect
def _on_worker_shutdown(**_: Any) -> None:
    _shutting_down.set()


def _persist(fn: Callable[..., T], *args: Any, patience_s: float = 120.0, **kwargs: Any) -> T:
    """Retry a state write through a broker restart: a finished job must not look unfinished."""
    deadline = time.monotonic() + patience_s
    while True:
        try:
            return fn(*args, **kwargs)
        except RedisError:
            if time.monotonic() > deadline:
                raise
            log.warning("broker unavailable; retrying %s", getattr(fn, "__name__", fn))
            time.sleep(1.0)


class JobControl:
    """The run's callbacks: progress into the store, stop on cancel, lost lock or shutdown.

    Picklable (it holds a URL, not a connection), as `train()` needs when it spawns ranks.
    Broker errors never stop a run: progress is then dropped and the run goes on.
    """

    def __init__(self, broker_url: str, job_id: str, token: str, check_every_s: float = 0.5) -> None:
        self.broker_url, self.job_id, self.token, self.check_every_s = broker_url, job_id, token, check_every_s
        self._store: JobStore | None = None
        self._checked_at = 0.0

    def __getstate__(self) -> dict[str, Any]:
        return {**self.__dict__, "_store": None}

    @property
    def store(self) -> JobStore:
        if self._store is None:
            self._store = JobStore.from_url(self.broker_url)
        return self._store

    def progress(self, info: dict[str, Any]) -> None:
        try:
            self.store.record_progress(self.job_id, info)
        except RedisError as exc:
            log.warning("job %s: progress not recorded (%s)", self.job_id, exc)

    def should_stop(self) -> bool:
        if _shutting_down.is_set():
            return True
        now = time.monotonic()
        if now - self._checked_at < self.check_every_s:
            return False
        self._checked_at = now
        try:
            return self.store.cancel_requested(self.job_id) or not self.store.renew(self.job_id, self.token)
        except RedisError:
            return False


class _Heartbeat(threading.Thread):
    """Renews the owner lock while the job runs (data loading and export included)."""

    def __init__(self, store: JobStore, job_id: str, token: str, every_s: float) -> None:
        super().__init__(name=f"heartbeat-{job_id}", daemon=True)
        self.store, self.job_id, self.token, self.every_s = store, job_id, token, every_s
        self.lost = threading.Event()
        self._done = threading.Event()

    def run(self) -> None:
        while not self._done.wait(self.every_s):
            try:
                if not self.store.renew(self.job_id, self.token):
                    self.lost.set()
                    return
            except RedisError as exc:
                log.warning("job %s: heartbeat failed (%s); retrying", self.job_id, exc)

    def stop(self) -> None:
        self._done.set()
        self.join(timeout=5)


def _published(registry: ModelRegistry, model_id: str) -> bool:
    try:
        registry.get(model_id)
    except ModelNotFoundError:
        return False
    return True


JobBody = Callable[[Settings, JobStore, JobRecord, str, "_Heartbeat"], str]


def _run_owned(job_id: str, body: JobBody) -> str:
    """Run (or resume) job `job_id` with `body` as the holder of its owner lock; returns the
    state it left the job in, for the worker log."""
    settings = Settings()
    store = JobStore.from_url(str(settings.broker_url), settings)
    record = _persist(store.get, job_id, with_history=False)
    if record is None:
        log.warning("job %s: no record; dropping the message", job_id)
        return "missing"
    if record.state in TERMINAL:
        return f"already {record.state.value}"
    token = f"{socket.gethostname()}:{os.getpid()}:{uuid.uuid4().hex[:8]}"
    if not _persist(store.acquire, job_id, token):
        log.info("job %s: another worker holds it; this delivery ends", job_id)
        return "held-elsewhere"
    heartbeat = _Heartbeat(store, job_id, token, settings.heartbeat_s)
    heartbeat.start()
    try:
        if _persist(store.cancel_requested, job_id):
            _persist(store.finish, job_id, JobState.cancelled)
            return JobState.cancelled.value
        if not _persist(store.start, job_id):
            return "finished-elsewhere"
        record = _persist(store.get, job_id, with_history=False)
        assert record is not None
        try:
            return body(settings, store, record, token, heartbeat)
        except Reject:  # handing the job back on shutdown is not a failure
            raise
        except Exception as exc:  # a job's failure is the job's state, never a crashed worker
            return _failed(store, job_id, _failure(job_id, exc))
    finally:
        heartbeat.stop()
        try:
            store.release(job_id, token)
        except RedisError:
            log.warning("job %s: lock not released; it lapses after its TTL", job_id)


@app.task(name=TRAIN_TASK, ignore_result=True)
def train_job(job_id: str) -> str:
    """Run (or resume) pretraining or fine-tuning job `job_id`."""
    return _run_owned(job_id, _run_training)


@app.task(name=INDEX_JOB_TASK, ignore_result=True)
def index_job(job_id: str) -> str:
    """Run (or resume) bulk indexing job `job_id`."""
    return _run_owned(job_id, _run_index)


def _run_training(settings: Settings, store: JobStore, record: JobRecord, token: str, heartbeat: _Heartbeat) -> str:
    job_id = record.id
    if record.request.get("method") == "finetune":
        return _run_finetune(settings, store, job_id, token, record, heartbeat)
    if record.request.get("method") == "write_back":
        return _run_write_back(settings, store, job_id, token, record, heartbeat)
    if record.request.get("method") == "fit_classifier":
        return _run_fit_classifier(store, job_id, record, settings)
    request = TrainJobRequest.model_validate(record.request)
    cfg = TrainConfig.model_validate(request.model_dump(exclude={"dataset", "activate", "name"}))
    registry = ModelRegistry(settings.models_dir)
    model_id = model_id_for(job_id)
    if not _published(registry, model_id):
        control = JobControl(str(settings.broker_url), job_id, token)
        result = train(
            cfg,
            record.dataset,
            settings.jobs_dir / job_id,
            resume=True,
            on_progress=control.progress,
            should_stop=control.should_stop,
        )
        if result.stopped:
            return _stopped(store, job_id, heartbeat)
        export_run(settings.jobs_dir / job_id, registry, activate=False, model_id=model_id)
    if request.activate:
        registry.activate(model_id)
        app.send_task(INDEX_TASK, args=[model_id])
    _persist(store.finish, job_id, JobState.succeeded, model_id=model_id)
    return JobState.succeeded.value


SHOWN_IDS = 100  # failed and vanished ids kept in a job's progress


def _index_progress(report: IndexReport, elapsed_s: float) -> dict[str, Any]:
    """A bulk indexing run's tallies as job progress: `step` counts images, of `total_steps`."""
    rate = report.processed / elapsed_s if elapsed_s > 0 and report.processed else None
    counts = IndexCounts(
        added=report.added,
        replaced=report.replaced,
        skipped=report.skipped,
        failed=len(report.failed),
        failed_ids=report.failed[:SHOWN_IDS],
        vanished=len(report.vanished),
        vanished_ids=report.vanished[:SHOWN_IDS],
        deleted=report.deleted,
    )
    warning = f"{len(report.failed)} image(s) could not be read or decoded" if report.failed else None
    return {
        "step": report.processed,
        "total_steps": report.total,
        "images_per_s": rate,
        "eta_s": (report.total - report.processed) / rate if rate else None,
        "index": counts,
        "warning": warning,
    }


def _run_index(settings: Settings, store: JobStore, record: JobRecord, token: str, heartbeat: _Heartbeat) -> str:
    """A bulk indexing job (service.items.bulk, as `simclr-embed index`). It keeps no checkpoint:
    every batch is one store transaction, so a redelivered job runs again, skipping the images
    already stored with the same bytes."""
    request = IndexJobRequest.model_validate(record.request)
    control = JobControl(str(settings.broker_url), record.id, token)
    started = time.monotonic()
    report = index_dataset(
        settings,
        Path(record.dataset),
        folders_as=request.folders_as,
        sidecar=Path(request.metadata) if request.metadata else None,
        split=request.split,
        ids=request.ids,
        id_prefix=request.id_prefix,
        delete_missing=request.delete_missing,
        batch_size=request.batch_size,
        on_progress=lambda report: control.progress(_index_progress(report, time.monotonic() - started)),
        should_stop=control.should_stop,
    )
    control.progress(_index_progress(report, time.monotonic() - started))
    if report.stopped:
        return _stopped(store, record.id, heartbeat)
    _persist(store.finish, record.id, JobState.succeeded, model_id=report.space)
    return JobState.succeeded.value


def _failure(job_id: str, exc: Exception) -> str:
    """The error a failed job shows: `code: message` for the errors a user can act on (a bad
    dataset, a missing checkpoint, a classifier that cannot be fitted), else the exception,
    logged with its traceback."""
    if isinstance(exc, DatasetError | ClassifierError | NoCheckpointError):
        return f"{exc.code}: {exc}"
    if isinstance(exc, BulkIndexError):
        return f"bulk_index_error: {exc}"
    log.exception("job %s failed", job_id)
    return f"{type(exc).__name__}: {exc}"


def _failed(store: JobStore, job_id: str, error: str) -> str:
    """Record a job's failure as its state (never a crashed worker) and return that state."""
    _persist(store.finish, job_id, JobState.failed, error=error)
    return JobState.failed.value


def _run_finetune(
    settings: Settings, store: JobStore, job_id: str, token: str, record: JobRecord, heartbeat: _Heartbeat
) -> str:
    """A fine-tuning job (trainer/finetune.py): checkpoints to `<jobs_dir>/<job_id>/checkpoints/
    finetune.pt` (not `last.pt`: a fine-tuning job is no pretraining run to fine-tune from), so
    a redelivered or requeued one resumes. Publishes a classifier model, never activates it."""
    request = FinetuneJobRequest.model_validate(record.request)
    registry = ModelRegistry(settings.models_dir)
    model_id = model_id_for(job_id)
    if not _published(registry, model_id):
        control = JobControl(str(settings.broker_url), job_id, token)
        data: Path | str | Callable[[int, int], LabeledSplit] = record.dataset
        if request.examples is not None:
            pairs = [(e.item_id, e.label) for e in request.examples]
            data = functools.partial(items_split, settings, pairs)
        card = finetune_run(
            settings.jobs_dir / request.run,
            data,
            registry,
            model_id=model_id,
            epochs=request.epochs,
            batch_size=request.batch_size,
            seed=request.seed,
            should_stop=control.should_stop,
            on_progress=control.progress,
            checkpoint=settings.jobs_dir / job_id / FINETUNE_CHECKPOINT,
        )
        if card is None:  # cancelled, or the worker is shutting down (requeued: it resumes)
            return _stopped(store, job_id, heartbeat)
    _persist(store.finish, job_id, JobState.succeeded, model_id=model_id)
    return JobState.succeeded.value


def _run_write_back(
    settings: Settings, store: JobStore, job_id: str, token: str, record: JobRecord, heartbeat: _Heartbeat
) -> str:
    """A classifier's write-back (service/classifiers/write_back.py): idempotent, so a
    redelivered one starts over; it publishes nothing."""
    job = WriteBackJob.model_validate(record.request)
    control = JobControl(str(settings.broker_url), job_id, token)
    report = write_back(settings, job, should_stop=control.should_stop, on_progress=control.progress)
    if report.stopped:
        return _stopped(store, job_id, heartbeat)
    control.progress(report.progress())  # the final count, also for an empty store
    _persist(store.finish, job_id, JobState.succeeded)
    return JobState.succeeded.value


def _run_fit_classifier(store: JobStore, job_id: str, record: JobRecord, settings: Settings) -> str:
    """A classifier fit too large for the request (service/classifiers/fit_job.py): the
    classifier's id is in the job's request; a redelivered job finds it stored and succeeds."""
    made = run_fit_job(settings, ClassifierFitJob.model_validate(record.request))
    examples = int(made.fits[0].cv["examples"])
    _persist(store.record_progress, job_id, {"step": examples, "total_steps": examples})
    _persist(store.finish, job_id, JobState.succeeded)
    return JobState.succeeded.value


def _stopped(store: JobStore, job_id: str, heartbeat: _Heartbeat) -> str:
    """The run checkpointed and returned early: say why in the job's state."""
    if _persist(store.cancel_requested, job_id):
        _persist(store.finish, job_id, JobState.cancelled)
        return JobState.cancelled.value
    if heartbeat.lost.is_set() or not _persist(store.renew, job_id, heartbeat.token):
        log.warning("job %s: another worker took it over; leaving it to that worker", job_id)
        return "taken-over"
    # Worker shutdown: hand the job back; the next worker resumes it from the checkpoint.
    _persist(store.requeue, job_id)
    raise Reject("worker shutting down; job requeued", requeue=True)


@app.task(name=INDEX_TASK, ignore_result=True)
def reindex(model_id: str) -> int:
    """Re-embed the stored items lacking a `model_id` vector; stops early (resumable) on shutdown."""
    settings = Settings()
    registry = ModelRegistry(settings.models_dir)
    return reembed_all(settings, registry, space_of(settings, registry, model_id), should_stop=_shutting_down.is_set)
