"""GET /models and POST /models/{id}/activate: listing, swap, unknown ids, corrupt files, no model."""

from __future__ import annotations

from pathlib import Path

import numpy as np
from fastapi.testclient import TestClient

from service.app import create_app
from tests.service.conftest import MODEL_A, MODEL_B, direct_ort, make_settings, multipart, parse_vectors, png


def test_list_marks_the_active_model(client: TestClient) -> None:
    body = client.get("/models").json()
    assert body["active"] == MODEL_A
    flags = {m["model_id"]: m["active"] for m in body["models"]}
    assert flags == {MODEL_A: True, MODEL_B: False}
    assert [m["model_id"] for m in body["models"]] == [MODEL_B, MODEL_A]  # newest first
    assert all(len(m["sha256"]) == 64 for m in body["models"])


def test_activate_swaps_the_serving_model(client: TestClient, data_dir: Path, photos: np.ndarray) -> None:
    r = client.post(f"/models/{MODEL_B}/activate")
    assert r.status_code == 200 and r.json()["active"] == MODEL_B
    assert (data_dir / "models" / "active").read_text().strip() == MODEL_B
    embedded = client.post("/embed", files=multipart([png(photos[0])]))
    assert embedded.json()["model_id"] == MODEL_B
    np.testing.assert_allclose(parse_vectors(embedded), direct_ort(data_dir, MODEL_B, photos[:1]), atol=1e-6)
    assert client.get("/models").json()["active"] == MODEL_B


def test_unknown_and_invalid_ids_are_404(client: TestClient) -> None:
    for model_id in ("nope", "..x", "a b"):
        r = client.post(f"/models/{model_id}/activate")
        assert r.status_code == 404, (model_id, r.text)
        assert r.json()["error"]["code"] == "model_not_found"


def test_corrupt_model_is_refused_with_409_and_nothing_changes(client: TestClient, data_dir: Path) -> None:
    with open(data_dir / "models" / MODEL_B / "model.onnx", "ab") as fh:
        fh.write(b"tampered")
    r = client.post(f"/models/{MODEL_B}/activate")
    assert r.status_code == 409
    assert r.json()["error"]["code"] == "model_integrity_error"
    assert "sha256" in r.json()["error"]["message"]
    assert (data_dir / "models" / "active").read_text().strip() == MODEL_A
    assert client.get("/models").json()["active"] == MODEL_A


def test_no_active_model_is_503_with_a_way_out(data_dir: Path, photos: np.ndarray) -> None:
    (data_dir / "models" / "active").unlink()
    with TestClient(create_app(make_settings(data_dir)), raise_server_exceptions=False) as client:
        r = client.post("/embed", files=multipart([png(photos[0])]))
        assert r.status_code == 503
        error = r.json()["error"]
        assert error["code"] == "no_active_model"
        assert "/train-jobs" in error["message"] and "activate" in error["message"]
        assert client.get("/readyz").status_code == 503
        assert client.post(f"/models/{MODEL_A}/activate").status_code == 200
        assert client.post("/embed", files=multipart([png(photos[0])])).status_code == 200


def test_corrupt_active_model_at_start_leaves_the_server_up(data_dir: Path, photos: np.ndarray) -> None:
    (data_dir / "models" / MODEL_A / "model.onnx").write_bytes(b"not onnx")
    with TestClient(create_app(make_settings(data_dir)), raise_server_exceptions=False) as client:
        assert client.get("/healthz").status_code == 200
        ready = client.get("/readyz")
        assert ready.status_code == 503 and "sha256" in ready.json()["checks"]["model"]
        r = client.post("/embed", files=multipart([png(photos[0])]))
        assert r.status_code == 503 and "sha256" in r.json()["error"]["message"]
