"""The Celery app, importable without torch: the API sends tasks by name, workers register them.

Delivery guarantees (Redis broker, kombu's ack emulation):

* ``task_acks_late``: a task is acknowledged when it returns, so a worker that dies mid-job
  leaves the message unacknowledged; Redis hands it to another worker once the visibility
  timeout has passed since delivery (kombu restores unacked messages older than it).
* ``task_reject_on_worker_lost``: a pool child killed under the worker is requeued at once
  rather than acknowledged as failed.
* ``worker_prefetch_multiplier=1``: a worker reserves one job at a time, so a queued job
  is not stuck behind a long run on a busy worker.
* ``visibility_timeout``: a delivery older than this is redelivered *even while it still
  runs* (celery #5935, #6229). Jobs therefore carry an owner lock (service.jobs.store) and
  resume from their checkpoint; workers also re-send running jobs whose lock lapsed
  (trainer.worker), so recovery does not wait for the visibility timeout.
"""

from __future__ import annotations

from celery import Celery

from service.settings import Settings, env_settings

TRAIN_TASK = "trainer.tasks.train_job"
INDEX_TASK = "trainer.tasks.reindex"
INDEX_JOB_TASK = "trainer.tasks.index_job"
JOB_TASKS = {"train": TRAIN_TASK, "index": INDEX_JOB_TASK}  # the task that runs a job of each kind
TRAIN_QUEUE = "train"
INDEX_QUEUE = "index"


def create_celery(broker_url: str | None, settings: Settings | None = None) -> Celery:
    """A Celery app on `broker_url` (Redis, also the result backend); tasks live in trainer.tasks."""
    settings = settings or env_settings()
    app = Celery("simclr_embed", broker=broker_url, backend=broker_url, include=["trainer.tasks"])
    app.conf.update(
        task_routes={
            TRAIN_TASK: {"queue": TRAIN_QUEUE},
            INDEX_TASK: {"queue": INDEX_QUEUE},
            INDEX_JOB_TASK: {"queue": INDEX_QUEUE},
        },
        task_default_queue=TRAIN_QUEUE,
        task_acks_late=True,
        task_reject_on_worker_lost=True,
        task_track_started=True,
        worker_prefetch_multiplier=1,
        worker_cancel_long_running_tasks_on_connection_loss=False,
        broker_transport_options={"visibility_timeout": settings.broker_visibility_timeout_s},
        result_backend_transport_options={"visibility_timeout": settings.broker_visibility_timeout_s},
        broker_connection_retry_on_startup=True,
        broker_connection_max_retries=None,
        result_expires=7 * 24 * 3600,
        task_serializer="json",
        result_serializer="json",
        accept_content=["json"],
        task_publish_retry_policy={"max_retries": 3, "interval_start": 0.2, "interval_step": 0.5, "interval_max": 2},
        worker_hijack_root_logger=False,
        worker_redirect_stdouts_level="INFO",  # a training progress line is not a warning
    )
    return app


# `celery -A service.jobs.celery_app worker` and the worker CLI use this one, configured from the env.
app = create_celery(env_settings().broker_url)
