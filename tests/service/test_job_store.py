"""The job store's state machine and owner lock on a real Redis (private redis-server)."""

from __future__ import annotations

import json
import time

import pytest
from _procs import RedisServer

from service.jobs.celery_app import INDEX_QUEUE, TRAIN_QUEUE, create_celery
from service.jobs.store import JobState, JobStore, connect
from trainer.worker import revive_orphans


@pytest.fixture
def store(private_redis: RedisServer) -> JobStore:
    private_redis.client().flushdb()
    return JobStore(connect(private_redis.url), lock_ttl_s=1.0, loss_history_max=5)


def new(store: JobStore, job_id: str = "j1") -> str:
    store.create(job_id, request={"epochs": 1}, dataset="/d", name=None)
    return job_id


def test_only_one_owner_until_the_lock_lapses(store: JobStore) -> None:
    job = new(store)
    assert store.acquire(job, "worker-a")
    assert not store.acquire(job, "worker-b")  # a second delivery while A runs
    assert store.renew(job, "worker-a") and not store.renew(job, "worker-b")
    store.release(job, "worker-b")  # not B's to release
    assert not store.acquire(job, "worker-b")
    time.sleep(1.2)  # A died: no heartbeat for a whole TTL
    assert store.acquire(job, "worker-b")
    assert not store.renew(job, "worker-a")  # A, if it wakes up, learns it lost the job
    store.release(job, "worker-b")
    assert store.acquire(job, "worker-c")


def test_renew_retakes_a_lapsed_lock_nobody_took(store: JobStore) -> None:
    job = new(store)
    assert store.acquire(job, "a")
    time.sleep(1.2)
    assert store.renew(job, "a") and not store.acquire(job, "b")


def test_transitions(store: JobStore) -> None:
    job = new(store)
    assert store.get(job).state is JobState.queued
    assert store.start(job) and store.get(job).state is JobState.running and store.get(job).attempts == 1
    assert store.start(job) and store.get(job).attempts == 2  # a redelivery resumes
    started = store.get(job).started_at
    assert store.requeue(job) and store.get(job).state is JobState.queued
    assert store.start(job) and store.get(job).started_at == started
    assert store.finish(job, JobState.succeeded, model_id="job-j1")
    assert not store.start(job) and not store.finish(job, JobState.failed, error="late")
    done = store.get(job)
    assert done.state is JobState.succeeded and done.model_id == "job-j1" and done.error is None
    assert done.finished_at >= done.started_at


def test_cancel_queued_is_immediate_running_is_flagged(store: JobStore) -> None:
    queued, running = new(store, "q"), new(store, "r")
    store.start(running)
    assert store.request_cancel(queued).state is JobState.cancelled
    flagged = store.request_cancel(running)
    assert flagged.state is JobState.running and flagged.cancel_requested and store.cancel_requested(running)
    assert not store.start(queued)  # its message arrives later: nothing runs
    assert store.request_cancel("missing") is None


def test_orphans_are_running_jobs_without_a_lock(store: JobStore) -> None:
    owned, orphan, waiting = new(store, "owned"), new(store, "orphan"), new(store, "waiting")
    for job in (owned, orphan):
        store.start(job)
    store.acquire(owned, "a")
    assert store.orphans() == [orphan]
    assert store.claim_revival(orphan) and not store.claim_revival(orphan)  # one re-send per TTL
    store.finish(orphan, JobState.failed, error="x")
    assert store.orphans() == [] and store.get(waiting).state is JobState.queued


def test_an_orphan_is_re_sent_to_the_queue_it_was_first_sent_to(store: JobStore, private_redis: RedisServer) -> None:
    # A write-back job is a training-kind record sent to the index queue; its re-send goes there too.
    store.create("wb", request={}, dataset="items", name=None, queue=INDEX_QUEUE)
    store.create("tr", request={}, dataset="/d", name=None)
    for job in ("wb", "tr"):
        store.start(job)
    assert sorted(revive_orphans(store, create_celery(private_redis.url))) == ["tr", "wb"]
    broker = private_redis.client()
    sent = {
        q: [json.loads(m)["headers"]["argsrepr"] for m in broker.lrange(q, 0, -1)] for q in (TRAIN_QUEUE, INDEX_QUEUE)
    }
    assert sent == {TRAIN_QUEUE: ["['tr']"], INDEX_QUEUE: ["['wb']"]}


def test_progress_and_capped_loss_history(store: JobStore) -> None:
    job = new(store)
    for step in range(1, 8):
        store.record_progress(
            job,
            {
                "epoch": 0,
                "step": step,
                "total_steps": 7,
                "loss": 1.0 / step,
                "lr": 0.1,
                "images_per_s": 10.0,
                "eta_s": 7.0 - step,
                "extra": "ignored",
            },
        )
    record = store.get(job)
    assert record.progress.step == 7 and record.progress.eta_s == 0.0
    assert record.loss_history == [(s, 1.0 / s) for s in range(3, 8)]  # the newest 5
    assert store.get(job, with_history=False).loss_history == []


def test_list_newest_first_and_delete(store: JobStore) -> None:
    for i in range(3):
        new(store, f"j{i}")
        time.sleep(0.01)
    total, page = store.list(offset=1, limit=5)
    assert total == 3 and [r.id for r in page] == ["j1", "j0"]
    store.delete("j1")
    assert store.get("j1") is None and store.list()[0] == 2
