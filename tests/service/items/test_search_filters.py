"""Filtered search and the search options, through the real app (SQLite and PostgreSQL, FAISS,
ONNX Runtime).

The exactness tests write vectors straight into the served item layer's store (the way a
bulk job or another process would) and compare `search_vectors` with a float64 numpy brute
force over the items that an independent Python evaluation of the filter selects."""

from __future__ import annotations

import json
import subprocess
import sys
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import numpy as np
import pytest
from fastapi.testclient import TestClient

from service.app import create_app
from service.items.backend import NewItem
from service.items.filters import parse_filter
from service.items.index import nlist_for
from service.items.service import ItemService, SearchOptions
from tests.service.conftest import DIM, MODEL_A, make_settings, png

N = 4000
SHOPS = [f"shop-{i}" for i in range(40)]


def unit(rng: np.random.Generator, n: int) -> np.ndarray:
    x = rng.standard_normal((n, DIM))
    return (x / np.linalg.norm(x, axis=1, keepdims=True)).astype(np.float32)


def random_metadata(rng: np.random.Generator, n: int) -> list[dict[str, Any] | None]:
    out: list[dict[str, Any] | None] = []
    for i in range(n):
        if i % 97 == 0:
            out.append(None)  # no metadata: matches no condition
            continue
        meta: dict[str, Any] = {"u": float(rng.random()), "shop": SHOPS[int(rng.integers(len(SHOPS)))]}
        label = int(rng.integers(10))
        meta["label"] = str(label) if i % 5 == 0 else label  # the string "3" is not the number 3
        if i % 3:
            meta["flag"] = bool(rng.integers(2))
        out.append(meta)
    return out


def number(v: Any) -> bool:
    return isinstance(v, int | float) and not isinstance(v, bool)


def same(a: Any, b: Any) -> bool:
    """Equality with JSON types apart: booleans only equal booleans, numbers numbers."""
    if isinstance(a, bool) or isinstance(b, bool):
        return isinstance(a, bool) and isinstance(b, bool) and a == b
    if number(a) and number(b):
        return float(a) == float(b)
    return type(a) is type(b) and a == b


def matches(meta: dict[str, Any] | None, flt: dict[str, Any]) -> bool:
    """The reference: the documented filter semantics, evaluated on Python dicts."""
    if meta is None:
        return False
    for name, test in flt.items():
        if name not in meta:
            return False
        value = meta[name]
        tests = test if isinstance(test, dict) else {"eq": test}
        for op, arg in tests.items():
            if op == "eq" and not same(value, arg):
                return False
            if op == "in" and not any(same(value, a) for a in arg):
                return False
            if op in ("gte", "gt", "lte", "lt"):
                if not number(value):
                    return False
                ok = {"gte": value >= arg, "gt": value > arg, "lte": value <= arg, "lt": value < arg}[op]
                if not ok:
                    return False
    return True


def fill(
    items: ItemService, rng: np.random.Generator, *, first_indexed: bool = False
) -> tuple[np.ndarray, list[dict[str, Any] | None]]:
    """N items with random vectors and metadata, written to the store in batches of 500;
    with `first_indexed`, the rest only once the served index holds the first batch (the
    follower reads the log in its own time and would otherwise see any number at once)."""
    vecs, meta = unit(rng, N), random_metadata(rng, N)
    for start in range(0, N, 500):
        part = range(start, start + 500)
        new = [NewItem(f"it-{i}", f"sha-{i}", "image/png", meta[i]) for i in part]
        items.store.add(new, {items.served or "": vecs[start : start + 500]})
        if first_indexed and start == 0:
            wait_indexed(items, 500, timeout_s=30)
    return vecs, meta


def wait_indexed(items: ItemService, n: int, timeout_s: float = 10.0) -> None:
    deadline = time.monotonic() + timeout_s
    while items.stats()["index_size"] < n:
        assert time.monotonic() < deadline, items.stats()
        time.sleep(0.05)


FILTERS = [
    {"u": {"lt": 0.001}},  # ~0.1%
    {"u": {"lt": 0.01}},
    {"u": {"gte": 0.2, "lt": 0.3}},
    {"shop": {"in": SHOPS[:20]}},  # ~50%
    {"u": {"gte": 0.0}},  # all items with metadata (~99%)
    {"label": 3},
    {"label": "3"},
    {"label": {"in": [1, "2", 7.0]}, "flag": True},
    {"flag": False, "u": {"gt": 0.5}, "shop": {"eq": "shop-3"}},
    {"shop": "no-such-shop"},
    {"flag": {"in": [1, 0]}},  # the numbers 1 and 0 are not true and false
]


def check_exact(items: ItemService, vecs: np.ndarray, meta: list[dict[str, Any] | None], k: int) -> None:
    rng = np.random.default_rng(99)
    queries = unit(rng, 5)
    for flt in FILTERS:
        chosen = np.asarray([i for i, m in enumerate(meta) if matches(m, flt)], dtype=np.int64)
        _, hits = items.search_vectors(queries, k, options=SearchOptions(where=parse_filter(flt)))
        scores = queries.astype(np.float64) @ vecs[chosen].astype(np.float64).T  # [Q, M]
        for q, row in enumerate(hits):
            order = np.argsort(-scores[q], kind="stable")[:k]
            assert [h.id for h in row] == [f"it-{chosen[j]}" for j in order], flt
            np.testing.assert_allclose([h.score for h in row], scores[q, order], atol=1e-5)
            assert all(matches(h.metadata, flt) for h in row)


