"""A fine-tuning job end to end: a real pretraining job, then `POST /finetune-jobs` on its
checkpoint run by a real Celery worker, the classifier model it publishes (kind, validation
accuracy, never activated), and that model serving `POST /classifiers/{id}/predict`."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest
from _procs import wait_until
from jobstack import Stack, png

pytestmark = [pytest.mark.integration, pytest.mark.slow]


@pytest.fixture(scope="module")
def few_digits(job_datasets: Path) -> Path:
    """Ten labeled digits a class (a few-label set) with digits' own test split for validation."""
    path = job_datasets / "digits-few.npz"
    with np.load(job_datasets / "digits.npz") as data:
        pick = np.concatenate([np.flatnonzero(data["y_train"] == c)[:10] for c in range(10)])
        np.savez(
            path,
            x_train=data["x_train"][pick],
            y_train=data["y_train"][pick],
            x_test=data["x_test"],
            y_test=data["y_test"],
            classes=data["classes"],
        )
    return path


def test_finetune_job_publishes_a_classifier_that_predicts(stack: Stack, few_digits: Path) -> None:
    refused = stack.http.post("/finetune-jobs", json={"run": "no-such-run", "dataset": few_digits.name})
    assert (refused.status_code, refused.json()["error"]["code"]) == (409, "no_checkpoint")

    pretrain = stack.submit(activate=False)
    stack.wait_state(pretrain, "succeeded", 180)
    active_before = stack.registry.active()

    answer = stack.http.post(
        "/finetune-jobs", json={"run": pretrain, "dataset": few_digits.name, "epochs": 2, "batch_size": 32}
    )
    assert answer.status_code == 202, answer.text
    job_id = answer.json()["id"]
    done = stack.wait_state(job_id, "succeeded", 300)
    assert done["request"]["method"] == "finetune" and done["progress"]["total_steps"] == 2 * 4
    card = stack.registry.get(done["model_id"])
    assert card.kind == "classifier" and card.classes == [str(c) for c in range(10)]
    assert card.metrics["labels"] == 100 and card.metrics["val_images"] == 360
    assert 0.0 <= card.metrics["val_accuracy"] <= 1.0
    assert stack.registry.active() == active_before  # a classifier never becomes the encoder
    listed = {m["model_id"]: m["kind"] for m in stack.http.get("/models").json()["models"]}
    assert listed[done["model_id"]] == "classifier"

    made = stack.http.post(
        "/classifiers", json={"name": f"ft-{job_id}", "method": "finetune", "model_id": card.model_id}
    )
    assert made.status_code == 201, made.text
    assert made.json()["cv"]["accuracy"] == pytest.approx(card.metrics["val_accuracy"])
    with np.load(few_digits) as data:
        image = np.repeat(data["x_test"][0], 3, axis=-1)
    predicted = stack.http.post(
        f"/classifiers/{made.json()['id']}/predict", files=[("files", ("d.png", png(image), "image/png"))]
    )
    assert predicted.status_code == 200, predicted.text
    top = predicted.json()["predictions"][0]["top_k"]
    assert predicted.json()["model_id"] == card.model_id and len(top) == 3
    assert sum(t["probability"] for t in top) <= 1.0 + 1e-6 and top[0]["label"] in card.classes


def test_finetune_job_from_a_metadata_field_of_stored_items(stack: Stack, job_datasets: Path) -> None:
    """Labels as for classifiers: `label_key` over stored items' originals, resolved into the
    job's examples when queued; unknown ids are refused before anything is queued."""
    pretrain, _, ids, digits = stack.store_digits_under_a_new_model(
        job_datasets / "digits.npz", "ft", (3, 5, 8), 5, label_field="ft_digit"
    )
    unknown = stack.http.post(
        "/finetune-jobs",
        json={"run": pretrain, "examples": [{"item_id": ids[0], "label": 3}, {"item_id": "nope", "label": 5}]},
    )
    assert (unknown.status_code, unknown.json()["error"]["code"]) == (422, "unknown_items")
    assert "'nope'" in unknown.json()["error"]["message"]

    answer = stack.http.post("/finetune-jobs", json={"run": pretrain, "label_key": "ft_digit", "epochs": 2})
    assert answer.status_code == 202, answer.text
    done = stack.wait_state(answer.json()["id"], "succeeded", 300)
    assert done["request"]["label_key"] is None and len(done["request"]["examples"]) == len(ids)
    assert {(e["item_id"], e["label"]) for e in done["request"]["examples"]} == set(zip(ids, digits))
    card = stack.registry.get(done["model_id"])
    assert card.kind == "classifier" and card.classes == [3, 5, 8]
    assert card.metrics["labels"] == 12 and card.metrics["val_images"] == 3  # a stratified 20%


def test_killed_finetune_job_resumes_from_its_checkpoint(stack: Stack, few_digits: Path) -> None:
    pretrain = stack.submit(activate=False)
    stack.wait_state(pretrain, "succeeded", 180)
    answer = stack.http.post(
        "/finetune-jobs", json={"run": pretrain, "dataset": few_digits.name, "epochs": 40, "batch_size": 32}
    )
    assert answer.status_code == 202, answer.text
    job_id = answer.json()["id"]  # 40 epochs x 4 batches: 160 steps, a checkpoint every 20
    checkpoint = stack.run_dir(job_id) / "checkpoints" / "finetune.pt"
    wait_until(
        lambda: checkpoint.is_file() and (stack.job(job_id)["progress"] or {}).get("step", 0) >= 25,
        180,
        "a fine-tuning checkpoint",
    )
    (victim,) = stack.live_workers()
    stack.kill_worker(victim)  # SIGKILL: no ack, no clean-up, the lock is left to lapse
    killed_at = stack.job(job_id)["progress"]["step"]
    assert killed_at < 160

    stack.start_worker()  # re-sends the job once its lock lapses
    done = stack.wait_state(job_id, "succeeded", 300)
    assert done["attempts"] == 2 and done["progress"]["step"] == 160
    resumed = stack.registry.get(done["model_id"]).train_config["finetune"]["resumed_from_step"]
    assert resumed % 20 == 0 and 20 <= resumed <= killed_at  # went on from the checkpoint, not from 0
