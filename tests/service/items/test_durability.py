"""Durability: 1,000 items through a real uvicorn server, SIGKILL right after the last 2xx,
restart; every item is there and finds itself. Then a corrupted snapshot is rebuilt."""

from __future__ import annotations

import signal
from pathlib import Path

import httpx
import numpy as np
import pytest

from service.items.index import VectorIndex
from service.items.reindex import snapshot_path
from service.items.store import ItemStore
from tests.service.conftest import MODEL_A, live_server, make_settings, png

N, BATCH = 1000, 50


def images(seed: int, n: int) -> list[bytes]:
    rng = np.random.default_rng(seed)
    return [png(rng.integers(0, 256, (32, 32, 3), dtype=np.uint8)) for _ in range(n)]


def top_hit(http: httpx.Client, url: str, image: bytes) -> str:
    r = http.post(url + "/search", files={"file": ("q.png", image, "image/png")}, data={"k": "1"})
    assert r.status_code == 200, r.text
    return r.json()["results"][0]["id"]


@pytest.mark.integration
@pytest.mark.slow
def test_acknowledged_adds_survive_sigkill_and_snapshot_corruption(data_dir: Path) -> None:
    pics = images(0, N)
    ids = [f"item-{i:04d}" for i in range(N)]
    env = {"SIMCLR_EMBED_INDEX_SNAPSHOT_EVERY": "300"}  # a snapshot mid-way, then more adds after it
    with live_server(data_dir, **env) as server, httpx.Client(timeout=60) as http:
        for start in range(0, N, BATCH):
            part = range(start, start + BATCH)
            r = http.post(
                server.url + "/items",
                files=[("files", (f"{i}.png", pics[i], "image/png")) for i in part],
                data={"ids": [ids[i] for i in part], "metadata": [f'{{"i": {i}}}' for i in part]},
            )
            assert r.status_code == 201, r.text
        server.proc.send_signal(signal.SIGKILL)  # right after the last 2xx
        server.proc.wait(10)

    snapshot = snapshot_path(make_settings(data_dir), MODEL_A)  # the server runs on this host: same host dir
    assert snapshot.is_file()  # written at 300/600/900 adds: stale now, must be rebuilt
    with live_server(data_dir) as server, httpx.Client(timeout=60) as http:
        assert http.get(server.url + "/items", params={"limit": 1}).json()["total"] == N
        for i in range(0, N):
            assert top_hit(http, server.url, pics[i]) == ids[i]
        item = http.get(server.url + f"/items/{ids[123]}").json()
        assert item["metadata"] == {"i": 123}
        assert http.get(server.url + item["image_url"]).content == pics[123]
    # graceful stop wrote a snapshot matching the store: store and index agree
    store = ItemStore(data_dir / "items" / "items.sqlite3")
    state = store.state(MODEL_A)
    store.close()
    assert state.count == N

    _, head = VectorIndex.load(snapshot)
    assert (head.ntotal, head.changes) == (N, state.changes)

    data = bytearray(snapshot.read_bytes())
    data[len(data) // 2] ^= 0xFF
    snapshot.write_bytes(bytes(data))
    with live_server(data_dir) as server, httpx.Client(timeout=60) as http:
        for i in range(0, N, 97):
            assert top_hit(http, server.url, pics[i]) == ids[i]
    _, head = VectorIndex.load(snapshot)  # rebuilt from the store and snapshotted again at shutdown
    assert (head.ntotal, head.changes) == (N, state.changes)
