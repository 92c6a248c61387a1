"""/items and /search through the real app (lifespan, ONNX Runtime, SQLite, FAISS)."""

from __future__ import annotations

import json
import threading

import numpy as np
import pytest
from fastapi.testclient import TestClient

from service.app import create_app
from tests.service.conftest import MODEL_A, MODEL_B, make_settings, png


def noise(seed: int, n: int) -> list[bytes]:
    rng = np.random.default_rng(seed)
    return [png(rng.integers(0, 256, (32, 32, 3), dtype=np.uint8)) for _ in range(n)]


def add(client: TestClient, ids: list[str], images: list[bytes], metadata: list[dict] | None = None, **params):
    files = [("files", (f"{i}.png", img, "image/png")) for i, img in zip(ids, images)]
    data = {"ids": ids}
    if metadata is not None:
        data["metadata"] = [json.dumps(m) for m in metadata]
    return client.post("/items", files=files, data=data, params=params)


def search_image(client: TestClient, image: bytes, k: int = 3):
    return client.post("/search", files={"file": ("q.png", image, "image/png")}, data={"k": str(k)})


def test_add_get_image_list_delete(client: TestClient) -> None:
    images = noise(0, 5)
    ids = [f"img-{i}" for i in range(5)]
    r = add(client, ids, images, [{"n": i} for i in range(5)])
    assert r.status_code == 201, r.text
    assert r.json() == {"ids": ids, "count": 5}

    item = client.get("/items/img-3").json()
    assert item["metadata"] == {"n": 3} and item["models"] == [MODEL_A] and item["content_type"] == "image/png"
    original = client.get(item["image_url"])
    assert original.status_code == 200 and original.content == images[3]
    assert original.headers["content-type"] == "image/png"

    pages = [client.get("/items", params={"offset": o, "limit": 2}).json() for o in (0, 2, 4)]
    assert [i["id"] for p in pages for i in p["items"]] == ids
    assert [p["next_offset"] for p in pages] == [2, 4, None] and pages[0]["total"] == 5
    assert all(i["models"] == [MODEL_A] for p in pages for i in p["items"])  # the list says what GET /items/{id} says

    for i, image in enumerate(images):  # each image finds itself first
        hits = search_image(client, image).json()
        assert hits["model_id"] == MODEL_A and hits["results"][0]["id"] == ids[i]
        assert hits["results"][0]["metadata"] == {"n": i}
        assert hits["results"][0]["score"] == pytest.approx(1.0, abs=1e-5)

    assert client.delete("/items/img-3").status_code == 204
    assert client.get("/items/img-3").status_code == 404
    assert client.delete("/items/img-3").json()["error"]["code"] == "item_not_found"
    hits = search_image(client, images[3], k=10).json()["results"]
    assert "img-3" not in [h["id"] for h in hits] and len(hits) == 4
    assert client.get("/items").json()["total"] == 4


def test_search_by_vector_and_item_match_brute_force(client: TestClient) -> None:
    ids = [f"v{i}" for i in range(30)]
    assert add(client, ids, noise(1, 30)).status_code == 201
    embedded = client.post("/embed", files=[("files", ("a.png", img, "image/png")) for img in noise(1, 30)]).json()
    vectors = np.asarray(embedded["embeddings"], dtype=np.float64)  # [30, D]
    query = np.random.default_rng(9).standard_normal(vectors.shape[1])
    hits = client.post("/search", json={"vector": query.tolist(), "k": 7}).json()["results"]
    expected = np.argsort(-(vectors @ (query / np.linalg.norm(query))))[:7]
    assert [h["id"] for h in hits] == [ids[i] for i in expected]
    by_item = client.post("/search", json={"item_id": "v4", "k": 1}).json()["results"]
    assert by_item[0]["id"] == "v4"


def test_duplicates_replace_and_errors(client: TestClient) -> None:
    a, b = noise(2, 2)
    assert add(client, ["x"], [a]).status_code == 201
    dup = add(client, ["x"], [b])
    assert dup.status_code == 409 and dup.json()["error"]["code"] == "item_exists"
    assert add(client, ["x"], [b], replace="true").status_code == 201
    assert client.get("/items/x/image").content == b
    assert search_image(client, b, 1).json()["results"][0]["id"] == "x"
    assert len(search_image(client, a, 5).json()["results"]) == 1  # the replaced vector is gone

    def code(r) -> tuple[int, str]:
        return r.status_code, r.json()["error"]["code"]

    assert code(add(client, ["a" * 257], [a])) == (422, "invalid_item_id")
    assert code(add(client, ["bad\nid"], [a])) == (422, "invalid_item_id")
    assert code(add(client, ["p", "q"], [a])) == (422, "ids_mismatch")
    assert code(add(client, ["p", "p"], [a, b])) == (422, "duplicate_ids")
    assert code(add(client, ["p"], [a], [[1, 2]])) == (422, "invalid_metadata")
    assert code(add(client, ["p"], [b"not an image"])) == (415, "unsupported_format")
    assert code(client.post("/search", json={"vector": [1.0, 2.0], "k": 3})) == (422, "wrong_dimension")
    assert code(client.post("/search", json={"item_id": "nope"})) == (404, "item_not_found")
    assert code(client.post("/search", json={"item_id": "x", "k": 0}))[0] == 422
    assert code(client.post("/search", json={"item_id": "x", "k": 1001}))[0] == 422
    ambiguous = client.post("/search", files={"file": ("q.png", a, "image/png")}, data={"item_id": "x", "k": "2"})
    assert code(ambiguous) == (422, "unexpected_fields") and "item_id" in ambiguous.json()["error"]["message"]
    two_k = client.post("/search", files=[("file", ("q.png", a, "image/png")), ("k", (None, "1")), ("k", (None, "2"))])
    assert code(two_k) == (422, "invalid_request")
    assert code(client.post("/search", json={"k": 3}))[0] == 422
    assert code(client.post("/search", content=b"{nope", headers={"content-type": "application/json"})) == (
        422,
        "malformed_json",
    )
    assert code(client.post("/search", files={"file": ("q.png", a, "image/png")}, data={"k": "x"}))[0] == 422
    assert client.get("/items", params={"limit": 0}).status_code == 422
    assert client.get("/items/x").status_code == 200  # still answering
    assert client.get("/items").json()["total"] == 1  # nothing half-written by the failures


