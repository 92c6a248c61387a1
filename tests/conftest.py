"""Fixtures shared by the whole suite: real images that installed packages ship (tests/_data.py),
a private Redis (tests/_procs.py), a database of the test's own on the local PostgreSQL server.
Nothing here needs ../shared: a user's fresh clone has none."""

from __future__ import annotations

from collections.abc import Iterator
from pathlib import Path

import numpy as np
import pytest
from _data import PHOTO_TRAIN, bundled_digits, photo_patches
from _procs import PostgresDatabases, RedisServer


@pytest.fixture(scope="session")
def digits_path(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """digits.npz, the ../shared/data layout, written from scikit-learn's bundled digits."""
    path = tmp_path_factory.mktemp("digits") / "digits.npz"
    np.savez(path, **bundled_digits())
    return path


@pytest.fixture(scope="session")
def photos() -> np.ndarray:
    """256 real colour photo patches, uint8 [256, 32, 32, 3] (see `photo_patches`)."""
    return photo_patches()[0][:256]


@pytest.fixture(scope="session")
def photos_path(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A colour dataset in the ../shared/data layout: photos.npz with 384 train and 72 test
    patches, labelled by their source photo (classes china, flower)."""
    images, labels = photo_patches()
    path = tmp_path_factory.mktemp("photos") / "photos.npz"
    np.savez(
        path,
        x_train=images[:PHOTO_TRAIN],
        y_train=labels[:PHOTO_TRAIN],
        x_test=images[PHOTO_TRAIN:],
        y_test=labels[PHOTO_TRAIN:],
        classes=np.array(["china", "flower"]),
    )
    return path


@pytest.fixture(scope="module")
def private_redis(tmp_path_factory: pytest.TempPathFactory) -> Iterator[RedisServer]:
    """A redis-server of the module's own on a free port (never the machine's shared one on 6379)."""
    server = RedisServer(tmp_path_factory.mktemp("redis"))
    server.start()
    yield server
    server.stop()


@pytest.fixture(scope="session")
def postgres() -> PostgresDatabases:
    """The machine's PostgreSQL on 127.0.0.1:5432 (trust authentication), as user postgres or root."""
    return PostgresDatabases.local()


@pytest.fixture
def postgres_url(postgres: PostgresDatabases) -> Iterator[str]:
    """A database created for this test (a unique name) and dropped after it: its URL."""
    with postgres.database() as url:
        yield url
