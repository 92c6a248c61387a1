"""/healthz, /readyz (model, index, broker) and /metrics."""

from __future__ import annotations

from pathlib import Path

import numpy as np
from _procs import RedisServer
from fastapi.testclient import TestClient

from service.app import create_app
from tests.service.conftest import MODEL_A, make_settings, multipart, png


def test_healthz_always_answers(client: TestClient) -> None:
    assert client.get("/healthz").json() == {"status": "ok"}


def test_readyz_is_ready_without_a_broker_configured(client: TestClient) -> None:
    r = client.get("/readyz")
    assert r.status_code == 200, r.text
    body = r.json()
    assert body["status"] == "ready"
    assert body["checks"]["model"] == f"ok: {MODEL_A}"
    assert body["checks"]["index"].startswith("ok")
    assert body["checks"]["broker"].startswith("not configured")
    assert "simclr_embed_broker_up 0.0" in client.get("/metrics").text


def test_readyz_stays_ready_and_serving_works_while_the_broker_is_down(data_dir: Path, tmp_path: Path) -> None:
    """Readiness is about serving: with the broker stopped the replica stays ready, /embed and
    /search answer, the broker's state is in `checks` and the gauge, and job submission is 503."""
    (data_dir / "datasets").mkdir()
    np.savez(data_dir / "datasets" / "d.npz", x_train=np.zeros((8, 8, 8, 1), np.uint8))
    redis = RedisServer(tmp_path / "redis")
    redis.start()
    try:
        settings = make_settings(data_dir, broker_url=redis.url)
        with TestClient(create_app(settings), raise_server_exceptions=False) as client:
            r = client.get("/readyz")
            assert r.status_code == 200, r.text
            assert r.json()["checks"]["broker"] == "ok"
            assert "simclr_embed_broker_up 1.0" in client.get("/metrics").text
            image = png(np.full((40, 40, 3), 90, np.uint8))
            assert client.post("/items", files=multipart([image]), data={"ids": ["a"]}).status_code == 201

            redis.stop()
            down = client.get("/readyz")
            assert down.status_code == 200, down.text
            assert down.json()["status"] == "ready"
            assert down.json()["checks"]["broker"].startswith("does not answer")
            assert "simclr_embed_broker_up 0.0" in client.get("/metrics").text
            embedded = client.post("/embed", files=multipart([image]))
            assert embedded.status_code == 200 and len(embedded.json()["embeddings"]) == 1
            hits = client.post("/search", json={"item_id": "a", "k": 1})
            assert hits.status_code == 200 and hits.json()["results"][0]["id"] == "a"
            job = client.post("/train-jobs", json={"dataset": "d.npz"})
            assert job.status_code == 503 and job.json()["error"]["code"] == "jobs_unavailable", job.text
    finally:
        redis.stop()


def test_metrics_show_routes_batches_and_active_model(client: TestClient, photos: np.ndarray) -> None:
    client.post("/embed", files=multipart([png(a) for a in photos[:3]]))
    client.get("/models/nope")  # unmatched path: one label, not one per path
    text = client.get("/metrics").text
    assert 'simclr_embed_request_duration_seconds_count{method="POST",route="/embed",status="200"} 1.0' in text
    assert 'route="<unmatched>"' in text and "nope" not in text
    assert f'simclr_embed_batch_size_sum{{model_id="{MODEL_A}"}} 3.0' in text
    assert (
        f'simclr_embed_active_model_info{{backbone="tiny-cnn",embedding_dim="24",method="simclr",model_id="{MODEL_A}",variant="fp32"}} 1.0'
        in text
    )
    assert f'simclr_embed_index_size{{model_id="{MODEL_A}"}} 0.0' in text
    assert f'simclr_embed_index_fresh_vectors{{model_id="{MODEL_A}"}} 0.0' in text
