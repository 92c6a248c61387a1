"""Two API hosts on one PostgreSQL: real uvicorn processes sharing the data dir (originals,
models) and the database, each with its own local folder (FAISS snapshots). What one host
acknowledges, the other's searches return within a second: adds, replaces and deletes; a
host SIGKILLed during concurrent adds loses none that got a 2xx; a classifier one host
creates, the other lists and predicts with."""

from __future__ import annotations

import re
import signal
import threading
import time
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import httpx
import numpy as np
import psycopg
import pytest

from tests.service.conftest import MODEL_A, live_server, png

VISIBLE_S = 1.0


def pictures(seed: int, n: int) -> list[bytes]:
    rng = np.random.default_rng(seed)
    return [png(rng.integers(0, 256, (32, 32, 3), dtype=np.uint8)) for _ in range(n)]


def host_env(url: str, data_dir: Path, name: str) -> dict[str, str]:
    return {"SIMCLR_EMBED_STORE_URL": url, "SIMCLR_EMBED_LOCAL_DIR": str(data_dir / "local" / name)}


def add(http: httpx.Client, base: str, item_id: str, image: bytes, **params: str) -> httpx.Response:
    return http.post(
        base + "/items",
        files=[("files", (f"{item_id}.png", image, "image/png"))],
        data={"ids": [item_id]},
        params=params,
    )


def best(http: httpx.Client, base: str, image: bytes) -> tuple[str | None, float]:
    """The top hit's id and score for `image` (None: no results)."""
    r = http.post(base + "/search", files={"file": ("q.png", image, "image/png")}, data={"k": "1"})
    assert r.status_code == 200, r.text
    results = r.json()["results"]
    return (results[0]["id"], results[0]["score"]) if results else (None, 0.0)


def top_hit(http: httpx.Client, base: str, image: bytes) -> str | None:
    return best(http, base, image)[0]


def index_size(http: httpx.Client, base: str) -> int:
    check = http.get(base + "/readyz").json()["checks"]["index"]
    match = re.fullmatch(rf"ok: {MODEL_A}, (\d+) vectors", check)
    assert match, check
    return int(match.group(1))


def seconds_until(check: object, limit_s: float = 10.0) -> float:
    """How long after now `check()` first holds (polled every 10 ms); fails past `limit_s`."""
    start = time.monotonic()
    while not check():  # type: ignore[operator]
        assert time.monotonic() - start < limit_s, "never became visible"
        time.sleep(0.01)
    return time.monotonic() - start


@pytest.mark.integration
def test_writes_on_one_host_reach_the_other_within_a_second(data_dir: Path, postgres_url: str) -> None:
    images = pictures(0, 24)
    with (
        live_server(data_dir, **host_env(postgres_url, data_dir, "a")) as a,
        live_server(data_dir, **host_env(postgres_url, data_dir, "b")) as b,
        httpx.Client(timeout=30) as http,
    ):
        lags = []
        for i, image in enumerate(images[:20]):
            assert add(http, a.url, f"i{i}", image).status_code == 201
            lags.append(seconds_until(lambda i=i, image=image: top_hit(http, b.url, image) == f"i{i}"))
        assert max(lags) < VISIBLE_S, lags
        assert index_size(http, b.url) == 20

        # a replace on B: A serves the new image under the id, the old vector is gone from its index
        assert add(http, b.url, "i3", images[20], replace="true").status_code == 201
        lag = seconds_until(lambda: top_hit(http, a.url, images[20]) == "i3")
        assert lag < VISIBLE_S and best(http, a.url, images[3])[1] < 0.999  # the old image no longer finds itself
        assert index_size(http, a.url) == 20
        assert http.get(a.url + "/items/i3/image").content == images[20]  # the original, on the shared dir

        # deletes on A leave B's index within a second
        for i in (0, 7, 19):
            assert http.delete(f"{a.url}/items/i{i}").status_code == 204
        lag = seconds_until(lambda: index_size(http, b.url) == 17)
        assert lag < VISIBLE_S
        assert {top_hit(http, b.url, images[i]) for i in (0, 7, 19)}.isdisjoint({"i0", "i7", "i19"})
        assert http.get(b.url + "/items/i7").status_code == 404
    assert (data_dir / "local" / "a" / "index" / f"{MODEL_A}.faiss").is_file()  # each host its own snapshot
    assert (data_dir / "local" / "b" / "index" / f"{MODEL_A}.faiss").is_file()


