"""`simclr-embed worker`: a Celery worker for the `train` and `index` queues.

CUDA and fork (celery #3402, #6036): a CUDA context does not survive fork(), so CUDA must be
first touched in the process that trains. With one process (the default, and what a GPU
worker should run: one worker process per machine, DDP inside the job over every GPU it
sees) the worker uses Celery's `solo` pool: the task runs in the worker's main process,
which nothing forks afterwards, and `train()` spawns (never forks) its DDP ranks. With
`--concurrency N > 1` (CPU hosts) it uses `prefork` with one task per child: the parent
imports torch but never touches CUDA, and each job gets a freshly forked child.

The worker also re-sends orphans: running jobs (training or indexing) whose owner lock
lapsed because their worker died. With Redis, their unacknowledged message would otherwise wait for the broker's
visibility timeout (an hour by default) before another worker resumes them.
"""

from __future__ import annotations

import argparse
import logging
import os
import threading
from typing import Any

from celery import Celery, signals
from redis.exceptions import RedisError

from service.jobs.celery_app import INDEX_QUEUE, JOB_TASKS, TRAIN_QUEUE, app
from service.jobs.store import JobStore
from service.settings import env_settings

log = logging.getLogger(__name__)


def revive_orphans(store: JobStore, celery: Celery = app) -> list[str]:
    """Re-send every running job whose owner is gone, to the task of its kind (training or
    indexing) on the queue it was first sent to; one re-send per lock TTL across workers."""
    revived = [job_id for job_id in store.orphans() if store.claim_revival(job_id)]
    for job_id in revived:
        log.warning("job %s: its worker stopped renewing the lock; re-sending it", job_id)
        queue = store.queue(job_id)
        celery.send_task(JOB_TASKS[store.kind(job_id)], args=[job_id], **({"queue": queue} if queue else {}))
    return revived


def _watch_orphans(stop: threading.Event) -> None:
    settings = env_settings()
    store = JobStore.from_url(str(settings.broker_url), settings)
    while not stop.wait(settings.job_lock_ttl_s / 2):
        try:
            revive_orphans(store)
        except RedisError as exc:
            log.warning("orphan check skipped: %s", exc)


def _parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="simclr-embed worker", description=__doc__.split("\n\n")[0])
    parser.add_argument("--queues", default=f"{TRAIN_QUEUE},{INDEX_QUEUE}", help="comma-separated queues to consume")
    parser.add_argument("--concurrency", type=int, default=None, help="worker processes (default 1: solo pool)")
    parser.add_argument("--loglevel", default="INFO")
    parser.add_argument("--hostname", default=None, help="Celery node name (default simclr-<pid>@<host>)")
    return parser


def celery_argv(queues: str, concurrency: int, loglevel: str, hostname: str) -> list[str]:
    """The `celery worker` arguments for this arrangement (see the module docstring)."""
    argv = [
        "worker",
        "--queues",
        queues,
        "--loglevel",
        loglevel,
        "--hostname",
        hostname,
        "--without-gossip",
        "--without-mingle",
    ]
    if concurrency == 1:
        return [*argv, "--pool", "solo"]
    return [*argv, "--pool", "prefork", "--concurrency", str(concurrency), "--max-tasks-per-child", "1"]


def main(argv: list[str] | None = None) -> int:
    args = _parser().parse_args(argv)
    if not env_settings().broker_url:
        print("simclr-embed worker: set SIMCLR_EMBED_BROKER_URL (or use `simclr-embed up`)", flush=True)
        return 2
    import trainer.tasks  # noqa: F401  registers the tasks on `app`

    concurrency = args.concurrency or env_settings().worker_concurrency
    stop = threading.Event()
    if {TRAIN_QUEUE, INDEX_QUEUE} & set(args.queues.split(",")):

        @signals.worker_ready.connect(weak=False)
        def _start_watch(**_: Any) -> None:
            threading.Thread(target=_watch_orphans, args=(stop,), name="orphan-watch", daemon=True).start()

    hostname = args.hostname or f"simclr-{os.getpid()}@%h"
    try:
        app.worker_main(celery_argv(args.queues, concurrency, args.loglevel, hostname))
    finally:
        stop.set()
    return 0
