"""PostgreSQL stopped and started again under a write load (a private server of the test's
own, never the machine's shared one): writes during the outage answer 503 with a clear
message, none gets a 2xx without being stored, writes succeed again within seconds of the
restart without restarting the API, and nothing acknowledged is lost. Searches during the
outage answer 503 too: the hits' ids and metadata are read from the store (an in-memory
copy beside the index, so that searches keep answering, is not built yet)."""

from __future__ import annotations

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
                r = client.post("/items", files=files, data={"ids": [f"w{i}"]})
                statuses[i] = r.status_code
                if r.status_code != 201:
                    errors[i] = r.json()["error"]

        thread = threading.Thread(target=writer)
        thread.start()
        time.sleep(1.5)  # writes succeed
        private_postgres.stop()
        down_at = len(statuses)
        time.sleep(2.0)  # writes fail meanwhile
        search = client.post("/search", files={"file": ("q.png", images[0], "image/png")}, data={"k": "1"})
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
        # a search during the outage needs the store for the hits' ids and metadata: 503, never a 500
        assert search.status_code == 503 and search.json()["error"]["code"] == "store_unavailable"

        listed = client.get("/items", params={"limit": 1000}).json()
        stored = {item["id"] for item in listed["items"]}
        assert {f"w{i}" for i in acked} <= stored  # nothing acknowledged is lost
        assert listed["total"] == len(stored)
        time.sleep(0.5)  # the follower has caught up with the log
        for i in acked[::5]:
            hit = client.post("/search", files={"file": ("q.png", images[i], "image/png")}, data={"k": "1"})
            assert hit.status_code == 200 and hit.json()["results"][0]["id"] == f"w{i}"
