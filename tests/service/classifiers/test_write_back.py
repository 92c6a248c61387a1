"""write_back() in process over the real stores: pages that split the collection, a kNN
classifier, other metadata kept, and a pinned fit that is gone. The job around it (Redis, a
Celery worker, filtered search) is tests/integration/test_write_back_job.py."""

from __future__ import annotations

from pathlib import Path

import pytest
from fastapi.testclient import TestClient

from service.classifiers.service import ClassifierNotFoundError
from service.classifiers.storage import ClassifierStore
from service.classifiers.write_back import FitGoneError, job_for, write_back
from service.items.reindex import open_backend
from tests.service.conftest import make_settings


def test_write_back_pages_equal_predictions_and_keep_other_metadata(
    client: TestClient, data_dir: Path, store_url: str | None, indexed: list[str], labeled
) -> None:
    examples = [{"item_id": i, "label": int(c)} for i, c in zip(indexed, labeled[1], strict=True)]
    made = client.post("/classifiers", json={"name": "knn3", "method": "knn", "examples": examples}).json()
    assert client.patch(f"/items/{indexed[0]}", json={"metadata": {"shelf": "a"}}).status_code == 200
    settings = make_settings(data_dir, store_url=store_url)
    backend = open_backend(settings)
    record = ClassifierStore(backend).get(made["id"])
    backend.close()
    assert record is not None
    job = job_for(record, record.fits[0], "pred", "pred_p")
    seen: list[dict] = []
    report = write_back(settings, job, on_progress=seen.append, page_size=7)  # 36 items: 6 pages

    assert (report.written, report.walked, report.skipped, report.stopped) == (36, 36, [], False)
    assert [p["step"] for p in seen] == [7, 14, 21, 28, 35, 36] and {p["total_steps"] for p in seen} == {36}
    items = {i["id"]: i["metadata"] for i in client.get("/items", params={"limit": 100}).json()["items"]}
    direct = client.post(f"/classifiers/{made['id']}/predict", json={"item_ids": indexed, "top_k": 1}).json()
    # Pages of 7 against one batch of 36: equal labels, probabilities up to BLAS's last bits.
    assert [p["input"] for p in direct["predictions"]] == indexed
    assert [p["label"] for p in direct["predictions"]] == [items[i]["pred"] for i in indexed]
    assert [p["probability"] for p in direct["predictions"]] == pytest.approx(
        [items[i]["pred_p"] for i in indexed], rel=1e-12
    )
    assert items[indexed[0]]["shelf"] == "a" and items[indexed[0]]["label"] == "china"  # merged, not replaced

    stopped = write_back(settings, job, should_stop=lambda: True)
    assert stopped.stopped and stopped.walked == 0

    with pytest.raises(FitGoneError, match="gone"):
        write_back(settings, job.model_copy(update={"fit_id": "no-such-fit"}))
    assert client.delete(f"/classifiers/{made['id']}").status_code == 204
    with pytest.raises(ClassifierNotFoundError, match="deleted"):
        write_back(settings, job)


def test_write_back_route_refuses_without_a_broker(client: TestClient, indexed: list[str]) -> None:
    made = client.post("/classifiers", json={"name": "lr3", "label_key": "label"}).json()
    answer = client.post(f"/classifiers/{made['id']}/write-back", json={"label_field": "pred"})
    assert (answer.status_code, answer.json()["error"]["code"]) == (503, "jobs_unavailable")
    same = client.post(
        f"/classifiers/{made['id']}/write-back", json={"label_field": "pred", "probability_field": "pred"}
    )
    assert same.status_code == 422
