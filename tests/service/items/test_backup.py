"""`simclr-embed backup`: a consistent copy of a live SQLite item store (the backup API, not a
file copy) taken while a writer adds items, with every copied row's original and the
classifiers (tables of the same file); a PostgreSQL store is refused with a pointer to pg_dump."""

from __future__ import annotations

import sqlite3
import threading
from pathlib import Path

import numpy as np
import pytest

from service.classifiers.storage import ClassifierStore, Fit
from service.cli import main as cli_main
from service.items.backend import NewItem
from service.items.blobs import BlobStore
from service.items.reindex import open_store
from service.items.store import ItemStore
from tests.service.conftest import MODEL_A, make_settings, png


def test_backup_of_a_store_being_written_is_consistent(
    data_dir: Path, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    settings = make_settings(data_dir)
    store, blobs = open_store(settings)
    rng = np.random.default_rng(0)
    stop = threading.Event()

    def write(start: int, batches: int) -> None:
        for b in range(batches):
            if stop.is_set():
                return
            ids = [f"i{start + b}-{j}" for j in range(20)]
            new = [
                NewItem(i, blobs.put(png(rng.integers(0, 256, (8, 8, 3), dtype=np.uint8))), "image/png") for i in ids
            ]
            store.add(new, {MODEL_A: rng.standard_normal((20, 24)).astype(np.float32)})

    write(0, 10)  # 200 items before the backup starts
    fit = Fit("f1", MODEL_A, 1.0, [0, 1], [1, 1], {"accuracy": 1.0}, {"weights": rng.standard_normal((24, 2))})
    ClassifierStore(store).create("k1", "pair", "logreg", None, [("i0-0", 0), ("i0-1", 1)], fit)
    writer = threading.Thread(target=write, args=(1000, 500))
    writer.start()
    monkeypatch.setenv("SIMCLR_EMBED_DATA_DIR", str(data_dir))
    dest = tmp_path / "backup"
    assert cli_main(["backup", str(dest)]) == 0
    stop.set()
    writer.join()

    copy = sqlite3.connect(dest / "items.sqlite3")
    assert copy.execute("PRAGMA integrity_check").fetchone() == ("ok",)
    assert copy.execute("PRAGMA journal_mode").fetchone() == ("delete",)  # self-contained: no -wal needed
    copy.close()
    assert sorted(p.name for p in dest.iterdir()) == ["blobs", "items.sqlite3"]  # classifiers are inside
    restored = ItemStore(dest / "items.sqlite3")
    copied_classifier = ClassifierStore(restored).get("k1")
    assert copied_classifier is not None and copied_classifier.examples == [("i0-0", 0), ("i0-1", 1)]
    np.testing.assert_array_equal(copied_classifier.fits[0].params["weights"], fit.params["weights"])
    pks, vectors, changes = restored.vectors(MODEL_A)
    # one committed state: counters, rows and log agree, whole batches only
    assert restored.count() == len(pks) == restored.state(MODEL_A).count == changes
    assert len(pks) >= 200 and len(pks) % 20 == 0
    source_pks, source_vectors, _ = store.vectors(MODEL_A)
    np.testing.assert_array_equal(source_vectors[np.isin(source_pks, pks)], vectors)
    copied = BlobStore(dest / "blobs")
    for item in restored.by_pks(pks.tolist()).values():
        assert copied.get(item.sha256) == blobs.get(item.sha256)
    restored.close()
    store.close()


def test_backup_refuses_a_postgres_store(monkeypatch: pytest.MonkeyPatch, tmp_path: Path, capsys) -> None:
    monkeypatch.setenv("SIMCLR_EMBED_DATA_DIR", str(tmp_path))
    monkeypatch.setenv("SIMCLR_EMBED_STORE_URL", "postgresql://nobody@127.0.0.1:1/none")
    assert cli_main(["backup", str(tmp_path / "b")]) == 2
    assert "pg_dump" in capsys.readouterr().err
