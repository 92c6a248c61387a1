"""/classifiers through the real app: real colour photo patches indexed with real ONNX encoders, the
fit checked against scikit-learn on the vectors ONNX Runtime gives directly, refit on
activation, restart durability, and every error the issue lists."""

from __future__ import annotations

import base64
from pathlib import Path

import numpy as np
import pytest
from fastapi.testclient import TestClient
from sklearn.linear_model import LogisticRegression

from service.app import create_app
from service.classifiers.fit import unit_rows
from tests._procs import wait_until
from tests.service.classifiers.conftest import CLASSES, N_PER_CLASS, NAMES, index
from tests.service.conftest import MODEL_A, MODEL_B, direct_ort, make_settings, png


def reference_proba(data_dir: Path, model_id: str, labeled, queries: np.ndarray, C: float) -> np.ndarray:
    """scikit-learn on what ONNX Runtime alone gives: the independent computation."""
    x = unit_rows(direct_ort(data_dir, model_id, labeled[0]))
    ref = LogisticRegression(C=C, tol=1e-12, max_iter=100000).fit(x, labeled[1])
    return ref.predict_proba(unit_rows(direct_ort(data_dir, model_id, queries)))


def test_create_from_label_key_and_predict_equals_direct_computation(
    client: TestClient, data_dir: Path, indexed: list[str], labeled, queries: np.ndarray
) -> None:
    r = client.post("/classifiers", json={"name": "cifar3", "label_key": "label"})
    assert r.status_code == 201, r.text
    made = r.json()
    assert made["model_id"] == MODEL_A and made["method"] == "logreg" and made["examples"] == 36
    assert made["classes"] == [{"label": NAMES[c], "count": N_PER_CLASS} for c in CLASSES]
    cv = made["cv"]
    assert cv["n_folds"] == 5 and len(cv["fold_accuracies"]) == 5
    assert cv["accuracy"] == pytest.approx(np.mean(cv["fold_accuracies"]))
    assert cv["std"] == pytest.approx(np.std(cv["fold_accuracies"]))
    assert [sum(row) for row in cv["confusion"]] == [N_PER_CLASS] * 3  # out-of-fold: every example once
    assert [f["model_id"] for f in made["fits"]] == [MODEL_A]

    # Images by multipart, images by base64 JSON, and items by id: one answer each, in order.
    files = [("files", (f"q{i}.png", png(q), "image/png")) for i, q in enumerate(queries)]
    by_file = client.post(f"/classifiers/{made['id']}/predict", files=files, data={"top_k": "3"})
    assert by_file.status_code == 200, by_file.text
    body = by_file.json()
    assert (body["classifier_id"], body["model_id"], body["fit_id"]) == (made["id"], MODEL_A, made["fit_id"])
    expected = reference_proba(data_dir, MODEL_A, labeled, queries, cv["C"])  # [6, 3], classes sorted
    labels = [NAMES[c] for c in CLASSES]
    for p, row, name in zip(body["predictions"], expected, [f"q{i}.png" for i in range(6)], strict=True):
        assert p["input"] == name
        got = {t["label"]: t["probability"] for t in p["top_k"]}
        np.testing.assert_allclose([got[label] for label in labels], row, atol=2e-4)
        assert p["label"] == labels[int(np.argmax(row))] and p["probability"] == pytest.approx(row.max(), abs=2e-4)
        assert [t["probability"] for t in p["top_k"]] == sorted(got.values(), reverse=True)

    b64 = [base64.b64encode(png(q)).decode() for q in queries[:2]]
    by_json = client.post(f"/classifiers/{made['id']}/predict", json={"images": b64, "top_k": 1}).json()
    # The same images: the same answers, up to the last bits a different batch size moves in BLAS.
    for got_json, got_file in zip(by_json["predictions"], body["predictions"][:2], strict=True):
        assert [t["label"] for t in got_json["top_k"]] == [got_file["top_k"][0]["label"]]
        assert got_json["probability"] == pytest.approx(got_file["probability"], rel=1e-12)

    by_id = client.post(f"/classifiers/{made['id']}/predict", json={"item_ids": ["c0", "c20"]})
    assert by_id.status_code == 200, by_id.text
    direct = reference_proba(data_dir, MODEL_A, labeled, labeled[0][[0, 20]], cv["C"])
    for p, row in zip(by_id.json()["predictions"], direct, strict=True):
        assert p["probability"] == pytest.approx(row.max(), abs=2e-4)

    assert client.get(f"/classifiers/{made['id']}").json() == made
    assert [c["id"] for c in client.get("/classifiers").json()["classifiers"]] == [made["id"]]
    assert client.delete(f"/classifiers/{made['id']}").status_code == 204
    assert client.get(f"/classifiers/{made['id']}").json()["error"]["code"] == "classifier_not_found"
    assert client.get("/classifiers").json() == {"classifiers": []}


