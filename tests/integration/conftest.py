"""Fixtures for the job integration tests: one real stack (see jobstack.py) per session."""

from __future__ import annotations

import shutil
from collections.abc import Iterator
from pathlib import Path

import pytest
from jobstack import Stack


@pytest.fixture(scope="session")
def job_datasets(tmp_path_factory: pytest.TempPathFactory, digits_path: Path) -> Path:
    """digits.npz (copied: a symlink out of the root would be refused) and a folder with no readable image."""
    root = tmp_path_factory.mktemp("stack") / "data" / "datasets"
    root.mkdir(parents=True)
    shutil.copyfile(digits_path, root / "digits.npz")
    broken = root / "unreadable"
    broken.mkdir()
    for i in range(3):
        (broken / f"img{i}.png").write_bytes(b"not an image at all " * (i + 1))
    return root


@pytest.fixture(scope="session")
def _stack(job_datasets: Path) -> Iterator[Stack]:
    stack = Stack(job_datasets.parents[1])
    try:
        yield stack
    finally:
        stack.close()


@pytest.fixture
def stack(_stack: Stack) -> Stack:
    """The session's stack with exactly one live worker at the start of each test."""
    if not _stack.live_workers():
        _stack.start_worker()
    if _stack.redis.proc is None:
        _stack.redis.start()
    return _stack


@pytest.fixture
def empty_store(stack: Stack) -> Stack:
    """The session's stack with no items: a test that counts or labels every item starts clean,
    whatever the tests before it indexed."""
    while items := stack.http.get("/items", params={"limit": 500}).json()["items"]:
        for item in items:
            assert stack.http.delete(f"/items/{item['id']}").status_code == 204
    return stack
