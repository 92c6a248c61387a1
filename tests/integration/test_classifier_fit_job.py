"""A classifier fit too large for the request, end to end: a real pretraining job's model
serving digit items, `POST /classifiers` above `classifier_max_examples` (set low for this
stack) answered 202, the fit run by a real Celery worker over a real Redis; the classifier it
stores answers predictions equal to the synchronous path's fit (`fit_examples`, the one
function both run) of the same examples in the same order, on the vectors straight from
SQLite, and the stored weights give the API's probabilities in an independent float64 pass.
A job whose example was deleted while it queued ends `failed` with `unknown_items`."""

from __future__ import annotations

import shutil
from collections.abc import Iterator
from pathlib import Path

import numpy as np
import pytest
from jobstack import Stack
from test_write_back_job import reference_logreg, stored_fit, stored_vectors

from service.classifiers.service import fit_examples, predict

pytestmark = [pytest.mark.integration, pytest.mark.slow]

PER_CLASS = 6  # 60 items: one request (at most 64 images)
SYNC_MAX = 40  # below the 60 examples: they fit as a job


@pytest.fixture(scope="module")
def low_limit_stack(tmp_path_factory: pytest.TempPathFactory, digits_path: Path) -> Iterator[Stack]:
    """A stack of its own: its API fits at most SYNC_MAX examples in the request."""
    tmp = tmp_path_factory.mktemp("fitjob")
    (tmp / "data" / "datasets").mkdir(parents=True)
    shutil.copyfile(digits_path, tmp / "data" / "datasets" / "digits.npz")
    stack = Stack(tmp, env={"SIMCLR_EMBED_CLASSIFIER_MAX_EXAMPLES": str(SYNC_MAX)})
    try:
        stack.start_worker()
        yield stack
    finally:
        stack.close()


def test_a_fit_job_on_a_worker_stores_the_classifier_the_sync_fit_would(
    low_limit_stack: Stack, digits_path: Path
) -> None:
    stack = low_limit_stack
    _, model_id, ids, digits = stack.store_digits_under_a_new_model(digits_path, "fj", range(10), PER_CLASS)
    examples = [{"item_id": i, "label": d} for i, d in zip(ids, digits)]
    answer = stack.http.post("/classifiers", json={"name": "digits-job", "examples": examples})
    assert answer.status_code == 202, answer.text
    made = answer.json()
    assert made["examples"] == len(ids) > SYNC_MAX and made["name"] == "digits-job"
    space = made["model_id"]
    assert space.partition("@")[0] == model_id

    done = stack.wait_state(made["id"], "succeeded", 120)
    assert done["request"]["classifier_id"] == made["classifier_id"] and done["error"] is None
    assert done["progress"]["step"] == done["progress"]["total_steps"] == len(ids)
    got = stack.http.get(f"/classifiers/{made['classifier_id']}")
    assert got.status_code == 200, got.text
    classifier = got.json()
    assert classifier["model_id"] == space and classifier["examples"] == len(ids)

    # The synchronous path's fit of the same examples, in the same order, on the same vectors.
    vectors = stored_vectors(stack.data_dir, space, ids).astype(np.float32)  # [60, D], as stored
    sync_fit = fit_examples("logreg", vectors, digits, space)
    assert classifier["cv"]["fold_accuracies"] == pytest.approx(sync_fit.cv["fold_accuracies"], abs=1e-12)
    assert classifier["cv"]["confusion"] == sync_fit.cv["confusion"] and classifier["cv"]["C"] == sync_fit.cv["C"]
    expected = predict("logreg", sync_fit, vectors, 3)

    predicted = stack.http.post(f"/classifiers/{made['classifier_id']}/predict", json={"item_ids": ids, "top_k": 3})
    assert predicted.status_code == 200, predicted.text
    by_api = predicted.json()["predictions"]
    assert [p["label"] for p in by_api] == [e.label for e in expected]
    for p, e in zip(by_api, expected):
        assert [t["label"] for t in p["top_k"]] == [label for label, _ in e.top_k]
        assert [t["probability"] for t in p["top_k"]] == pytest.approx([q for _, q in e.top_k], rel=1e-6)

    params = stored_fit(stack.data_dir, classifier["fit_id"])
    proba = reference_logreg(vectors.astype(np.float64), params["weights"], params["bias"])
    assert [p["probability"] for p in by_api] == pytest.approx(proba.max(axis=1).tolist(), rel=1e-6)

    # A fit the worker cannot do is the job's failure: an example deleted while the job queued.
    for worker in stack.live_workers():
        stack.kill_worker(worker)
    queued = stack.http.post("/classifiers", json={"name": "digits-gone", "examples": examples})
    assert queued.status_code == 202, queued.text
    assert stack.http.delete(f"/items/{ids[0]}").status_code == 204
    stack.start_worker()
    failed = stack.wait_state(queued.json()["id"], "failed", 120)
    assert failed["error"].startswith("unknown_items: 1 item id(s)") and repr(ids[0]) in failed["error"]
    missing = stack.http.get(f"/classifiers/{queued.json()['classifier_id']}")
    assert missing.status_code == 404
