"""`POST /classifiers` above `classifier_max_examples`: checked in the request, queued as a job
on a real Redis (202), refused past `classifier_job_max_examples` (413); the job's fit, run
in-process here on the same data dir (tests/integration/test_classifier_fit_job.py runs it on a
real worker), equals the synchronous fit of the same examples."""

from __future__ import annotations

from collections.abc import Iterator
from pathlib import Path

import pytest
from fastapi.testclient import TestClient

from service.app import create_app
from service.classifiers.fit_job import run_fit_job
from service.classifiers.schemas import ClassifierFitJob
from tests._procs import RedisServer
from tests.service.classifiers.conftest import CLASSES, N_PER_CLASS, NAMES, index
from tests.service.conftest import MODEL_A, make_settings

SYNC_MAX, JOB_MAX = 10, 40  # the 36 indexed examples are a job; 41 are refused


@pytest.fixture
def redis(tmp_path: Path) -> Iterator[RedisServer]:
    server = RedisServer(tmp_path / "redis")
    server.start()
    try:
        yield server
    finally:
        server.stop()


def code(r) -> tuple[int, str]:
    return r.status_code, r.json()["error"]["code"]


def test_a_set_above_the_sync_limit_is_queued_as_a_job_whose_fit_equals_the_sync_fit(
    data_dir: Path, store_url: str | None, redis: RedisServer, labeled
) -> None:
    settings = make_settings(
        data_dir,
        store_url=store_url,
        broker_url=redis.url,
        classifier_max_examples=SYNC_MAX,
        classifier_job_max_examples=JOB_MAX,
    )
    with TestClient(create_app(settings), raise_server_exceptions=False) as client:
        ids = index(client, *labeled)
        two = [{"item_id": "c0", "label": "a"}, {"item_id": "c1", "label": "a"}]
        small = client.post("/classifiers", json={"name": "small", "examples": [*two, *two]})
        assert code(small) == (422, "one_class")  # the sync path checks as before

        # Checked up front, with the same answers as a synchronous fit.
        many = [{"item_id": i, "label": int(c)} for i, c in zip(ids, labeled[1], strict=True)]
        assert len(many) > SYNC_MAX
        unknown = client.post("/classifiers", json={"name": "u", "examples": [*many, {"item_id": "ghost", "label": 0}]})
        assert code(unknown) == (422, "unknown_items") and "'ghost'" in unknown.json()["error"]["message"]
        one = [{"item_id": i, "label": "same"} for i in ids]
        assert code(client.post("/classifiers", json={"name": "o", "examples": one})) == (422, "one_class")
        few = [*many[: 2 * N_PER_CLASS], {"item_id": ids[-1], "label": 99}]
        assert code(client.post("/classifiers", json={"name": "f", "examples": few})) == (422, "too_few_examples")
        bad = [*many[:-1], {"item_id": ids[-1], "label": 1.5}]
        assert code(client.post("/classifiers", json={"name": "b", "examples": bad})) == (422, "invalid_label")
        over = [{"item_id": f"x{i}", "label": i % 2} for i in range(JOB_MAX + 1)]
        refused = client.post("/classifiers", json={"name": "over", "examples": over})
        assert code(refused) == (413, "too_many_examples") and str(JOB_MAX) in refused.json()["error"]["message"]

        answer = client.post("/classifiers", json={"name": "cifar3", "label_key": "label"})
        assert answer.status_code == 202, answer.text
        made = answer.json()
        assert answer.headers["location"] == made["url"] and made["url"].endswith(f"/train-jobs/{made['id']}")
        assert (made["name"], made["method"], made["model_id"], made["examples"]) == ("cifar3", "logreg", MODEL_A, 36)
        record = client.get(made["url"]).json()
        assert record["state"] == "queued" and record["request"]["method"] == "fit_classifier"
        assert record["request"]["classifier_id"] == made["classifier_id"]
        assert [e["item_id"] for e in record["request"]["examples"]] == ids  # the order the folds depend on
        assert code(client.get(f"/classifiers/{made['classifier_id']}")) == (404, "classifier_not_found")

        # What the worker does, in-process: the classifier appears under the announced id.
        job = ClassifierFitJob.model_validate(record["request"])
        first = run_fit_job(settings, job)
        assert first.id == made["classifier_id"]
        assert run_fit_job(settings, job).fits[0].fit_id == first.fits[0].fit_id  # a redelivery fits nothing again
        fitted = client.get(f"/classifiers/{made['classifier_id']}")
        assert fitted.status_code == 200, fitted.text
        by_job = fitted.json()
        assert by_job["examples"] == 36 and by_job["model_id"] == MODEL_A
        assert by_job["classes"] == [{"label": NAMES[c], "count": N_PER_CLASS} for c in CLASSES]
        taken = client.post("/classifiers", json={"name": "cifar3", "examples": many})
        assert code(taken) == (409, "classifier_exists")  # checked before queueing

    # The same examples fitted synchronously (a higher limit, no broker).
    with TestClient(create_app(make_settings(data_dir, store_url=store_url)), raise_server_exceptions=False) as client:
        sync = client.post("/classifiers", json={"name": "cifar3-sync", "label_key": "label"})
        assert sync.status_code == 201, sync.text
        by_sync = sync.json()
        assert by_job["cv"] == by_sync["cv"] and by_job["classes"] == by_sync["classes"]
        query = {"item_ids": ids, "top_k": 3}
        a = client.post(f"/classifiers/{by_job['id']}/predict", json=query).json()["predictions"]
        b = client.post(f"/classifiers/{by_sync['id']}/predict", json=query).json()["predictions"]
        assert [p["top_k"] for p in a] == [p["top_k"] for p in b]

    # No broker: a set above the limit is 503, not a 500 or a silent synchronous fit.
    low = make_settings(data_dir, store_url=store_url, classifier_max_examples=SYNC_MAX)
    with TestClient(create_app(low), raise_server_exceptions=False) as client:
        nobroker = client.post("/classifiers", json={"name": "nb", "label_key": "label"})
        assert code(nobroker) == (503, "jobs_unavailable")
