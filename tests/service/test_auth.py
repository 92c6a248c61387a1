"""API keys on mutating routes (and optionally reads); CORS closed unless origins are set."""

from __future__ import annotations

from collections.abc import Iterator
from pathlib import Path

import numpy as np
import pytest
from fastapi.testclient import TestClient

from service.app import create_app
from tests.service.conftest import MODEL_B, make_settings, multipart, png


@pytest.fixture
def keyed(data_dir: Path) -> Iterator[TestClient]:
    settings = make_settings(data_dir, api_keys="key-one,key-two")
    with TestClient(create_app(settings), raise_server_exceptions=False) as client:
        yield client


def test_activation_needs_a_valid_key(keyed: TestClient) -> None:
    missing = keyed.post(f"/models/{MODEL_B}/activate")
    assert missing.status_code == 401 and missing.json()["error"]["code"] == "missing_api_key"
    assert missing.headers["www-authenticate"] == "Bearer"
    wrong = keyed.post(f"/models/{MODEL_B}/activate", headers={"Authorization": "Bearer key-three"})
    assert wrong.status_code == 401 and wrong.json()["error"]["code"] == "invalid_api_key"
    prefix = keyed.post(f"/models/{MODEL_B}/activate", headers={"X-API-Key": "key-on"})
    assert prefix.status_code == 401
    assert keyed.get("/models").json()["active"] != MODEL_B
    assert keyed.post(f"/models/{MODEL_B}/activate", headers={"Authorization": "Bearer key-two"}).status_code == 200
    assert keyed.post(f"/models/{MODEL_B}/activate", headers={"X-API-Key": "key-one"}).status_code == 200


def test_reads_are_open_unless_configured(keyed: TestClient, data_dir: Path, photos: np.ndarray) -> None:
    files = multipart([png(photos[0])])
    assert keyed.post("/embed", files=files).status_code == 200
    assert keyed.get("/models").status_code == 200
    settings = make_settings(data_dir, api_keys="key-one", require_key_for_reads=True)
    with TestClient(create_app(settings), raise_server_exceptions=False) as strict:
        assert strict.post("/embed", files=files).status_code == 401
        assert strict.get("/models").status_code == 401
        assert strict.post("/embed", files=files, headers={"X-API-Key": "key-one"}).status_code == 200
        assert strict.get("/healthz").status_code == 200  # probes never need a key


def test_without_keys_activation_is_open(client: TestClient) -> None:
    assert client.post(f"/models/{MODEL_B}/activate").status_code == 200


def test_cors_is_closed_unless_origins_are_listed(client: TestClient, data_dir: Path) -> None:
    preflight = {"Origin": "https://app.example", "Access-Control-Request-Method": "POST"}
    assert "access-control-allow-origin" not in client.options("/embed", headers=preflight).headers
    settings = make_settings(data_dir, cors_origins="https://app.example")
    with TestClient(create_app(settings)) as open_client:
        r = open_client.options("/embed", headers=preflight)
        assert r.headers["access-control-allow-origin"] == "https://app.example"
        other = open_client.options("/embed", headers={**preflight, "Origin": "https://evil.example"})
        assert "access-control-allow-origin" not in other.headers