@pytest.fixture
def hnsw_client(data_dir: Path, store_url: str | None) -> Iterator[TestClient]:
    settings = make_settings(data_dir, index_factory="HNSW16", index_filter_scan_max=N, store_url=store_url)
    with TestClient(create_app(settings), raise_server_exceptions=False) as c:
        yield c


@pytest.mark.parametrize("k", [1, 10, 50])
def test_filtered_search_on_flat_equals_brute_force_over_the_matching_items(client: TestClient, k: int) -> None:
    items = client.app.state.items
    vecs, meta = fill(items, np.random.default_rng(k))
    wait_indexed(items, N)
    check_exact(items, vecs, meta, k)


def test_filtered_search_on_hnsw_scans_the_matching_items_exactly(hnsw_client: TestClient) -> None:
    """An approximate index: subsets up to index_filter_scan_max are scanned, so exact too."""
    items = hnsw_client.app.state.items
    vecs, meta = fill(items, np.random.default_rng(5))
    wait_indexed(items, N)
    assert not items._follower.index.exact
    check_exact(items, vecs, meta, 10)


def test_items_written_by_another_process_are_searchable_within_a_second(
    client: TestClient, data_dir: Path, store_url: str | None
) -> None:
    items = client.app.state.items
    vec = unit(np.random.default_rng(7), 1)[0]
    script = (
        "import sys, numpy as np\n"
        "from service.items.backend import NewItem\n"
        "from service.items.reindex import open_backend\n"
        "from service.settings import Settings\n"
        "store = open_backend(Settings(data_dir=sys.argv[1], store_url=sys.argv[3] or None))\n"
        "store.add([NewItem('elsewhere', 'sha-x', 'image/png', {'by': 'job'})], {sys.argv[2]: np.asarray("
        f"{vec.tolist()!r}, dtype=np.float32)[None]}})\n"
        "store.close()\n"
    )
    subprocess.run([sys.executable, "-c", script, str(data_dir), MODEL_A, store_url or ""], check=True)
    committed = time.monotonic()
    while True:
        hits = client.post("/search", json={"vector": vec.tolist(), "k": 1}).json()["results"]
        if hits and hits[0]["id"] == "elsewhere":
            break
        assert time.monotonic() - committed < 1.0, "not visible within a second"
        time.sleep(0.02)
    assert hits[0]["metadata"] == {"by": "job"}
    assert items.stats()["index_size"] == 1


def add(client: TestClient, ids: list[str], images: list[bytes], metadata: list[dict]) -> None:
    files = [("files", (f"{i}.png", img, "image/png")) for i, img in zip(ids, images, strict=True)]
    r = client.post("/items", files=files, data={"ids": ids, "metadata": [json.dumps(m) for m in metadata]})
    assert r.status_code == 201, r.text


def noise(seed: int, n: int) -> list[bytes]:
    rng = np.random.default_rng(seed)
    return [png(rng.integers(0, 256, (32, 32, 3), dtype=np.uint8)) for _ in range(n)]


