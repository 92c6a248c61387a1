"""`/index-jobs` against a real Redis (private redis-server) through the ASGI app: validation,
dataset and metadata confinement, the message on the `index` queue, listing apart from
training jobs, cancelling. No worker runs here: tests/integration/test_index_jobs.py drives
jobs to the end."""

from __future__ import annotations

import json
from collections.abc import Iterator
from pathlib import Path

import httpx
import pytest
from _procs import RedisServer
from fastapi.testclient import TestClient

from service.contract.registry import ModelRegistry
from service.settings import Settings
from tests.service.test_jobs_api import make_client


@pytest.fixture
def roots(tmp_path: Path) -> Path:
    """<tmp>/datasets (the root): a folder, an .npz, sidecars, and a sidecar outside."""
    root = tmp_path / "datasets"
    (root / "photos").mkdir(parents=True)
    (root / "small.npz").write_bytes(b"only the path is checked up front")
    (root / "meta.csv").write_text("path,shop\na.png,1\n")
    (root / "meta.txt").write_text("path shop\n")
    (tmp_path / "outside.jsonl").write_text('{"path": "a.png"}\n')
    return root


@pytest.fixture
def api(data_dir: Path, roots: Path, private_redis: RedisServer) -> Iterator[TestClient]:
    private_redis.client().flushdb()
    settings = Settings(data_dir=data_dir, dataset_roots=[str(roots)], broker_url=private_redis.url)
    yield make_client(settings)


def error(answer: httpx.Response) -> tuple[int, str]:
    return answer.status_code, answer.json()["error"]["code"]


def test_submit_queues_an_index_job_apart_from_training_jobs(
    api: TestClient, roots: Path, private_redis: RedisServer
) -> None:
    answer = api.post("/index-jobs", json={"dataset": "photos", "folders_as": "shop", "metadata": "meta.csv"})
    assert answer.status_code == 202, answer.text
    body = answer.json()
    assert body["state"] == "queued" and body["url"] == f"http://test/index-jobs/{body['id']}"
    job = api.get(body["url"]).json()
    assert job["kind"] == "index" and job["dataset"] == str(roots / "photos")
    request = job["request"]
    assert request["metadata"] == str(roots / "meta.csv") and request["folders_as"] == "shop"
    assert (request["ids"], request["delete_missing"], request["batch_size"]) == ("path", False, 64)

    (raw,) = private_redis.client().lrange("index", 0, -1)  # the `index` queue, not `train`
    message = json.loads(raw)
    assert message["headers"]["task"] == "trainer.tasks.index_job" and message["headers"]["id"] == body["id"]
    assert private_redis.client().llen("train") == 0

    listed = api.get("/index-jobs").json()
    assert listed["total"] == 1 and [j["id"] for j in listed["items"]] == [body["id"]]
    assert api.get("/train-jobs").json()["total"] == 0
    assert error(api.get(f"/train-jobs/{body['id']}")) == (404, "job_not_found")
    assert error(api.delete(f"/train-jobs/{body['id']}")) == (404, "job_not_found")
    assert api.get(body["url"]).json()["state"] == "queued"  # the training route did not cancel it


def test_bad_input_answers_4xx_naming_the_problem(api: TestClient, roots: Path) -> None:
    cases = [
        ({"dataset": "nothing"}, (404, "dataset_not_found")),
        ({"dataset": "../outside.jsonl"}, (400, "dataset_outside_roots")),
        ({"dataset": "meta.csv"}, (400, "dataset_unsupported")),
        ({"dataset": "photos", "metadata": "none.jsonl"}, (404, "metadata_not_found")),
        ({"dataset": "photos", "metadata": str(roots.parent / "outside.jsonl")}, (400, "metadata_outside_roots")),
        ({"dataset": "photos", "metadata": "meta.txt"}, (400, "metadata_unsupported")),
        ({"dataset": "photos", "metadata": "photos"}, (400, "metadata_unsupported")),
    ]
    for body, expected in cases:
        assert error(api.post("/index-jobs", json=body)) == expected, body
    invalid = api.post("/index-jobs", json={"dataset": "photos", "ids": "uuid", "batch_size": 0, "folders_as": "a b"})
    assert invalid.status_code == 422
    assert {f["field"] for f in invalid.json()["error"]["fields"]} == {"ids", "batch_size", "folders_as"}
    assert error(api.post("/index-jobs", json={"dataset": "photos", "bogus": 1})) == (422, "invalid_request")
    assert api.get("/index-jobs").json()["total"] == 0


def test_no_active_model_answers_409(api: TestClient, data_dir: Path) -> None:
    (data_dir / "models" / "active").unlink()
    assert ModelRegistry(data_dir / "models").active() is None
    answer = api.post("/index-jobs", json={"dataset": "photos"})
    assert error(answer) == (409, "no_active_model") and "activate" in answer.json()["error"]["message"]


def test_cancel_a_queued_index_job_and_unknown_ids(api: TestClient) -> None:
    job_id = api.post("/index-jobs", json={"dataset": "small.npz"}).json()["id"]
    answer = api.delete(f"/index-jobs/{job_id}")
    assert answer.status_code == 202 and answer.json()["state"] == "cancelled"
    for answer in (api.get("/index-jobs/nope"), api.delete("/index-jobs/nope")):
        assert error(answer) == (404, "job_not_found")
    train_id = api.post("/train-jobs", json={"dataset": "small.npz", "epochs": 1}).json()["id"]
    assert error(api.get(f"/index-jobs/{train_id}")) == (404, "job_not_found")
