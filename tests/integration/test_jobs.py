"""Jobs end to end over a real Redis, a real Celery worker subprocess and the API under uvicorn."""

from __future__ import annotations

import json

import numpy as np
import pytest
from _procs import wait_until
from jobstack import Api, Stack, png

from service.jobs import cli

pytestmark = [pytest.mark.integration, pytest.mark.slow]


def job_lifecycle_to_served_model(api: Api, digits: np.ndarray) -> None:
    """queued -> running with progress -> succeeded; published, activated, served by /embed.

    Shared by the test stack and by `simclr-embed up` (test_jobs_up.py).
    """
    job_id = api.submit(max_steps=5, activate=True)
    first = api.job(job_id)
    assert first["state"] in ("queued", "running")

    running = wait_until(
        lambda: (job := api.job(job_id))["state"] == "running" and (job["progress"] or {}).get("step", 0) > 0 and job,
        120,
        "progress with a step while the job runs",
        every_s=0.1,
    )
    progress = running["progress"]
    assert 0 < progress["step"] <= progress["total_steps"] == 5
    assert np.isfinite(progress["loss"]) and progress["loss"] > 0
    assert progress["lr"] is not None and progress["images_per_s"] > 0

    done = api.wait_state(job_id, "succeeded", 180)
    model_id = done["model_id"]
    assert model_id == f"job-{job_id}"
    assert done["error"] is None and done["started_at"] and done["finished_at"]
    assert done["progress"]["step"] == 5
    steps = [step for step, _ in done["loss_history"]]
    assert steps == sorted(steps) and steps[-1] == 5 and all(np.isfinite(v) for _, v in done["loss_history"])

    card = api.registry.get(model_id)
    assert api.registry.active() == model_id
    assert card.input_size == 16 and card.method == "simclr"

    image = np.repeat(digits[0], 3, axis=-1)  # [8, 8, 3] uint8, a real scan

    def served() -> dict | None:
        answer = api.http.post("/embed", files=[("files", ("d.png", png(image), "image/png"))])
        return answer.json() if answer.status_code == 200 and answer.json()["model_id"] == model_id else None

    embedded = wait_until(served, 30, f"/embed to serve {model_id}")
    vector = np.asarray(embedded["embeddings"][0])
    assert embedded["dim"] == card.embedding_dim == vector.shape[0]
    assert abs(np.linalg.norm(vector) - 1.0) < 1e-4


@pytest.fixture(scope="module")
def digits(job_datasets) -> np.ndarray:
    with np.load(job_datasets / "digits.npz") as data:
        return data["x_test"][:16]  # [16, 8, 8, 1] uint8


def test_job_runs_to_a_served_model(stack: Stack, digits: np.ndarray) -> None:
    job_lifecycle_to_served_model(stack, digits)


def test_cancel_stops_running_job_and_worker_takes_next(stack: Stack) -> None:
    long_id = stack.submit(max_steps=500, activate=False)
    next_id = stack.submit(max_steps=2, activate=False)
    wait_until(lambda: (stack.job(long_id)["progress"] or {}).get("step", 0) >= 2, 120, "the long job to train")
    assert stack.job(next_id)["state"] == "queued"  # one worker, prefetch one: it waits

    answer = stack.http.delete(f"/train-jobs/{long_id}")
    assert answer.status_code == 202 and answer.json()["cancel_requested"] is True
    cancelled = stack.wait_state(long_id, "cancelled", 10)
    assert cancelled["model_id"] is None and cancelled["finished_at"]
    assert cancelled["progress"]["step"] < 500
    assert (stack.run_dir(long_id) / "checkpoints" / "last.pt").is_file()

    stack.wait_state(next_id, "succeeded", 120)
    assert stack.registry.get(f"job-{next_id}").model_id == f"job-{next_id}"


def test_dataset_without_readable_images_fails_with_readable_error(stack: Stack) -> None:
    job_id = stack.submit(dataset="unreadable")
    failed = wait_until(lambda: (job := stack.job(job_id))["state"] == "failed" and job, 120, "the job to fail")
    assert failed["error"].startswith("no_readable_images:"), failed["error"]
    assert "unreadable" in failed["error"]
    assert failed["model_id"] is None


def test_cancel_of_queued_job_is_immediate(stack: Stack) -> None:
    blocker = stack.submit(max_steps=500, activate=False)
    wait_until(lambda: stack.job(blocker)["state"] == "running", 120, "the first job to run")
    queued = stack.submit(max_steps=2)
    answer = stack.http.delete(f"/train-jobs/{queued}")
    assert answer.status_code == 202 and answer.json()["state"] == "cancelled"
    stack.http.delete(f"/train-jobs/{blocker}")
    stack.wait_state(blocker, "cancelled", 10)
    # The worker then takes the cancelled job's message and drops it without training.
    broker = stack.redis.client()

    def taken() -> bool:  # the queued job's message (task id = job id) neither waits on the train queue
        # nor is in flight (kombu's unacked hash holds [message, exchange, routing key]); a SIGKILLed
        # worker of an earlier test may leave its own delivery there until the visibility timeout
        waiting = [json.loads(m) for m in broker.lrange("train", 0, -1)]
        in_flight = [json.loads(v)[0] for v in broker.hvals("unacked")]
        return all(m["headers"]["id"] != queued for m in waiting + in_flight)

    # The one worker may first finish an index-queue task (re-embedding the items that earlier tests
    # indexed, after an activation), so allow it that long.
    wait_until(taken, 180, "the worker to take the cancelled job's message")
    job = stack.job(queued)
    assert job["state"] == "cancelled" and job["attempts"] == 0 and job["started_at"] is None
    assert not stack.run_dir(queued).exists()


def test_jobs_cli_submits_shows_lists_and_cancels(stack: Stack, capsys: pytest.CaptureFixture[str]) -> None:
    def run(*argv: str) -> tuple[int, dict]:
        status = cli.main(["--api", stack.base_url, *argv])
        return status, json.loads(capsys.readouterr().out)

    status, created = run(
        "submit",
        "digits.npz",
        "--set",
        "max_steps=400",
        "--set",
        "image_size=16",
        "--set",
        "batch_size=16",
        "--set",
        "num_workers=0",
        "--no-activate",
        "--name",
        "from-cli",
    )
    assert status == 0 and created["state"] == "queued"
    status, shown = run("show", created["id"])
    assert status == 0 and shown["name"] == "from-cli" and shown["request"]["max_steps"] == 400
    assert shown["request"]["activate"] is False
    status, listed = run("list", "--limit", "1")
    assert status == 0 and [j["id"] for j in listed["items"]] == [created["id"]]
    status, cancelled = run("cancel", created["id"])
    assert status == 0 and cancelled["cancel_requested"] is True
    stack.wait_state(created["id"], "cancelled", 60)

    status, refused = run("submit", "digits.npz", "--set", "batch_size=1")
    assert status == 1 and refused["error"]["code"] == "invalid_request"
    assert cli.main(["list", "--api", "http://127.0.0.1:9"]) == 1  # options after the subcommand too
