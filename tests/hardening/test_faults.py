"""Faults not covered elsewhere: the registry's disk fills up during a publish.

The other faults of issue 7 have their own tests (docs/reliability.md lists them):
SIGKILL of the API during adds and a corrupted FAISS snapshot in
tests/service/items/test_durability.py; SIGKILL of a worker mid-job and a Redis restart during
a job in tests/integration/test_jobs_recovery.py; a publish interrupted or killed at every step
in tests/contract/test_registry.py.

The full disk is real: a 1 MiB tmpfs mounted over models/ (needs root, as in the project's
containers and CI); the test skips with the reason elsewhere.
"""

from __future__ import annotations

import errno
import os
import subprocess
from collections.abc import Iterator
from pathlib import Path

import pytest
from fastapi.testclient import TestClient

from service.app import create_app
from service.contract.registry import ModelRegistry
from tests.hardening.conftest import hardened_settings
from tests.service.conftest import MODEL_A, MODEL_B

TMPFS_BYTES = 1024 * 1024


@pytest.fixture
def full_disk_registry(data_dir: Path, tmp_path: Path) -> Iterator[Path]:
    """data_dir/models moved onto a 1 MiB tmpfs holding tiny-a (active) and tiny-b."""
    models = data_dir / "models"
    saved = tmp_path / "models-saved"
    models.rename(saved)
    models.mkdir()
    mounted = subprocess.run(
        ["mount", "-t", "tmpfs", "-o", f"size={TMPFS_BYTES}", "tmpfs", str(models)], capture_output=True, text=True
    )
    if mounted.returncode != 0:
        pytest.skip(f"cannot mount a tmpfs here (needs root): {mounted.stderr.strip()}")
    try:
        subprocess.run(["cp", "-a", f"{saved}/.", str(models)], check=True)
        yield models
    finally:
        subprocess.run(["umount", "-l", str(models)], check=True)


def _free_bytes(path: Path) -> int:
    st = os.statvfs(path)
    return st.f_bavail * st.f_frsize


def test_publish_on_a_full_disk_leaves_no_half_model(full_disk_registry: Path, tmp_path: Path, data_dir: Path) -> None:
    registry = ModelRegistry(full_disk_registry)
    before = {c.model_id for c in registry.list()}
    free_before = _free_bytes(full_disk_registry)
    source = full_disk_registry / MODEL_B / "model.onnx"
    big = tmp_path / "big.onnx"  # a real model's bytes, padded past the free space
    big.write_bytes(source.read_bytes() + os.urandom(TMPFS_BYTES))
    card = registry.get(MODEL_B).model_copy(update={"model_id": "too-big"})

    with pytest.raises(OSError) as raised:
        registry.publish(big, card, activate=True)
    assert raised.value.errno == errno.ENOSPC

    # No half model: not listed, no folder, nothing left in staging, space given back,
    # the active pointer and the published models untouched and still verifying.
    assert {c.model_id for c in registry.list()} == before
    assert not (full_disk_registry / "too-big").exists()
    assert list((full_disk_registry / ".staging").iterdir()) == []
    assert _free_bytes(full_disk_registry) == free_before
    assert registry.active() == MODEL_A
    for model_id in before:
        registry.verify(model_id)

    # The server on this registry starts, serves the active model and lists only whole ones.
    with TestClient(create_app(hardened_settings(data_dir)), raise_server_exceptions=False) as api:
        listed = api.get("/models").json()
        assert listed["active"] == MODEL_A and {m["model_id"] for m in listed["models"]} == before
        assert api.post(f"/models/{MODEL_B}/activate").status_code == 200

    # Once space allows, the same id publishes whole.
    small = tmp_path / "small.onnx"
    small.write_bytes(source.read_bytes())
    published = registry.publish(small, card)
    assert registry.verify("too-big")[0].sha256 == published.sha256
