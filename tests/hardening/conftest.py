"""Hardening fixtures: the service's own tiny published ONNX encoders (tests/service/conftest.py,
reused, not copied), a private redis-server as the job broker, and an app whose limits are small
enough that hostile inputs hit them quickly.

`hardened_dir` is one data folder per module (models/ with `tiny-a` active and `tiny-b`,
datasets/ with one .npz; tests index a few items with `seed_items`), so the fuzzer and the
hostile-image tests exercise real embedding, real FAISS search and a real broker.
"""

from __future__ import annotations

import shutil
from pathlib import Path

import numpy as np
import pytest

from service.settings import Settings
from tests.service.conftest import (  # noqa: F401  (fixtures re-exported for this folder)
    Models,
    data_dir,
    make_settings,
    models,
    png,
)

API_KEY = "hardening-key-0123456789"
LIMITS = {"max_upload_bytes": 512 * 1024, "max_image_pixels": 4_000_000, "max_images_per_request": 8}
SEED_ITEMS = 6


def noise(h: int, w: int, seed: int = 0, channels: int = 3) -> np.ndarray:
    """uint8 [h, w, channels] uniform noise."""
    return np.random.default_rng(seed).integers(0, 256, (h, w, channels), dtype=np.uint8)


@pytest.fixture(scope="module")
def hardened_dir(models: Models, tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A module's data folder: the template registry plus datasets/tiny.npz (4 noise images), so
    /train-jobs can find a dataset under its root."""
    root = tmp_path_factory.mktemp("hardened") / "data"
    shutil.copytree(models.root, root)
    datasets = root / "datasets"
    datasets.mkdir()
    np.savez(datasets / "tiny.npz", x_train=noise(16, 16, 0)[None].repeat(4, axis=0))
    return root


def hardened_settings(data_dir: Path, broker_url: str | None = None, **overrides: object) -> Settings:
    """The app's settings with small limits (LIMITS) and an optional broker."""
    return make_settings(data_dir, broker_url=broker_url, **{**LIMITS, **overrides})


def seed_items(post: object, count: int = SEED_ITEMS) -> list[str]:
    """Index `count` noise images through POST /items (`post` is a client's bound post method)."""
    ids = [f"seed-{i}" for i in range(count)]
    files = [("files", (f"{i}.png", png(noise(32, 32, 100 + n)), "image/png")) for n, i in enumerate(ids)]
    r = post("/items", files=files, data={"ids": ids})  # type: ignore[operator]
    assert r.status_code == 201, r.text
    return ids
