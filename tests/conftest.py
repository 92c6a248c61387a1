"""Fixtures shared by the whole suite: the real data in ../shared/data, a private Redis."""

from __future__ import annotations

from collections.abc import Iterator
from pathlib import Path

import numpy as np
import pytest
from _procs import RedisServer

REPO = Path(__file__).resolve().parents[1]
SHARED_DATA = REPO.parent / "shared" / "data"


def shared_npz(name: str) -> Path:
    """Path of a file in ../shared/data, or skip: a user's fresh clone has no ../shared (CI has it)."""
    path = SHARED_DATA / name
    if not path.is_file():
        pytest.skip(f"{path} not present: ../shared/data ships only with the project's CI and dev machines")
    return path


@pytest.fixture(scope="session")
def digits_path() -> Path:
    return shared_npz("digits.npz")


@pytest.fixture(scope="session")
def cifar5k_path() -> Path:
    return shared_npz("cifar10-5k.npz")


@pytest.fixture(scope="session")
def cifar_images(cifar5k_path: Path) -> np.ndarray:
    """256 real CIFAR-10 test images, uint8 [256, 32, 32, 3]."""
    with np.load(cifar5k_path) as data:
        return np.ascontiguousarray(data["x_test"][:256])


@pytest.fixture(scope="module")
def private_redis(tmp_path_factory: pytest.TempPathFactory) -> Iterator[RedisServer]:
    """A redis-server of the module's own on a free port (never the machine's shared one on 6379)."""
    server = RedisServer(tmp_path_factory.mktemp("redis"))
    server.start()
    yield server
    server.stop()
