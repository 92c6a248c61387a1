"""Fixtures of the trainer tests: tiny generated datasets and a CPU-friendly thread count."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest
import torch


@pytest.fixture(autouse=True)
def _one_thread():
    """Tests share 2 cores with other jobs, and one thread makes CPU numerics reproducible."""
    before = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(before)


@pytest.fixture(scope="session")
def tiny_npz(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """48 random 16x16 RGB images with 4 labels, in the ../shared/data .npz layout."""
    rng = np.random.default_rng(0)
    path = tmp_path_factory.mktemp("data") / "tiny.npz"
    np.savez(
        path,
        x_train=rng.integers(0, 256, (48, 16, 16, 3), dtype=np.uint8),
        y_train=rng.integers(0, 4, 48),
        x_test=rng.integers(0, 256, (16, 16, 16, 3), dtype=np.uint8),
        y_test=rng.integers(0, 4, 16),
        classes=np.array(["a", "b", "c", "d"]),
    )
    return path
