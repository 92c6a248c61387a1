"""The classifier tables in the item store, on both backends: the round trip of classifiers
and fits (parameters bit-exact), refits, cascade delete, the unique name; two stores on one
database (two hosts) see each other's writes and race for a name with one winner; a
classifier file of the old layout (its own SQLite file, rows still in its WAL as after a
`kill -9`) is imported once; a store of the previous schema version gains the tables; an
unreachable PostgreSQL raises the item layer's StoreUnavailableError, which the API answers
with 503."""

from __future__ import annotations

import io
import json
import shutil
import sqlite3
import threading
from pathlib import Path
from typing import Any

import numpy as np
import psycopg
import pytest
from _procs import free_port
from fastapi.testclient import TestClient

from service.app import create_app
from service.classifiers.storage import (
    LEGACY_FILE,
    ClassifierRecord,
    ClassifierStore,
    DuplicateNameError,
    Fit,
    open_classifiers,
)
from service.items import postgres as pg_engine
from service.items import store as sqlite_engine
from service.items.errors import StoreUnavailableError
from service.items.postgres import PgItemStore
from service.items.reindex import open_backend
from service.items.sqlstore import SqlItemStore
from tests.service.conftest import make_settings

# The classifier file's schema before the classifiers moved into the item store.
OLD_SCHEMA = """
CREATE TABLE IF NOT EXISTS classifiers (
    id TEXT PRIMARY KEY,
    name TEXT NOT NULL UNIQUE,
    method TEXT NOT NULL,
    label_key TEXT,
    examples TEXT NOT NULL,
    created REAL NOT NULL
);
CREATE TABLE IF NOT EXISTS classifier_fits (
    classifier_id TEXT NOT NULL REFERENCES classifiers(id) ON DELETE CASCADE,
    model_id TEXT NOT NULL,
    fit_id TEXT NOT NULL UNIQUE,
    fitted_at REAL NOT NULL,
    classes TEXT NOT NULL,
    counts TEXT NOT NULL,
    cv TEXT NOT NULL,
    params BLOB NOT NULL,
    PRIMARY KEY (classifier_id, model_id)
) WITHOUT ROWID;
"""


def make_fit(fit_id: str, model_id: str, at: float, seed: int) -> Fit:
    rng = np.random.default_rng(seed)
    params = {"weights": rng.standard_normal((16, 3)), "bias": rng.standard_normal(3).astype(np.float32)}
    cv = {"kind": "cv", "accuracy": 0.75, "std": 0.1, "fold_accuracies": [0.5, 1.0], "C": 2.5}
    return Fit(fit_id, model_id, at, ["cat", 7, "dog"], [4, 5, 6], cv, params)


def assert_same(got: ClassifierRecord | None, want: ClassifierRecord) -> None:
    """Equal records, parameters compared array by array (values and dtypes)."""
    assert got is not None
    assert (got.id, got.name, got.method, got.label_key, got.examples, got.created) == (
        want.id,
        want.name,
        want.method,
        want.label_key,
        want.examples,
        want.created,
    )
    assert [f.fit_id for f in got.fits] == [f.fit_id for f in want.fits]
    for g, w in zip(got.fits, want.fits, strict=True):
        assert (g.model_id, g.fitted_at, g.classes, g.counts, g.cv) == (
            w.model_id,
            w.fitted_at,
            w.classes,
            w.counts,
            w.cv,
        )
        assert sorted(g.params) == sorted(w.params)
        for key, value in w.params.items():
            assert g.params[key].dtype == value.dtype
            np.testing.assert_array_equal(g.params[key], value)


def fit_rows(backend: SqlItemStore, classifier_id: str) -> int:
    with backend.snapshot() as db:
        return int(
            db.execute("SELECT COUNT(*) FROM classifier_fits WHERE classifier_id = ?", (classifier_id,)).fetchone()[0]
        )


