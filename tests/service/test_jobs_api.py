"""`/train-jobs` against a real Redis (private redis-server) through the ASGI app: validation,
dataset confinement, the queued message, listing, cancelling, and 503 when the broker is gone.
No worker runs here: tests/integration drives jobs to the end."""

from __future__ import annotations

import json
import time
from collections.abc import Iterator
from pathlib import Path

import httpx
import pytest
from _procs import RedisServer
from fastapi.testclient import TestClient

from service.app import create_app
from service.jobs.client import build_job_client
from service.settings import Settings

JOB = {"dataset": "digits.npz", "image_size": 16, "batch_size": 32, "max_steps": 4, "epochs": 1}


@pytest.fixture
def layout(tmp_path: Path) -> Path:
    """<tmp>/datasets (the root) with a dataset, and things outside it to escape to."""
    root = tmp_path / "datasets"
    (root / "folder").mkdir(parents=True)
    (root / "digits.npz").write_bytes(b"only the path is checked up front")
    (root / "notes.txt").write_text("not a dataset")
    (tmp_path / "outside").mkdir()
    (tmp_path / "outside.npz").write_bytes(b"secret")
    (root / "escape").symlink_to(tmp_path / "outside", target_is_directory=True)
    (root / "escape.npz").symlink_to(tmp_path / "outside.npz")
    (root / "inner.npz").symlink_to(root / "digits.npz")
    return tmp_path


def make_client(settings: Settings) -> TestClient:
    """The app in-process without its lifespan (no encoder runtime needed), jobs wired as it wires them."""
    app = create_app(settings)
    app.state.jobs = build_job_client(settings)
    return TestClient(app, base_url="http://test")


@pytest.fixture
def api(layout: Path, private_redis: RedisServer) -> Iterator[TestClient]:
    private_redis.client().flushdb()
    settings = Settings(
        data_dir=layout / "data", dataset_roots=[str(layout / "datasets")], broker_url=private_redis.url
    )
    yield make_client(settings)


def error(answer: httpx.Response) -> dict:
    body = answer.json()
    assert set(body) == {"error"}, body
    return body["error"]


def test_submit_queues_a_record_and_a_celery_message(api: TestClient, layout: Path, private_redis: RedisServer) -> None:
    answer = api.post("/train-jobs", json={**JOB, "name": "first"})
    assert answer.status_code == 202
    body = answer.json()
    assert body["state"] == "queued" and body["url"] == f"http://test/train-jobs/{body['id']}"
    assert answer.headers["location"] == body["url"]

    job = api.get(f"/train-jobs/{body['id']}").json()
    assert job["state"] == "queued" and job["name"] == "first" and job["progress"] is None
    assert job["dataset"] == str((layout / "datasets" / "digits.npz").resolve())
    assert job["request"]["batch_size"] == 32 and job["request"]["activate"] is True

    raw = private_redis.client().lrange("train", 0, -1)  # the `train` queue of the Redis broker
    assert len(raw) == 1
    message = json.loads(raw[0])
    assert message["headers"]["task"] == "trainer.tasks.train_job"
    assert message["headers"]["id"] == body["id"]


def test_symlink_inside_the_root_is_accepted(api: TestClient, layout: Path) -> None:
    answer = api.post("/train-jobs", json={**JOB, "dataset": "inner.npz"})
    assert answer.status_code == 202
    assert api.get(answer.json()["url"]).json()["dataset"] == str(layout / "datasets" / "digits.npz")


def test_invalid_values_answer_422_with_field_errors(api: TestClient) -> None:
    answer = api.post("/train-jobs", json={**JOB, "batch_size": 1, "method": "nope", "bogus": 3, "image_size": "x"})
    assert answer.status_code == 422
    err = error(answer)
    assert err["code"] == "invalid_request"
    assert {f["field"] for f in err["fields"]} == {"batch_size", "method", "bogus", "image_size"}

    missing = api.post("/train-jobs", json={"epochs": 1})
    assert missing.status_code == 422 and [f["field"] for f in error(missing)["fields"]] == ["dataset"]
    assert (
        api.post("/train-jobs", content=b"{not json", headers={"content-type": "application/json"}).status_code == 422
    )


@pytest.mark.parametrize(
    "dataset", ["../outside.npz", "folder/../../outside", "escape", "escape.npz", "escape/../../outside.npz"]
)
def test_dataset_escaping_the_roots_answers_400(api: TestClient, layout: Path, dataset: str) -> None:
    answer = api.post("/train-jobs", json={**JOB, "dataset": dataset})
    assert answer.status_code == 400
    assert error(answer)["code"] == "dataset_outside_roots"
    assert api.get("/train-jobs").json()["total"] == 0