def test_knn_from_examples_and_durable_across_restart(
    data_dir: Path, store_url: str | None, labeled, queries: np.ndarray
) -> None:
    settings = make_settings(data_dir, store_url=store_url)
    with TestClient(create_app(settings), raise_server_exceptions=False) as client:
        ids = index(client, *labeled)
        examples = [{"item_id": i, "label": int(c)} for i, c in zip(ids, labeled[1], strict=True)]
        r = client.post("/classifiers", json={"name": "knn3", "method": "knn", "examples": examples})
        assert r.status_code == 201, r.text
        made = r.json()
        assert [c["label"] for c in made["classes"]] == list(CLASSES) and made["cv"]["C"] is None
        first = client.post(
            f"/classifiers/{made['id']}/predict", files=[("files", ("q.png", png(queries[0]), "image/png"))]
        )
    with TestClient(create_app(settings), raise_server_exceptions=False) as client:
        assert client.get(f"/classifiers/{made['id']}").json() == made
        again = client.post(
            f"/classifiers/{made['id']}/predict", files=[("files", ("q.png", png(queries[0]), "image/png"))]
        )
        assert again.json() == first.json()
    # kNN by hand on the direct vectors: weights exp(cos / 0.07) over the 20 nearest.
    x = unit_rows(direct_ort(data_dir, MODEL_A, labeled[0]))
    q = unit_rows(direct_ort(data_dir, MODEL_A, queries[:1]))[0]
    sims = x @ q
    nearest = np.argsort(-sims)[:20]
    votes = np.zeros(3)
    for j in nearest:
        votes[labeled[1][j]] += np.exp((sims[j] - sims[nearest[0]]) / 0.07)
    top = first.json()["predictions"][0]
    assert top["label"] == int(np.argmax(votes))
    assert top["probability"] == pytest.approx(votes.max() / votes.sum(), abs=1e-4)


def test_refits_when_another_model_is_served(client: TestClient, data_dir: Path, indexed, labeled, queries) -> None:
    made = client.post("/classifiers", json={"name": "swap", "label_key": "label"}).json()
    assert made["model_id"] == MODEL_A
    assert client.post(f"/models/{MODEL_B}/activate").status_code == 200

    def refitted() -> dict | None:
        now = client.get(f"/classifiers/{made['id']}").json()
        return now if now["model_id"] == MODEL_B else None

    now = wait_until(refitted, 60, "the classifier to be refitted on model B")
    assert [f["model_id"] for f in now["fits"]] == [MODEL_B, MODEL_A] and now["fit_id"] != made["fit_id"]
    assert now["examples"] == 36
    answer = client.post(
        f"/classifiers/{made['id']}/predict", files=[("files", ("q.png", png(queries[0]), "image/png"))]
    ).json()
    assert (answer["model_id"], answer["fit_id"]) == (MODEL_B, now["fit_id"])
    row = reference_proba(data_dir, MODEL_B, labeled, queries[:1], now["cv"]["C"])[0]
    assert answer["predictions"][0]["probability"] == pytest.approx(row.max(), abs=2e-4)


