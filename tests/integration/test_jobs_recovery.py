"""Jobs survive a worker killed with SIGKILL and a broker restart (real processes throughout)."""

from __future__ import annotations

import json
import re
import time

import pytest
from _procs import wait_until
from jobstack import Stack

from service.jobs.celery_app import TRAIN_TASK, create_celery

pytestmark = [pytest.mark.integration, pytest.mark.slow]


def test_killed_worker_job_resumes_from_checkpoint_and_publishes_once(stack: Stack) -> None:
    before = {card.model_id for card in stack.registry.list()}
    job_id = stack.submit(max_steps=7, checkpoint_every_steps=2)
    checkpoint = stack.run_dir(job_id) / "checkpoints" / "last.pt"
    wait_until(lambda: checkpoint.is_file() and stack.job(job_id)["progress"]["step"] >= 3, 180, "a checkpoint")
    (victim,) = stack.live_workers()
    stack.kill_worker(victim)  # SIGKILL: no ack, no clean-up, the lock is left to lapse
    killed_at = stack.job(job_id)
    assert killed_at["state"] == "running" and killed_at["progress"]["step"] < 7

    worker = stack.start_worker()  # re-sends the job once its lock lapses (its message waits, unacknowledged)
    done = stack.wait_state(job_id, "succeeded", 240)
    assert done["attempts"] == 2
    # What Redis does once the visibility timeout passes: the killed delivery, once more.
    late = create_celery(stack.redis.url).send_task(TRAIN_TASK, args=[job_id])
    wait_until(lambda: f"train_job[{late.id}] succeeded" in stack.worker_log(worker), 60, "the late delivery to run")
    again = stack.job(job_id)
    assert again["state"] == "succeeded" and again["attempts"] == 2 and again["finished_at"] == done["finished_at"]
    assert re.search(rf"train_job\[{late.id}\] succeeded in [0-9.]+s: 'already succeeded'", stack.worker_log(worker))
    assert done["progress"]["step"] == 7

    events = [json.loads(line) for line in (stack.run_dir(job_id) / "metrics.jsonl").read_text().splitlines()]
    resumes = [e for e in events if e.get("event") == "resume"]
    assert len(resumes) == 1 and resumes[0]["step"] >= 2, resumes
    after_resume = events[events.index(resumes[0]) + 1 :]
    steps = [e["step"] for e in after_resume if "loss" in e]
    assert steps[0] == resumes[0]["step"] + 1 and steps[-1] == 7  # went on from the checkpoint, not from 0

    published = {card.model_id for card in stack.registry.list()} - before
    assert published == {f"job-{job_id}"}
    assert not any((stack.registry.root / ".staging").glob("*"))


def test_job_finishes_through_a_broker_restart(stack: Stack) -> None:
    job_id = stack.submit(max_steps=6, checkpoint_every_steps=3)
    wait_until(lambda: (stack.job(job_id)["progress"] or {}).get("step", 0) >= 2, 180, "the job to train")
    stack.redis.stop()  # SIGTERM: the append-only file keeps the queue, the job record and the lock
    time.sleep(2.0)
    stack.redis.start()

    done = stack.wait_state(job_id, "succeeded", 240)
    assert done["model_id"] == f"job-{job_id}" and done["attempts"] == 1 and done["error"] is None
    assert done["progress"]["step"] == 6
    assert stack.registry.get(done["model_id"]).model_id == done["model_id"]
    assert len(stack.live_workers()) == 1  # the worker rode it out rather than dying


def test_worker_shutdown_hands_the_job_back_and_the_next_worker_resumes(stack: Stack) -> None:
    job_id = stack.submit(max_steps=6, checkpoint_every_steps=3)
    wait_until(lambda: (stack.job(job_id)["progress"] or {}).get("step", 0) >= 1, 180, "the job to train")
    (worker,) = stack.live_workers()
    worker.terminate()  # SIGTERM: Celery's warm shutdown; the run stops at its next step
    assert worker.wait(60) == 0
    handed_back = stack.job(job_id)
    assert handed_back["state"] == "queued" and handed_back["error"] is None
    assert 1 <= handed_back["progress"]["step"] < 6
    assert (stack.run_dir(job_id) / "checkpoints" / "last.pt").is_file()

    stack.start_worker()
    done = stack.wait_state(job_id, "succeeded", 240)
    assert done["attempts"] == 2 and done["progress"]["step"] == 6
    events = [json.loads(line) for line in (stack.run_dir(job_id) / "metrics.jsonl").read_text().splitlines()]
    assert [e["step"] for e in events if e.get("event") == "resume"] == [handed_back["progress"]["step"]]
