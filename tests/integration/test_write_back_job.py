"""A classifier's write-back end to end: a real pretraining job's model serving digit items,
a classifier fitted on a metadata field, `POST /classifiers/{id}/write-back` run by a real
Celery worker over a real Redis; the labels and probabilities it writes into the items'
metadata equal the API's predictions and an independent float64 computation from the stored
fit and vectors, and a filtered search on them returns only the predicted class."""

from __future__ import annotations

import io
import sqlite3
from collections import Counter
from pathlib import Path

import numpy as np
import pytest
from jobstack import Stack

pytestmark = [pytest.mark.integration, pytest.mark.slow]

PER_CLASS = 6  # 60 items: one request (at most 64 images)


def stored_fit(data_dir: Path, fit_id: str) -> dict[str, np.ndarray]:
    """The fit's parameters as the item store's classifier table holds them (an .npz blob)."""
    with sqlite3.connect(data_dir / "items" / "items.sqlite3") as db:
        (blob,) = db.execute("SELECT params FROM classifier_fits WHERE fit_id = ?", (fit_id,)).fetchone()
    with np.load(io.BytesIO(blob), allow_pickle=False) as npz:
        return {k: npz[k] for k in npz.files}


def stored_vectors(data_dir: Path, space: str, ids: list[str]) -> np.ndarray:
    """float64 [N, D]: the items' vectors under `space`, in `ids` order, straight from SQLite."""
    with sqlite3.connect(data_dir / "items" / "items.sqlite3") as db:
        rows = dict(
            db.execute(
                "SELECT i.id, v.vec FROM vectors v JOIN items i ON i.pk = v.item WHERE v.model_id = ?", (space,)
            ).fetchall()
        )
    return np.stack([np.frombuffer(rows[i], dtype=np.float32).astype(np.float64) for i in ids])


def reference_logreg(x: np.ndarray, weights: np.ndarray, bias: np.ndarray) -> np.ndarray:
    """softmax(unit(x) W + b) row by row in float64: [N, K]."""
    out = []
    for row in x:
        z = (row / np.sqrt(np.sum(row * row))) @ weights + bias
        e = np.exp(z - z.max())
        out.append(e / e.sum())
    return np.stack(out)


def test_write_back_labels_every_item_and_filtered_search_uses_them(empty_store: Stack, job_datasets: Path) -> None:
    stack = empty_store
    pretrain, model_id, ids, digits = stack.store_digits_under_a_new_model(
        job_datasets / "digits.npz", "wb", range(10), PER_CLASS, shelf="a"
    )
    made = stack.http.post("/classifiers", json={"name": f"digits-{pretrain}", "label_key": "digit"})
    assert made.status_code == 201, made.text
    classifier = made.json()
    space = classifier["model_id"]  # the vector space: the model, and its variant when not fp32
    assert space.partition("@")[0] == model_id and classifier["examples"] == len(ids)

    refused = stack.http.post(f"/classifiers/{classifier['id']}/write-back", json={"label_field": "digit"})
    assert (refused.status_code, refused.json()["error"]["code"]) == (422, "overwrites_labels")
    bad_field = stack.http.post(f"/classifiers/{classifier['id']}/write-back", json={"label_field": "has space"})
    assert bad_field.status_code == 422
    missing = stack.http.post("/classifiers/nope/write-back", json={"label_field": "predicted"})
    assert (missing.status_code, missing.json()["error"]["code"]) == (404, "classifier_not_found")

    answer = stack.http.post(f"/classifiers/{classifier['id']}/write-back", json={"label_field": "predicted"})
    assert answer.status_code == 202, answer.text
    job = answer.json()
    assert job["probability_field"] == "predicted_probability" and job["fit_id"] == classifier["fit_id"]
    assert answer.headers["location"] == job["url"] and job["url"].endswith(f"/train-jobs/{job['id']}")
    done = stack.wait_state(job["id"], "succeeded", 120)
    assert done["request"]["method"] == "write_back" and done["request"]["model_id"] == space
    assert done["model_id"] is None  # it publishes no model
    assert done["progress"]["step"] == done["progress"]["total_steps"] == len(ids)
    assert done["progress"]["warning"] is None

    page = stack.http.get("/items", params={"limit": 1000}).json()["items"]
    written = {i["id"]: i["metadata"] for i in page if i["id"] in set(ids)}
    assert sorted(written) == sorted(ids)
    assert all(m["shelf"] == "a" and m["digit"] == d for m, d in zip((written[i] for i in ids), digits))

    predicted = stack.http.post(f"/classifiers/{classifier['id']}/predict", json={"item_ids": ids, "top_k": 1})
    assert predicted.status_code == 200, predicted.text
    by_api = predicted.json()["predictions"]
    assert [p["input"] for p in by_api] == ids
    assert [p["label"] for p in by_api] == [written[i]["predicted"] for i in ids]
    assert [p["probability"] for p in by_api] == pytest.approx(
        [written[i]["predicted_probability"] for i in ids], rel=1e-12
    )

    params = stored_fit(stack.data_dir, classifier["fit_id"])
    proba = reference_logreg(stored_vectors(stack.data_dir, space, ids), params["weights"], params["bias"])
    classes = [c["label"] for c in classifier["classes"]]
    for item_id, row in zip(ids, proba):
        assert written[item_id]["predicted"] == classes[int(np.argmax(row))]
        assert written[item_id]["predicted_probability"] == pytest.approx(float(row.max()), rel=1e-9, abs=1e-12)

    counts = Counter(m["predicted"] for m in written.values())
    label, count = counts.most_common(1)[0]
    assert count < len(ids)  # the filter has something to leave out
    hits = stack.http.post(
        "/search", json={"item_id": ids[0], "k": len(ids), "filter": {"predicted": label, "shelf": "a"}}
    )
    assert hits.status_code == 200, hits.text
    found = hits.json()["results"]
    assert sorted(h["id"] for h in found) == sorted(i for i, m in written.items() if m["predicted"] == label)
    assert all(h["metadata"]["predicted"] == label for h in found)