def test_errors(client: TestClient, indexed: list[str]) -> None:
    def create(**body):
        return client.post("/classifiers", json={"name": "e", **body})

    def code(r) -> tuple[int, str]:
        return r.status_code, r.json()["error"]["code"]

    two = [{"item_id": "c0", "label": "a"}, {"item_id": "c1", "label": "a"}]
    assert code(create(examples=two)) == (422, "one_class")
    assert code(create(examples=[*two, {"item_id": "c12", "label": "b"}])) == (422, "too_few_examples")
    bad = create(examples=[*two, {"item_id": "nope-1", "label": "b"}, {"item_id": "nope-2", "label": "b"}])
    assert code(bad) == (422, "unknown_items")
    assert "'nope-1', 'nope-2'" in bad.json()["error"]["message"]
    for label in (1.5, True, None, ["x"], {"a": 1}):
        assert code(create(examples=[*two, {"item_id": "c12", "label": label}])) == (422, "invalid_label"), label
    assert code(create(examples=[*two, {"item_id": "c0", "label": "b"}])) == (422, "conflicting_labels")
    assert code(create(label_key="no-such-field")) == (422, "no_examples")
    assert code(create()) == (422, "invalid_request")  # neither examples nor label_key
    assert code(create(label_key="label", method="svm")) == (422, "invalid_request")

    made = create(label_key="label").json()
    assert code(create(label_key="label")) == (409, "classifier_exists")
    url = f"/classifiers/{made['id']}/predict"
    assert code(client.post("/classifiers/missing/predict", json={"item_ids": ["c0"]})) == (404, "classifier_not_found")
    assert code(client.post(url, json={"item_ids": ["c0", "ghost"]})) == (422, "unknown_items")
    assert code(client.post(url, json={"item_ids": []})) == (422, "invalid_request")
    assert code(client.post(url, json={"item_ids": ["c0"], "top_k": 0})) == (422, "invalid_request")
    assert code(client.post(url, json={"images": []})) == (422, "no_images")
    assert code(
        client.post(url, json={"images": [base64.b64encode(png(np.zeros((8, 8, 3), np.uint8))).decode()], "extra": 1})
    ) == (422, "unexpected_fields")
    assert code(client.post(url, content=b"{", headers={"content-type": "application/json"})) == (422, "malformed_json")
    assert code(client.post(url, files=[("files", ("x.png", b"not an image", "image/png"))])) == (
        415,
        "unsupported_format",
    )
    assert code(client.delete("/classifiers/missing")) == (404, "classifier_not_found")


def test_items_without_vectors_under_the_bound_model(client: TestClient, data_dir: Path, indexed: list[str]) -> None:
    """An item that has no vector under the served model (its row removed behind the store's back): 409."""
    with client.app.state.items.store.transaction() as db:  # type: ignore[attr-defined]
        db.execute("DELETE FROM vectors WHERE item = (SELECT pk FROM items WHERE id = 'c5')")
    r = client.post("/classifiers", json={"name": "gap", "label_key": "label"})
    assert (r.status_code, r.json()["error"]["code"]) == (409, "items_not_embedded")
    assert "'c5'" in r.json()["error"]["message"]