def test_round_trip_refits_and_cascade_delete(store: SqlItemStore) -> None:
    classifiers = ClassifierStore(store)
    examples: list[tuple[str, str | int]] = [("a", "cat"), ("b", 7), ("c", "dog")]
    made = classifiers.create("k1", "pets", "logreg", "kind", examples, make_fit("f1", "m1", 100.0, 0))
    assert_same(classifiers.get("k1"), made)
    with pytest.raises(DuplicateNameError):
        classifiers.create("k2", "pets", "knn", None, examples, make_fit("f2", "m1", 101.0, 1))
    classifiers.create("k3", "near", "knn", None, examples, make_fit("f3", "m1", 102.0, 2))

    assert classifiers.add_fit("k1", make_fit("f4", "m2", 103.0, 3))
    assert classifiers.add_fit("k1", make_fit("f5", "m2", 104.0, 4))  # a refit on m2 replaces m2's fit
    assert not classifiers.add_fit("gone", make_fit("f6", "m2", 105.0, 5))
    record = classifiers.get("k1")
    want = ClassifierRecord(
        "k1", "pets", "logreg", "kind", examples, made.created, [make_fit("f5", "m2", 104.0, 4), made.fits[0]]
    )
    assert_same(record, want)
    assert [r.id for r in classifiers.all()] == ["k1", "k3"]
    assert classifiers.without_fit("m2", ["logreg", "knn"]) == ["k3"]
    assert classifiers.without_fit("m3", ["logreg"]) == ["k1"]
    assert classifiers.name_taken("pets") and not classifiers.name_taken("k1")

    assert fit_rows(store, "k1") == 2
    assert classifiers.delete("k1") and not classifiers.delete("k1")
    assert classifiers.get("k1") is None and fit_rows(store, "k1") == 0  # its fits went with it
    assert not classifiers.name_taken("pets")
    assert [r.id for r in classifiers.all()] == ["k3"]


def test_two_stores_on_one_database_see_each_other(store_url: str | None, tmp_path: Path) -> None:
    """Two hosts' stores (own connections, PostgreSQL pools or SQLite connections on one file)."""
    settings = make_settings(tmp_path / "data", store_url=store_url)
    host_a, host_b = open_backend(settings), open_backend(settings)
    try:
        a, b = ClassifierStore(host_a), ClassifierStore(host_b)
        made = a.create("k1", "shared", "logreg", None, [("x", 0), ("y", 1)], make_fit("f1", "m1", 1.0, 0))
        assert_same(b.get("k1"), made)
        assert b.add_fit("k1", make_fit("f2", "m2", 2.0, 1))
        assert [f.fit_id for f in a.get("k1").fits] == ["f2", "f1"]  # type: ignore[union-attr]

        barrier = threading.Barrier(8)
        outcomes: list[str] = []

        def race(i: int) -> None:
            barrier.wait()
            try:
                (a, b)[i % 2].create(f"r{i}", "raced", "knn", None, [("x", 0)], make_fit(f"rf{i}", "m1", 3.0, i))
                outcomes.append("created")
            except DuplicateNameError:
                outcomes.append("taken")

        threads = [threading.Thread(target=race, args=(i,)) for i in range(8)]
        for t in threads:
            t.start()
        for t in threads:
            t.join()
        assert sorted(outcomes) == ["created"] + ["taken"] * 7
        assert [r.name for r in a.all()] == [r.name for r in b.all()] == ["shared", "raced"]

        assert b.delete("k1")
        assert a.get("k1") is None
    finally:
        host_a.close()
        host_b.close()


def npz(params: dict[str, np.ndarray]) -> bytes:
    buf = io.BytesIO()
    np.savez(buf, **params)
    return buf.getvalue()


def write_old_file(path: Path) -> list[ClassifierRecord]:
    """A classifier file of the old layout, its rows committed but still in the WAL (the state
    `kill -9` of the old server leaves); returns what it holds."""
    records = [
        ClassifierRecord(
            "old1",
            "digits",
            "logreg",
            "label",
            [("i1", 1), ("i2", 2)],
            10.0,
            [make_fit("of2", "m2", 12.0, 2), make_fit("of1", "m1", 11.0, 1)],
        ),
        ClassifierRecord(
            "old2", "shelf", "knn", None, [("i3", "a"), ("i4", "b")], 20.0, [make_fit("of3", "m1", 21.0, 3)]
        ),
    ]
    live = path.parent / "live"
    live.mkdir(parents=True)
    db = sqlite3.connect(live / path.name, isolation_level=None)
    db.execute("PRAGMA journal_mode=WAL")
    db.execute("PRAGMA wal_autocheckpoint=0")
    db.executescript(OLD_SCHEMA)
    db.execute("BEGIN")
    for r in records:
        db.execute(
            "INSERT INTO classifiers VALUES (?, ?, ?, ?, ?, ?)",
            (r.id, r.name, r.method, r.label_key, json.dumps(r.examples), r.created),
        )
        for f in r.fits:
            db.execute(
                "INSERT INTO classifier_fits VALUES (?, ?, ?, ?, ?, ?, ?, ?)",
                (
                    r.id,
                    f.model_id,
                    f.fit_id,
                    f.fitted_at,
                    json.dumps(f.classes),
                    json.dumps(f.counts),
                    json.dumps(f.cv),
                    npz(f.params),
                ),
            )
    db.execute("COMMIT")
    for suffix in ("", "-wal"):  # the files as the dead process left them
        shutil.copyfile(live / (path.name + suffix), path.with_name(path.name + suffix))
    db.close()
    assert path.with_name(path.name + "-wal").stat().st_size > 0
    return records


