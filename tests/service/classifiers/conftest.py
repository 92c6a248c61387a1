"""Fixtures of the classifier tests: three classes of real colour photo patches, indexed; the
API and store tests run on both item-store backends (tests/service/backends.py), since the
classifiers are tables of the item store."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest
from fastapi.testclient import TestClient

from tests.service.backends import client, store, store_url
from tests.service.conftest import png

__all__ = ["client", "store", "store_url"]  # fixtures: `client` runs on the test's backend

N_PER_CLASS, CLASSES = 12, (0, 1, 2)
NAMES = {0: "china", 1: "flower", 2: "inverted china"}


def three_classes(photos_path: Path) -> tuple[np.ndarray, np.ndarray]:
    """Real colour photo patches of three kinds: patches of china.jpg, of flower.jpg, and
    china patches with their colours inverted. uint8 [M, 32, 32, 3], labels [M]."""
    with np.load(photos_path) as data:
        x, y = data["x_train"], data["y_train"]
    china = x[y == 0]
    return np.concatenate([x, 255 - china]), np.concatenate([y, np.full(len(china), 2, np.int64)])


@pytest.fixture(scope="module")
def labeled(photos_path: Path) -> tuple[np.ndarray, np.ndarray]:
    """12 images per class for 3 classes, uint8 [36, 32, 32, 3], labels [36]."""
    x, y = three_classes(photos_path)
    picks = np.concatenate([np.flatnonzero(y == c)[:N_PER_CLASS] for c in CLASSES])
    return np.ascontiguousarray(x[picks]), y[picks].astype(np.int64)


@pytest.fixture(scope="module")
def queries(photos_path: Path) -> np.ndarray:
    """Six other images of those classes (never examples)."""
    x, y = three_classes(photos_path)
    return np.ascontiguousarray(x[np.concatenate([np.flatnonzero(y == c)[50:52] for c in CLASSES])])


def index(client: TestClient, images: np.ndarray, labels: np.ndarray) -> list[str]:
    ids = [f"c{i}" for i in range(len(images))]
    files = [("files", (f"{i}.png", png(im), "image/png")) for i, im in zip(ids, images, strict=True)]
    meta = [json.dumps({"label": NAMES[int(c)]}) for c in labels]
    r = client.post("/items", files=files, data={"ids": ids, "metadata": meta})
    assert r.status_code == 201, r.text
    return ids


@pytest.fixture
def indexed(client: TestClient, labeled: tuple[np.ndarray, np.ndarray]) -> list[str]:
    return index(client, *labeled)
