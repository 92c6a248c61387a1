"""Fixtures for the torch-free contract: registries, cards, encoded test images."""

from __future__ import annotations

import io
from collections.abc import Callable
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

from service.contract.imaging import ResizePolicy
from service.contract.registry import ModelCard, ModelRegistry


@pytest.fixture
def registry(tmp_path: Path) -> ModelRegistry:
    return ModelRegistry(tmp_path / "models")


@pytest.fixture
def make_card() -> Callable[..., ModelCard]:
    def make(model_id: str, created_at: str = "2025-01-01T00:00:00Z", **fields: object) -> ModelCard:
        base: dict[str, object] = {
            "model_id": model_id,
            "method": "simclr",
            "backbone": "resnet18",
            "input_size": 32,
            "embedding_dim": 512,
            "resize_policy": ResizePolicy(32).to_json(),
            "train_config": {"method": "simclr", "image_size": 32, "augment": {"blur": False}},
            "dataset_fingerprint": "abc123",
            "created_at": created_at,
            "metrics": {"knn_top1": 0.41},
        }
        return ModelCard(**{**base, **fields})

    return make


@pytest.fixture
def model_file(tmp_path: Path) -> Path:
    """Stand-in bytes for model.onnx: the registry moves and hashes files, it never parses them."""
    path = tmp_path / "src" / "model.onnx"
    path.parent.mkdir()
    path.write_bytes(np.random.default_rng(0).integers(0, 256, 200_000, dtype=np.uint8).tobytes())
    return path


@pytest.fixture
def photo(photos: np.ndarray) -> np.ndarray:
    """A real photo, uint8 [40, 56, 3] (non-square): a photo patch upscaled and cropped."""
    big = ResizePolicy(56).apply_array(photos[3])  # [56, 56, 3]
    return np.ascontiguousarray(big[8:48])


@pytest.fixture
def encode() -> Callable[..., bytes]:
    """PIL image -> encoded bytes of `fmt` (what a client uploads)."""

    def run(img: Image.Image, fmt: str, **params: object) -> bytes:
        buf = io.BytesIO()
        img.save(buf, fmt, **params)
        return buf.getvalue()

    return run