@pytest.fixture
def finetuned_model(data_dir: Path, photos: np.ndarray) -> str:
    """A fine-tuned classifier model (3 classes) published as a fine-tuning job publishes one."""
    import torch
    from torch import nn

    from service.contract.imaging import ResizePolicy
    from service.contract.registry import ModelCard, ModelRegistry
    from tests.service.conftest import DIM, SIZE, TinyEncoder
    from trainer.export import export_classifier
    from trainer.finetune import FinetunedClassifier

    torch.manual_seed(3)
    model = FinetunedClassifier(TinyEncoder(5), nn.Identity(), DIM, 3).eval()
    card = ModelCard(
        model_id="ft-3",
        method="simclr",
        backbone="tiny-cnn",
        input_size=SIZE,
        embedding_dim=DIM,
        resize_policy=ResizePolicy(SIZE).to_json(),
        created_at="2024-01-02T00:00:00Z",
        metrics={"val_accuracy": 0.625, "labels": 30, "val_images": 8},
        kind="classifier",
        classes=["plane", "car", "bird"],
        val_confusion=[[3, 0, 0], [1, 1, 0], [0, 2, 1]],
        label_counts=[10, 10, 10],
    )
    path = data_dir / "ft.onnx"
    export_classifier(model, path, card=card, parity_images=photos[:16])
    ModelRegistry(data_dir / "models").publish(path, card, activate=False)
    return "ft-3"


def test_finetuned_model_as_a_classifier(
    client: TestClient, data_dir: Path, finetuned_model: str, indexed: list[str], queries: np.ndarray
) -> None:
    import onnxruntime as ort
    from PIL import Image

    from service.contract.imaging import ResizePolicy
    from tests.service.conftest import SIZE

    models = {m["model_id"]: m for m in client.get("/models").json()["models"]}
    assert models[finetuned_model]["kind"] == "classifier" and models[MODEL_A]["kind"] == "encoder"
    refused = client.post(f"/models/{finetuned_model}/activate")
    assert (refused.status_code, refused.json()["error"]["code"]) == (409, "not_an_encoder")
    assert client.get("/models").json()["active"] == MODEL_A

    r = client.post("/classifiers", json={"name": "ft", "method": "finetune", "model_id": finetuned_model})
    assert r.status_code == 201, r.text
    made = r.json()
    assert made["model_id"] == finetuned_model and made["examples"] == 30
    assert made["classes"] == [{"label": c, "count": 10} for c in ("plane", "car", "bird")]
    assert made["cv"] == {
        "kind": "validation",
        "accuracy": 0.625,
        "std": None,
        "n_folds": 0,
        "fold_accuracies": [],
        "confusion": [[3, 0, 0], [1, 1, 0], [0, 2, 1]],
        "C": None,
    }

    session = ort.InferenceSession(str(data_dir / "models" / finetuned_model / "model.onnx"))
    expected = session.run(
        ["probabilities"], {"images": ResizePolicy(SIZE).batch([Image.fromarray(q) for q in queries])}
    )[0]
    files = [("files", (f"q{i}.png", png(q), "image/png")) for i, q in enumerate(queries)]
    answer = client.post(f"/classifiers/{made['id']}/predict", files=files, data={"top_k": "3"}).json()
    assert answer["model_id"] == finetuned_model
    for p, row in zip(answer["predictions"], expected, strict=True):
        got = {t["label"]: t["probability"] for t in p["top_k"]}
        np.testing.assert_allclose([got[c] for c in ("plane", "car", "bird")], row, atol=1e-6)
    by_item = client.post(f"/classifiers/{made['id']}/predict", json={"item_ids": ["c3"], "top_k": 1}).json()
    original = client.get("/items/c3/image").content
    by_image = client.post(f"/classifiers/{made['id']}/predict", files=[("files", ("c3.png", original, "image/png"))])
    assert by_item["predictions"][0]["top_k"] == by_image.json()["predictions"][0]["top_k"][:1]

    bad = client.post("/classifiers", json={"name": "x", "method": "finetune", "model_id": MODEL_A})
    assert (bad.status_code, bad.json()["error"]["code"]) == (422, "not_a_classifier_model")
    gone = client.post("/classifiers", json={"name": "x", "method": "finetune", "model_id": "nope"})
    assert (gone.status_code, gone.json()["error"]["code"]) == (404, "model_not_found")
    mixed = client.post("/classifiers", json={"name": "x", "method": "finetune", "model_id": "ft-3", "label_key": "l"})
    assert mixed.status_code == 422