def test_search_options_patch_and_filter_errors_over_http(client: TestClient) -> None:
    images = noise(11, 12)
    ids = [f"p{i}" for i in range(12)]
    add(client, ids, images, [{"shop": "a" if i % 2 else "b", "n": i} for i in range(12)])

    by_form = client.post(
        "/search",
        files={"file": ("q.png", images[3], "image/png")},
        data={"k": "20", "filter": json.dumps({"shop": "a", "n": {"lte": 7}})},
    ).json()
    assert by_form["results"][0]["id"] == "p3"
    assert sorted(h["id"] for h in by_form["results"]) == ["p1", "p3", "p5", "p7"]

    own = client.post("/search", json={"item_id": "p4", "k": 3, "exclude_self": True}).json()["results"]
    assert "p4" not in [h["id"] for h in own] and len(own) == 3
    everything = client.post("/search", json={"item_id": "p4", "k": 12}).json()["results"]
    floor = everything[5]["score"]
    above = client.post("/search", json={"item_id": "p4", "k": 12, "min_score": floor}).json()["results"]
    assert [h["id"] for h in above] == [h["id"] for h in everything if h["score"] >= floor]

    batch = client.post("/search", json={"item_ids": ["p0", "p9"], "k": 2, "filter": {"shop": "a"}}).json()
    assert batch["model_id"] == MODEL_A and len(batch["results"]) == 2
    assert batch["results"][1][0]["id"] == "p9" and all(
        h["metadata"]["shop"] == "a" for r in batch["results"] for h in r
    )
    vectors = [[1.0] + [0.0] * (DIM - 1), [0.0, 1.0] + [0.0] * (DIM - 2)]
    by_vectors = client.post("/search", json={"vectors": vectors, "k": 4}).json()["results"]
    singles = [client.post("/search", json={"vector": v, "k": 4}).json()["results"] for v in vectors]
    assert by_vectors == singles

    patched = client.patch("/items/p2", json={"metadata": {"shop": "a", "label": 9}})
    assert patched.status_code == 200 and patched.json()["metadata"] == {"shop": "a", "n": 2, "label": 9}
    assert client.patch("/items/p2", json={"metadata": {"n": None}}).json()["metadata"] == {"shop": "a", "label": 9}
    assert client.patch("/items/p2", json={"metadata": {"z": 1}, "replace": True}).json()["metadata"] == {"z": 1}
    found = client.post("/search", json={"item_id": "p0", "k": 12, "filter": {"z": 1}}).json()["results"]
    assert [h["id"] for h in found] == ["p2"]  # searchable by its new metadata at once, no re-upload
    assert client.patch("/items/nope", json={"metadata": {}}).status_code == 404
    assert client.patch("/items/p2", json={"metadata": [1]}).status_code == 422

    def error(body: dict[str, Any]) -> tuple[int, str, str]:
        r = client.post("/search", json={"item_id": "p0", **body})
        err = r.json()["error"]
        return r.status_code, err["code"], err["message"]

    status, code, message = error({"filter": {"n": {"near": 3}}})
    assert (status, code) == (422, "invalid_filter") and "filter.n" in message and "near" in message
    assert error({"filter": {"n": {"gte": "3"}}})[:2] == (422, "invalid_filter")
    assert "filter.shop" in error({"filter": {"shop": {"in": "a"}}})[2]
    assert "filter.tags" in error({"filter": {"tags": [1, 2]}})[2]
    assert error({"filter": {"bad name": 1}})[:2] == (422, "invalid_filter")
    assert error({"filter": [1]})[0] == 422
    assert error({"exclude_self": True, "item_id": None, "vector": [1.0] * DIM})[0] == 422
    assert error({"min_score": 2})[0] == 422
    form = client.post("/search", files={"file": ("q.png", images[0], "image/png")}, data={"filter": "{nope"})
    assert form.status_code == 422 and form.json()["error"]["code"] == "invalid_filter"


def test_a_heavily_deleted_hnsw_index_is_compacted_in_the_background(hnsw_client: TestClient) -> None:
    """Past 20% tombstones the served HNSW index is rebuilt from the store while the old one
    serves; afterwards it holds fewer tombstones than the deletions (deletions that arrive
    during the rebuild are tombstones of the new index) and every live item finds itself."""
    items = hnsw_client.app.state.items
    vecs, _ = fill(items, np.random.default_rng(8))
    wait_indexed(items, N)
    deadline = time.monotonic() + 60
    while items._follower.index.pending:  # in the graph, where a deletion is a tombstone (fresh ones go at once)
        assert time.monotonic() < deadline, "the fresh buffer was not inserted into the graph"
        time.sleep(0.05)
    old = items._follower
    live = [i for i in range(N) if i % 3]
    for i in range(0, N, 3):  # a third deleted
        items.store.delete(f"it-{i}")
    deadline = time.monotonic() + 60
    while items._follower is old or items.stats()["index_size"] != len(live):
        assert time.monotonic() < deadline, "not compacted"
        time.sleep(0.1)
    index = items._follower.index
    assert index.upkeep_due() is None and len(index._tombstones) < N - len(live)
    _, found = index.search(vecs[live[:200]], 1)
    pks = [items.store.get(f"it-{i}").pk for i in live[:200]]
    assert np.mean(found[:, 0] == np.asarray(pks)) > 0.95


def test_a_grown_ivf_index_is_retrained_in_the_background_with_more_lists(
    data_dir: Path, store_url: str | None
) -> None:
    """`IVFauto,Flat` trains at 500 vectors (nlist_for(500) lists); at 4x that the served
    index is rebuilt from the store with the lists its size calls for, while the old one
    serves, and every item still finds itself."""
    import faiss

    settings = make_settings(
        data_dir, index_factory="IVFauto,Flat", index_min_train_vectors=500, index_search_params="nprobe=64",
        store_url=store_url,
    )  # fmt: skip
    with TestClient(create_app(settings), raise_server_exceptions=False) as c:
        items = c.app.state.items
        vecs, _ = fill(items, np.random.default_rng(9), first_indexed=True)  # trained at 500, 4x at 2,000
        deadline = time.monotonic() + 60
        while True:
            index = items._follower.index
            if index.ntotal == N and index.upkeep_due() is None and index.trained_on >= 2000:
                break
            assert time.monotonic() < deadline, (index.kind, index.ntotal, index.trained_on)
            time.sleep(0.1)
        lists = faiss.extract_index_ivf(index._index).nlist
        assert lists == nlist_for(index.trained_on) > nlist_for(500)
        _, found = index.search(vecs[:300], 1)
        pks = [items.store.get(f"it-{i}").pk for i in range(300)]
        assert np.mean(found[:, 0] == np.asarray(pks)) > 0.95