def test_absolute_path_outside_answers_400(api: TestClient, layout: Path) -> None:
    answer = api.post("/train-jobs", json={**JOB, "dataset": str(layout / "outside.npz")})
    assert answer.status_code == 400 and error(answer)["code"] == "dataset_outside_roots"


def test_missing_and_unsupported_datasets(api: TestClient) -> None:
    missing = api.post("/train-jobs", json={**JOB, "dataset": "nothing-here"})
    assert missing.status_code == 404 and error(missing)["code"] == "dataset_not_found"
    assert "nothing-here" in error(missing)["message"]
    text = api.post("/train-jobs", json={**JOB, "dataset": "notes.txt"})
    assert text.status_code == 400 and error(text)["code"] == "dataset_unsupported"


def test_list_pages_newest_first(api: TestClient) -> None:
    ids = [api.post("/train-jobs", json={**JOB, "name": f"j{i}"}).json()["id"] for i in range(3)]
    page = api.get("/train-jobs", params={"limit": 2}).json()
    assert page["total"] == 3 and page["limit"] == 2 and [j["id"] for j in page["items"]] == ids[::-1][:2]
    rest = api.get("/train-jobs", params={"offset": 2, "limit": 2}).json()
    assert [j["id"] for j in rest["items"]] == ids[:1]
    assert api.get("/train-jobs", params={"limit": 0}).status_code == 422
    assert api.get("/train-jobs", params={"offset": -1}).status_code == 422


def test_cancel_queued_job_and_unknown_ids(api: TestClient) -> None:
    job_id = api.post("/train-jobs", json=JOB).json()["id"]
    answer = api.delete(f"/train-jobs/{job_id}")
    assert answer.status_code == 202
    assert answer.json()["state"] == "cancelled" and answer.json()["cancel_requested"] is True
    assert api.get(f"/train-jobs/{job_id}").json()["finished_at"]
    again = api.delete(f"/train-jobs/{job_id}")  # idempotent: stays cancelled
    assert again.status_code == 202 and again.json()["state"] == "cancelled"
    for answer in (api.get("/train-jobs/nope"), api.delete("/train-jobs/nope")):
        assert answer.status_code == 404 and error(answer)["code"] == "job_not_found"


def test_write_key_guards_submit_and_cancel(layout: Path, private_redis: RedisServer) -> None:
    settings = Settings(
        data_dir=layout / "data",
        dataset_roots=[str(layout / "datasets")],
        broker_url=private_redis.url,
        api_keys=["s3cret"],
    )
    client = make_client(settings)
    assert client.post("/train-jobs", json=JOB).status_code == 401
    assert client.delete("/train-jobs/x").status_code == 401
    ok = client.post("/train-jobs", json=JOB, headers={"X-API-Key": "s3cret"})
    assert ok.status_code == 202
    assert client.get(ok.json()["url"]).status_code == 200  # reads stay open by default


def test_no_broker_configured_answers_503(layout: Path) -> None:
    settings = Settings(data_dir=layout / "data", dataset_roots=[str(layout / "datasets")], broker_url=None)
    client = make_client(settings)
    for answer in (client.post("/train-jobs", json=JOB), client.get("/train-jobs"), client.get("/train-jobs/x")):
        assert answer.status_code == 503 and error(answer)["code"] == "jobs_unavailable"
    assert client.post("/train-jobs", json={**JOB, "dataset": "../outside.npz"}).status_code == 400


def test_broker_down_answers_503_not_500(layout: Path, tmp_path: Path) -> None:
    server = RedisServer(tmp_path / "short-lived")
    server.start()
    settings = Settings(data_dir=layout / "data", dataset_roots=[str(layout / "datasets")], broker_url=server.url)
    client = make_client(settings)
    assert client.get("/train-jobs").status_code == 200
    server.stop()
    for answer in (client.post("/train-jobs", json=JOB), client.get("/train-jobs")):
        assert answer.status_code == 503 and error(answer)["code"] == "jobs_unavailable", answer.text


def test_ping_answers_quickly_either_way(tmp_path: Path) -> None:
    server = RedisServer(tmp_path / "ping")
    server.start()
    client = build_job_client(Settings(data_dir=tmp_path, broker_url=server.url))
    assert client.ping() is True
    server.stop()
    started = time.monotonic()
    assert client.ping() is False
    assert time.monotonic() - started < 3.0
    assert build_job_client(Settings(data_dir=tmp_path, broker_url=None)).ping() is False
