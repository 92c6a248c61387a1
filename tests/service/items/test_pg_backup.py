"""Backup and restore of a PostgreSQL item store: pg_dump of the database, then a copy of the
originals folder; pg_restore into a new database. The restored store, served by a new API on
a new data dir, gives the same search results, serves the originals, has the classifiers
(tables of the same database) answering as before, and takes new adds."""

from __future__ import annotations

import shutil
import subprocess
from pathlib import Path

import numpy as np
import pytest
from _procs import PostgresDatabases
from fastapi.testclient import TestClient

from service.app import create_app
from tests.service.conftest import make_settings, png

BIN = Path("/usr/lib/postgresql/15/bin")


def pictures(seed: int, n: int) -> list[bytes]:
    rng = np.random.default_rng(seed)
    return [png(rng.integers(0, 256, (32, 32, 3), dtype=np.uint8)) for _ in range(n)]


def search_all(client: TestClient, images: list[bytes]) -> list[list[tuple[str, float]]]:
    out = []
    for image in images:
        r = client.post("/search", files={"file": ("q.png", image, "image/png")}, data={"k": "5"})
        assert r.status_code == 200, r.text
        out.append([(h["id"], round(h["score"], 5)) for h in r.json()["results"]])
    return out


@pytest.mark.integration
def test_pg_dump_and_restore_serve_the_same_results(
    data_dir: Path, tmp_path: Path, postgres_url: str, postgres: PostgresDatabases
) -> None:
    images = pictures(0, 30)
    fresh = tmp_path / "restored"
    shutil.copytree(data_dir, fresh)  # the same models, no items yet
    with TestClient(create_app(make_settings(data_dir, store_url=postgres_url))) as client:
        for i in range(0, 30, 10):
            files = [("files", (f"{j}.png", images[j], "image/png")) for j in range(i, i + 10)]
            ids = [f"b{j}" for j in range(i, i + 10)]
            assert (
                client.post("/items", files=files, data={"ids": ids, "metadata": ['{"n": 1}'] * 10}).status_code == 201
            )
        assert client.delete("/items/b4").status_code == 204
        before = search_all(client, images[:10])
        examples = [{"item_id": f"b{j}", "label": j % 2} for j in range(10, 30)]
        made = client.post("/classifiers", json={"name": "parity", "examples": examples})
        assert made.status_code == 201, made.text
        predicted = client.post(f"/classifiers/{made.json()['id']}/predict", json={"item_ids": ["b0", "b9"]}).json()
    dump = tmp_path / "store.dump"
    subprocess.run([str(BIN / "pg_dump"), "-Fc", "-f", str(dump), postgres_url], check=True)
    shutil.copytree(data_dir / "items" / "blobs", fresh / "items" / "blobs")

    with postgres.database() as restored_url:
        subprocess.run([str(BIN / "pg_restore"), "--no-owner", "-d", restored_url, str(dump)], check=True)
        with TestClient(create_app(make_settings(fresh, store_url=restored_url))) as client:
            assert client.app.state.items.index_source.startswith("rebuilt")  # a new host: built from the store
            assert search_all(client, images[:10]) == before
            assert client.get("/items/b7/image").content == images[7]
            assert client.get("/items/b4").status_code == 404
            assert client.get("/items").json()["total"] == 29
            assert client.get(f"/classifiers/{made.json()['id']}").json() == made.json()  # tables of the dump
            again = client.post(f"/classifiers/{made.json()['id']}/predict", json={"item_ids": ["b0", "b9"]})
            assert again.json() == predicted
            files = [("files", ("n.png", images[4], "image/png"))]
            assert client.post("/items", files=files, data={"ids": ["b4"]}).status_code == 201  # pks continue
            assert search_all(client, images[4:5])[0][0] == ("b4", 1.0)
