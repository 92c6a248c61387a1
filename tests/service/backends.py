"""The two item-store backends as fixtures, for the tests that run on both (items and
classifiers; their conftests import them): `store_url` is the SQLite default (None:
<data_dir>/items/items.sqlite3) or a PostgreSQL database created for the test and dropped
after it."""

from __future__ import annotations

from collections.abc import Iterator
from pathlib import Path

import pytest
from fastapi.testclient import TestClient

from service.app import create_app
from service.items.reindex import open_backend
from service.items.sqlstore import SqlItemStore
from tests.service.conftest import make_settings

BACKENDS = ["sqlite", "postgresql"]


@pytest.fixture(params=BACKENDS)
def store_url(request: pytest.FixtureRequest) -> str | None:
    if request.param == "sqlite":
        return None
    return str(request.getfixturevalue("postgres_url"))


@pytest.fixture
def store(store_url: str | None, tmp_path: Path) -> Iterator[SqlItemStore]:
    """An empty item store on the test's backend."""
    backend = open_backend(make_settings(tmp_path / "data", store_url=store_url))
    yield backend
    backend.close()


@pytest.fixture
def client(data_dir: Path, store_url: str | None) -> Iterator[TestClient]:
    """The app in-process on the test's backend (lifespan run); server errors come back as responses."""
    with TestClient(create_app(make_settings(data_dir, store_url=store_url)), raise_server_exceptions=False) as c:
        yield c