@pytest.mark.integration
def test_acknowledged_adds_survive_a_sigkilled_host(data_dir: Path, postgres_url: str) -> None:
    """Adds from four clients to A; A is SIGKILLed after 30 acknowledgements. Every add that got
    a 2xx is found by its own image as B's top hit, and on A once it is restarted."""
    images = pictures(1, 80)
    acked: list[int] = []
    lock = threading.Lock()
    env_a = host_env(postgres_url, data_dir, "a")
    with live_server(data_dir, **host_env(postgres_url, data_dir, "b")) as b, httpx.Client(timeout=30) as http:
        with live_server(data_dir, **env_a) as a:

            def send(i: int) -> None:
                try:
                    r = add(http, a.url, f"k{i}", images[i])
                except httpx.TransportError:
                    return  # the host died under this request: no acknowledgement
                if r.status_code == 201:
                    with lock:
                        acked.append(i)
                        if len(acked) == 30:
                            a.proc.send_signal(signal.SIGKILL)

            with ThreadPoolExecutor(4) as pool:
                list(pool.map(send, range(len(images))))
            a.proc.wait(10)
        assert 30 <= len(acked) < len(images)
        time.sleep(VISIBLE_S)
        assert [i for i in acked if top_hit(http, b.url, images[i]) != f"k{i}"] == []
        with live_server(data_dir, **env_a) as restarted:
            assert [i for i in acked if top_hit(http, restarted.url, images[i]) != f"k{i}"] == []


@pytest.mark.integration
def test_a_classifier_made_on_one_host_is_listed_and_predicts_on_the_other(data_dir: Path, postgres_url: str) -> None:
    """Classifiers are tables of the shared store: what A creates, B lists and answers with
    the same fit; what B deletes, A no longer has."""
    images = pictures(2, 21)
    with (
        live_server(data_dir, **host_env(postgres_url, data_dir, "a")) as a,
        live_server(data_dir, **host_env(postgres_url, data_dir, "b")) as b,
        httpx.Client(timeout=60) as http,
    ):
        files = [("files", (f"c{i}.png", image, "image/png")) for i, image in enumerate(images[:20])]
        meta = [f'{{"label": {i % 2}}}' for i in range(20)]
        added = http.post(a.url + "/items", files=files, data={"ids": [f"c{i}" for i in range(20)], "metadata": meta})
        assert added.status_code == 201, added.text
        made = http.post(a.url + "/classifiers", json={"name": "parity", "label_key": "label"})
        assert made.status_code == 201, made.text
        cid = made.json()["id"]

        with psycopg.connect(postgres_url) as conn:  # in the database, not in a file on the shared dir
            assert conn.execute("SELECT id, name FROM classifiers").fetchall() == [(cid, "parity")]
        assert not list((data_dir / "items").glob("classifiers*"))
        assert [c["id"] for c in http.get(b.url + "/classifiers").json()["classifiers"]] == [cid]
        assert http.get(f"{b.url}/classifiers/{cid}").json() == made.json()
        query = {"files": ("q.png", images[20], "image/png")}
        answers = [http.post(f"{host.url}/classifiers/{cid}/predict", files=query).json() for host in (a, b)]
        by_id = [
            http.post(f"{host.url}/classifiers/{cid}/predict", json={"item_ids": ["c3"]}).json() for host in (a, b)
        ]
        for one, other in (answers, by_id):
            assert (
                (one["model_id"], one["fit_id"])
                == (other["model_id"], other["fit_id"])
                == (MODEL_A, made.json()["fit_id"])
            )
            assert one["predictions"] == other["predictions"]

        assert http.delete(f"{b.url}/classifiers/{cid}").status_code == 204
        assert http.get(f"{a.url}/classifiers/{cid}").status_code == 404
