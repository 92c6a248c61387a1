"""/healthz, /readyz (model, index, broker) and /metrics."""

from __future__ import annotations

from pathlib import Path

import numpy as np
from _procs import RedisServer
from conftest import MODEL_A, make_settings, multipart, png
from fastapi.testclient import TestClient

from service.app import create_app


def test_healthz_always_answers(client: TestClient) -> None:
    assert client.get("/healthz").json() == {"status": "ok"}


def test_readyz_needs_a_broker(client: TestClient) -> None:
    r = client.get("/readyz")
    assert r.status_code == 503
    body = r.json()
    assert body["error"]["code"] == "not_ready"
    assert body["checks"]["model"] == f"ok: {MODEL_A}"
    assert body["checks"]["index"].startswith("ok")
    assert "broker" in body["error"]["message"]


def test_readyz_with_model_index_and_broker(data_dir: Path, tmp_path: Path) -> None:
    redis = RedisServer(tmp_path / "redis")
    redis.start()
    try:
        settings = make_settings(data_dir, broker_url=redis.url)
        with TestClient(create_app(settings), raise_server_exceptions=False) as client:
            r = client.get("/readyz")
            assert r.status_code == 200, r.text
            assert r.json()["checks"]["broker"] == "ok"
            redis.stop()
            down = client.get("/readyz")
            assert down.status_code == 503 and "broker" in down.json()["error"]["message"]
    finally:
        redis.stop()


def test_metrics_show_routes_batches_and_active_model(client: TestClient, cifar_images: np.ndarray) -> None:
    client.post("/embed", files=multipart([png(a) for a in cifar_images[:3]]))
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