def test_empty_index_gives_empty_results(client: TestClient) -> None:
    r = client.post("/search", json={"vector": [0.5] * 24, "k": 5})
    assert r.status_code == 200 and r.json() == {"model_id": MODEL_A, "results": []}


def test_activation_reembeds_and_swaps_when_complete(client: TestClient) -> None:
    images = noise(3, 12)
    ids = [f"m{i}" for i in range(12)]
    assert add(client, ids, images).status_code == 201
    r = client.post(f"/models/{MODEL_B}/activate")
    assert r.status_code == 200, r.text
    items = client.app.state.items
    seen = set()
    for _ in range(400):  # search answers throughout, from A until B is complete
        answer = search_image(client, images[0], 1)
        assert answer.status_code == 200, answer.text
        hit = answer.json()
        seen.add(hit["model_id"])
        assert hit["results"][0]["id"] == "m0"
        if items.served == MODEL_B:
            break
    assert items.served == MODEL_B and items.pending is None
    assert client.get("/items/m5").json()["models"] == [MODEL_A, MODEL_B]
    listed = client.get("/items", params={"limit": 1000}).json()["items"]
    assert {i["id"]: i["models"] for i in listed if i["id"] in ids} == {i: [MODEL_A, MODEL_B] for i in ids}
    for i, image in enumerate(images):
        assert search_image(client, image, 1).json() == {
            "model_id": MODEL_B,
            "results": [{"id": ids[i], "score": pytest.approx(1.0, abs=1e-5), "metadata": None}],
        }


def test_ids_with_slashes_are_whole_urls(client: TestClient) -> None:
    """Bulk indexing makes ids of relative paths: `/items/{id}` takes the rest of the URL path."""
    a, b = noise(7, 2)
    assert add(client, ["cats/a.png", "cats"], [a, b]).status_code == 201
    assert client.get("/items/cats/a.png").json()["id"] == "cats/a.png"
    assert client.get("/items/cats").json()["id"] == "cats"
    assert client.get("/items/cats/a.png/image").content == a
    patched = client.patch("/items/cats/a.png", json={"metadata": {"n": 1}})
    assert patched.status_code == 200 and patched.json()["metadata"] == {"n": 1}
    refused = client.delete("/items/cats/a.png/image")
    assert (refused.status_code, refused.headers["allow"]) == (405, "GET")
    assert client.delete("/items/cats/a.png").status_code == 204
    assert client.get("/items/cats/a.png").status_code == 404 and client.get("/items/cats").status_code == 200
    for bad in ("/lead", "trail/", "two//parts", "x/image"):
        answer = add(client, [bad], [a])
        assert (answer.status_code, answer.json()["error"]["code"]) == (422, "invalid_item_id"), bad


def test_originals_are_swept_only_when_unreferenced_and_never_under_an_add(data_dir, store_url) -> None:
    """Deleting an item leaves its original to the sweep; a sweep deleting a file holds off an
    add of the same bytes (on any host) until it has finished, and the add then writes it again."""
    settings = make_settings(data_dir, store_url=store_url, originals_grace_s=0.0, originals_sweep_s=3600.0)
    images = noise(11, 2)
    with TestClient(create_app(settings), raise_server_exceptions=False) as client:
        items = client.app.state.items
        assert add(client, ["x", "y"], images).status_code == 201
        x_file, y_file = (items.blobs.path(items.get(i).sha256) for i in ("x", "y"))
        assert client.delete("/items/x").status_code == 204
        assert x_file.is_file()  # left to the sweep
        assert items.sweep_originals() == 1 and not x_file.exists() and y_file.is_file()

        assert client.delete("/items/y").status_code == 204
        claimed = items.store.claim_orphans(0.0)  # another host's sweep, mid-way: claimed, file not yet deleted
        assert claimed == [items.blobs.digest(images[1])]
        answer: dict[str, int] = {}
        adder = threading.Thread(target=lambda: answer.update(code=add(client, ["y2"], images[1:]).status_code))
        adder.start()
        adder.join(timeout=0.5)
        assert adder.is_alive() and "code" not in answer  # held off while the sweep holds the original
        y_file.unlink()  # the sweep deletes the file the add found present, then finishes
        items.store.finish_orphans(claimed)
        adder.join(timeout=10)
        assert answer == {"code": 201}
        assert client.get(client.get("/items/y2").json()["image_url"]).content == images[1]