def test_an_old_classifier_file_is_imported_once(store_url: str | None, tmp_path: Path) -> None:
    settings = make_settings(tmp_path / "data", store_url=store_url)
    legacy = settings.items_dir / LEGACY_FILE
    imported = legacy.with_name(LEGACY_FILE + ".imported")
    records = write_old_file(legacy)

    backend = open_backend(settings)
    try:
        classifiers = open_classifiers(settings, backend)
        got = classifiers.all()
        assert len(got) == 2
        for g, want in zip(got, records, strict=True):
            assert_same(g, want)
        assert not legacy.exists() and imported.is_file()  # kept, renamed
        assert not legacy.with_name(LEGACY_FILE + "-wal").exists()

        # The same file again (a crash between the import's commit and the rename): renamed, nothing doubled.
        shutil.copyfile(imported, legacy)
        assert [r.id for r in open_classifiers(settings, backend).all()] == ["old1", "old2"]
        assert not legacy.exists()

        # Deleted after the import: not brought back by a later start, even with the file back in place.
        assert classifiers.delete("old1")
        assert [r.id for r in open_classifiers(settings, backend).all()] == ["old2"]
        shutil.copyfile(imported, legacy)
        assert [r.id for r in open_classifiers(settings, backend).all()] == ["old2"]
        assert legacy.is_file()  # holds classifiers the store does not: left where it is
    finally:
        backend.close()


def test_a_store_of_the_previous_schema_gains_the_classifier_tables(store_url: str | None, tmp_path: Path) -> None:
    """A deployment's store as the version before left it (every migration but the last):
    opened, migrated, its items kept, classifiers stored."""
    settings = make_settings(tmp_path / "data", store_url=store_url)
    if store_url is None:
        settings.items_dir.mkdir(parents=True)
        conn: Any = sqlite3.connect(settings.sqlite_store_path, isolation_level=None)
        steps, version = sqlite_engine.MIGRATIONS[:-1], f"PRAGMA user_version = {len(sqlite_engine.MIGRATIONS) - 1}"
    else:
        conn = psycopg.connect(store_url, autocommit=True)
        steps, version = (
            pg_engine.MIGRATIONS[:-1],
            f"INSERT INTO simclr_schema VALUES ({len(pg_engine.MIGRATIONS) - 1})",
        )
        conn.execute("CREATE TABLE simclr_schema (version INTEGER NOT NULL)")
    for step in steps:
        for statement in step.split(";"):
            if statement.strip():
                conn.execute(statement)
    conn.execute(
        "INSERT INTO items(id, metadata, sha256, content_type, created) VALUES ('p', NULL, 's', 'image/png', 0)"
    )
    conn.execute(version)
    conn.close()

    backend = open_backend(settings)
    try:
        assert backend.get("p") is not None
        made = ClassifierStore(backend).create("k", "n", "knn", None, [("p", 0)], make_fit("f", "m", 1.0, 0))
        assert_same(ClassifierStore(backend).get("k"), made)
    finally:
        backend.close()


def test_an_unreachable_postgres_raises_store_unavailable(data_dir: Path) -> None:
    url = f"postgresql://nobody@127.0.0.1:{free_port()}/none"  # nothing listens there
    backend = PgItemStore(url, pool_size=1, timeout_s=1.0)
    try:
        classifiers = ClassifierStore(backend)
        with pytest.raises(StoreUnavailableError, match="PostgreSQL"):
            classifiers.create("k", "n", "logreg", None, [("x", 0)], make_fit("f", "m", 1.0, 0))
        with pytest.raises(StoreUnavailableError):
            classifiers.all()
    finally:
        backend.close()

    with TestClient(create_app(make_settings(data_dir, store_url=url, store_timeout_s=1.0))) as client:
        for answer in (client.get("/classifiers"), client.delete("/classifiers/k")):
            assert (answer.status_code, answer.json()["error"]["code"]) == (503, "store_unavailable")
