"""PostgreSQL stopped and started again under a write load (a private server of the test's
own, never the machine's shared one): writes during the outage answer 503 with a clear
message, none gets a 2xx without being stored, writes succeed again within seconds of the
restart without restarting the API, and nothing acknowledged is lost. Searches keep
answering during the outage, filtered ones included, from the index and the ids and
metadata kept beside it."""

from __future__ import annotations

import json
import threading
import time
from collections.abc import Iterator
from pathlib import Path

import numpy as np
import pytest
from _procs import PrivatePostgres
from fastapi.testclient import TestClient

from service.app import create_app
from tests.service.conftest import make_settings, png


@pytest.fixture
def private_postgres() -> Iterator[PrivatePostgres]:
    server = PrivatePostgres()
    server.start()
    try:
        yield server
    finally:
        server.remove()


def pictures(seed: int, n: int) -> list[bytes]:
    rng = np.random.default_rng(seed)
    return [png(rng.integers(0, 256, (32, 32, 3), dtype=np.uint8)) for _ in range(n)]


@pytest.mark.integration
def test_writes_get_503_while_postgres_is_down_and_recover_after(
    data_dir: Path, private_postgres: PrivatePostgres
) -> None:
    images = pictures(0, 400)
    settings = make_settings(data_dir, store_url=private_postgres.url, store_timeout_s=1.0)
    statuses: dict[int, int] = {}
    errors: dict[int, dict[str, str]] = {}
    stop = threading.Event()
    with TestClient(create_app(settings), raise_server_exceptions=False) as client:

        def writer() -> None:
            for i, image in enumerate(images):
                if stop.is_set():
                    return
                files = [("files", (f"{i}.png", image, "image/png"))]
                meta = json.dumps({"parity": i % 2, "n": i})
                r = client.post("/items", files=files, data={"ids": [f"w{i}"], "metadata": [meta]})
                statuses[i] = r.status_code
                if r.status_code != 201:
                    errors[i] = r.json()["error"]

        thread = threading.Thread(target=writer)
        thread.start()
        time.sleep(1.5)  # writes succeed
        private_postgres.stop()
        down_at = len(statuses)
        time.sleep(2.0)  # writes fail meanwhile
        outage_searches = {}
        for j in (0, 1, 2, 3):  # acknowledged before the outage (the first writes take well under 1.5 s)
            query = {"file": ("q.png", images[j], "image/png")}
            outage_searches[j] = (
                client.post("/search", files=query, data={"k": "1"}),
                client.post("/search", files=query, data={"k": "3", "filter": json.dumps({"parity": 1 - j % 2})}),
            )
        still_down = client.post("/items", files=[("files", ("x.png", images[-1], "image/png"))], data={"ids": ["x"]})
        time.sleep(1.0)
        private_postgres.start()
        restarted_at, first_after = time.monotonic(), len(statuses)
        while time.monotonic() - restarted_at < 20 and not any(
            code == 201 for i, code in list(statuses.items()) if i >= first_after
        ):
            time.sleep(0.05)
        recovered_s = time.monotonic() - restarted_at
        time.sleep(1.0)
        stop.set()
        thread.join()

        acked = sorted(i for i, code in statuses.items() if code == 201)
        failed = sorted(i for i, code in statuses.items() if code != 201)
        assert down_at > 0 and failed, statuses  # writes before the outage succeeded, some during it failed
        assert {statuses[i] for i in failed} == {503}
        assert {errors[i]["code"] for i in failed} == {"store_unavailable"}
        assert "PostgreSQL" in errors[failed[0]]["message"] and "retry" in errors[failed[0]]["message"]
        assert acked[-1] > failed[-1], "no write succeeded after the restart"
        assert recovered_s < 10, recovered_s
        assert still_down.status_code == 503 and still_down.json()["error"]["code"] == "store_unavailable"
        for j, (plain, filtered) in outage_searches.items():  # answered from memory while the store was down
            assert plain.status_code == 200, plain.text
            (top,) = plain.json()["results"]
            assert top["id"] == f"w{j}" and top["metadata"] == {"parity": j % 2, "n": j}
            assert filtered.status_code == 200, filtered.text
            hits = filtered.json()["results"]
            assert len(hits) == 3 and f"w{j}" not in [h["id"] for h in hits]
            assert all(h["metadata"]["parity"] == 1 - j % 2 and h["id"] == f"w{h['metadata']['n']}" for h in hits)

        listed = client.get("/items", params={"limit": 1000}).json()
        stored = {item["id"] for item in listed["items"]}
        assert {f"w{i}" for i in acked} <= stored  # nothing acknowledged is lost
        assert listed["total"] == len(stored)
        time.sleep(0.5)  # the follower has caught up with the log
        for i in acked[::5]:
            hit = client.post("/search", files={"file": ("q.png", images[i], "image/png")}, data={"k": "1"})
            assert hit.status_code == 200 and hit.json()["results"][0]["id"] == f"w{i}"


@pytest.mark.integration
def test_a_host_started_while_postgres_is_down_comes_up_and_recovers_by_itself(
    data_dir: Path, private_postgres: PrivatePostgres
) -> None:
    image = pictures(1, 1)[0]
    private_postgres.stop()  # initialised, not running: the API starts against a dead server
    settings = make_settings(data_dir, store_url=private_postgres.url, store_timeout_s=1.0)
    with TestClient(create_app(settings), raise_server_exceptions=False) as client:
        assert client.get("/healthz").status_code == 200  # alive
        ready = client.get("/readyz")
        assert ready.status_code == 503
        assert "PostgreSQL" in ready.json()["checks"]["store"] and ready.json()["checks"]["index"] != "ok"
        files = [("files", ("a.png", image, "image/png"))]
        down_write = client.post("/items", files=files, data={"ids": ["a"]})
        down_read = client.get("/items", params={"limit": 10})
        for r in (down_write, down_read):
            assert r.status_code == 503 and r.json()["error"]["code"] == "store_unavailable", r.text

        private_postgres.start()
        back_at = time.monotonic()
        while client.get("/readyz").status_code != 200:
            assert time.monotonic() - back_at < 15, client.get("/readyz").json()
            time.sleep(0.1)
        assert client.get("/readyz").json()["checks"]["store"] == "ok"
        added = client.post("/items", files=files, data={"ids": ["a"]})
        assert added.status_code == 201, added.text
        hit = client.post("/search", files={"file": ("q.png", image, "image/png")}, data={"k": "1"})
        assert hit.status_code == 200 and hit.json()["results"][0]["id"] == "a"
        assert client.get("/items").json()["total"] == 1
