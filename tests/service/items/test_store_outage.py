"""PostgreSQL stopped and started again under a write load (a private server of the test's
own, never the machine's shared one): writes during the outage answer 503 with a clear
message, none gets a 2xx without being stored, writes succeed again within seconds of the
restart without restarting the API, and nothing acknowledged is lost. Searches keep
answering during the outage, filtered ones and searches by item id included, from the index
and the ids and metadata kept beside it. A host restarted while the database is down serves
its local snapshot, takes writes again once the database is back and catches up from the
change log."""

from __future__ import annotations

import json
import threading
import time
from collections.abc import Iterator
from pathlib import Path

import httpx
import numpy as np
import pytest
from _procs import PrivatePostgres, wait_until
from fastapi.testclient import TestClient

from service.app import create_app
from service.items.errors import StoreUnavailableError
from service.items.postgres import PgItemStore
from tests.service.conftest import live_server, make_settings, png


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
    stop, paused, writing = threading.Event(), threading.Event(), threading.Lock()
    with TestClient(create_app(settings), raise_server_exceptions=False) as client:

        def writer() -> None:
            for i, image in enumerate(images):
                while paused.is_set():
                    time.sleep(0.01)
                if stop.is_set():
                    return
                files = [("files", (f"{i}.png", image, "image/png"))]
                meta = json.dumps({"parity": i % 2, "n": i})
                with writing:
                    r = client.post("/items", files=files, data={"ids": [f"w{i}"], "metadata": [meta]})
                statuses[i] = r.status_code
                if r.status_code != 201:
                    errors[i] = r.json()["error"]

        def by_id(item_id: str, **query: object) -> httpx.Response:
            return client.post("/search", json={"item_id": item_id, "k": 5, **query})

        thread = threading.Thread(target=writer)
        thread.start()
        time.sleep(1.5)  # writes succeed
        paused.set()
        with writing:  # no write in flight: the index holds what the searches below see
            before = {j: by_id(f"w{j}").json()["results"] for j in (0, 1, 2, 3)}
            private_postgres.stop()
        paused.clear()
        down_at = len(statuses)
        time.sleep(2.0)  # writes fail meanwhile
        outage_searches = {}
        for j in (0, 1, 2, 3):  # acknowledged before the outage (the first writes take well under 1.5 s)
            query = {"file": ("q.png", images[j], "image/png")}
            outage_searches[j] = (
                client.post("/search", files=query, data={"k": "1"}),
                client.post("/search", files=query, data={"k": "3", "filter": json.dumps({"parity": 1 - j % 2})}),
                by_id(f"w{j}"),
                by_id(f"w{j}", exclude_self=True),
                client.post("/search", files=query, data={"k": "5"}),
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
        for j, (plain, filtered, item, others, image) in outage_searches.items():  # answered from memory
            for r in (item, others, image):
                assert r.status_code == 200, r.text
            assert item.json()["results"] == before[j]  # the same hits as before the outage
            assert before[j][0]["id"] == f"w{j}" and len(before[j]) == 5
            rest = [h["id"] for h in others.json()["results"]]
            assert len(rest) == 5 and f"w{j}" not in rest and rest[:4] == [h["id"] for h in before[j][1:]]
            # the item's own image, embedded again, finds the same neighbours at the same scores
            found = image.json()["results"]
            assert [h["id"] for h in found] == [h["id"] for h in before[j]]
            assert np.allclose([h["score"] for h in found], [h["score"] for h in before[j]], atol=1e-5)
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


@pytest.mark.integration
def test_a_host_restarted_while_postgres_is_down_serves_its_snapshot_and_catches_up(
    data_dir: Path, private_postgres: PrivatePostgres
) -> None:
    images = pictures(2, 8)
    settings = make_settings(data_dir, store_url=private_postgres.url, store_timeout_s=1.0)
    with TestClient(create_app(settings)) as client:  # this host: its snapshot is written at shutdown
        for i in range(6):
            files = [("files", (f"{i}.png", images[i], "image/png"))]
            meta = json.dumps({"n": i})
            assert client.post("/items", files=files, data={"ids": [f"s{i}"], "metadata": [meta]}).status_code == 201
        before = client.post("/search", json={"item_id": "s0", "k": 4}).json()["results"]
    other = make_settings(data_dir, store_url=private_postgres.url, local_dir=data_dir / "other-host")
    with TestClient(create_app(other)) as client:  # another host writes after that snapshot: only in the log
        late = [("files", ("late.png", images[6], "image/png"))]
        assert client.post("/items", files=late, data={"ids": ["late"]}).status_code == 201
    private_postgres.stop()

    env = {"SIMCLR_EMBED_STORE_URL": private_postgres.url, "SIMCLR_EMBED_STORE_TIMEOUT_S": "1"}
    with live_server(data_dir, **env) as server, httpx.Client(base_url=server.url, timeout=30) as http:
        ready = wait_until(lambda: (r := http.get("/readyz")).status_code == 200 and r, 30, "the host to be ready")
        assert "PostgreSQL" in ready.json()["checks"]["store"]  # up from its snapshot, the store still down
        assert http.post("/search", json={"item_id": "s0", "k": 4}).json()["results"] == before
        for i in range(6):
            hit = http.post("/search", files={"file": ("q.png", images[i], "image/png")}, data={"k": "1"})
            assert hit.status_code == 200 and hit.json()["results"][0] == {
                "id": f"s{i}",
                "score": pytest.approx(1.0, abs=1e-4),
                "metadata": {"n": i},
            }
        missed = http.post("/search", files={"file": ("q.png", images[6], "image/png")}, data={"k": "1"})
        assert missed.json()["results"][0]["id"] != "late"  # written after the snapshot: not served yet
        new = [("files", ("new.png", images[7], "image/png"))]
        down = http.post("/items", files=new, data={"ids": ["new"]})
        assert (down.status_code, down.json()["error"]["code"]) == (503, "store_unavailable"), down.text

        private_postgres.start()
        back_at = time.monotonic()
        while (added := http.post("/items", files=new, data={"ids": ["new"]})).status_code != 201:
            assert added.status_code == 503 and time.monotonic() - back_at < 10, added.text
            time.sleep(0.1)
        for item_id, image in (("new", images[7]), ("late", images[6])):  # its own write, and the log's
            hit = http.post("/search", files={"file": ("q.png", image, "image/png")}, data={"k": "1"})
            assert hit.status_code == 200 and hit.json()["results"][0]["id"] == item_id, hit.text
        assert http.get("/items").json()["total"] == 8


@pytest.mark.integration
def test_the_store_is_back_within_seconds_of_the_server_after_a_long_outage(
    private_postgres: PrivatePostgres,
) -> None:
    """The connection pool retries a failed connection with a doubling wait; after 20 s down
    its default retry schedule left the store unusable for ~7 s after the server was back (and
    ~14 s after 45 s down). Reads and writes borrow the same pool."""
    store = PgItemStore(private_postgres.url, timeout_s=5.0)
    try:
        store.state("m")
        private_postgres.stop()
        down = time.monotonic()
        refused = 0
        while time.monotonic() - down < 20:
            with pytest.raises(StoreUnavailableError):
                store.state("m")
            refused += 1
            time.sleep(0.5)
        private_postgres.start()
        back = time.monotonic()
        wait_until(lambda: _answers(store), 30, "the store to answer again", every_s=0.1)
        assert time.monotonic() - back < 3.0 and refused >= 3
    finally:
        store.close()


def _answers(store: PgItemStore) -> bool:
    try:
        store.state("m")
    except StoreUnavailableError:
        return False
    return True
