"""The item store on SQLite (the default): one file, the source of truth for items, their
vectors per vector space, the counters and the change log. The logic is the shared
`SqlItemStore` (sqlstore.py); this module holds SQLite's schema and transactions.

Durability: WAL journal with `synchronous=FULL`, so every commit is fsynced before the API
answers. `NORMAL` under WAL would already survive `kill -9` of the server (the commit sits in
the OS page cache), but it may lose the last commits on power loss; one fsync per request
(an add of many images is one transaction) is cheap next to embedding, so we take FULL and
an acknowledged add survives both.

Tables as in sqlstore.py; `pk` is AUTOINCREMENT so a FAISS id is never reused. Schema
versions are `PRAGMA user_version`; a store written by an older version is migrated at open,
inside one write transaction (safe when several processes open it at once).
"""

from __future__ import annotations

import sqlite3
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path

from service.items.backend import Item, NewItem
from service.items.sqlite import DurableSqlite
from service.items.sqlstore import SqlItemStore, apply_migrations

__all__ = ["Item", "ItemStore", "NewItem"]  # NewItem and Item: re-exported for the store's callers

_BASE = """
CREATE TABLE IF NOT EXISTS items (
    pk INTEGER PRIMARY KEY AUTOINCREMENT,
    id TEXT NOT NULL UNIQUE,
    metadata TEXT,
    sha256 TEXT NOT NULL,
    content_type TEXT NOT NULL,
    created REAL NOT NULL
);
CREATE INDEX IF NOT EXISTS items_sha256 ON items(sha256);
CREATE TABLE IF NOT EXISTS vectors (
    model_id TEXT NOT NULL,
    item INTEGER NOT NULL REFERENCES items(pk) ON DELETE CASCADE,
    vec BLOB NOT NULL,
    PRIMARY KEY (model_id, item)
) WITHOUT ROWID;
CREATE INDEX IF NOT EXISTS vectors_item ON vectors(item);
CREATE TABLE IF NOT EXISTS models (
    model_id TEXT PRIMARY KEY,
    dim INTEGER NOT NULL,
    changes INTEGER NOT NULL DEFAULT 0,
    complete INTEGER NOT NULL DEFAULT 0,
    completed_at REAL
);
"""

# Version 1 (the base) -> 2: counters kept in the write's transaction, the change log, the
# re-embedding job. The old change counter carries on as the log's sequence.
_TO_V2 = """
ALTER TABLE models ADD COLUMN count INTEGER NOT NULL DEFAULT 0;
UPDATE models SET count = (SELECT COUNT(*) FROM vectors v WHERE v.model_id = models.model_id);
CREATE TABLE counters (name TEXT PRIMARY KEY, value INTEGER NOT NULL);
INSERT INTO counters(name, value) SELECT 'items', COUNT(*) FROM items;
CREATE TABLE changelog (
    space TEXT NOT NULL,
    seq INTEGER NOT NULL,
    item INTEGER NOT NULL,
    op INTEGER NOT NULL,
    at REAL NOT NULL,
    PRIMARY KEY (space, seq)
) WITHOUT ROWID;
CREATE TABLE reembed (
    space TEXT PRIMARY KEY,
    owner TEXT NOT NULL,
    state TEXT NOT NULL,
    started REAL NOT NULL,
    updated REAL NOT NULL,
    error TEXT
);
"""

# 2 -> 3: originals no row refers to, awaiting the sweep (sqlstore.py, "Originals").
_TO_V3 = """
CREATE TABLE orphans (sha256 TEXT PRIMARY KEY, since REAL NOT NULL, deleting REAL)
"""

# 3 -> 4: the classifiers (service/classifiers/storage.py), until then a file of their own.
_TO_V4 = """
CREATE TABLE classifiers (
    id TEXT PRIMARY KEY,
    name TEXT NOT NULL UNIQUE,
    method TEXT NOT NULL,
    label_key TEXT,
    examples TEXT NOT NULL,
    created REAL NOT NULL
);
CREATE TABLE classifier_fits (
    classifier_id TEXT NOT NULL REFERENCES classifiers(id) ON DELETE CASCADE,
    model_id TEXT NOT NULL,
    fit_id TEXT NOT NULL UNIQUE,
    fitted_at REAL NOT NULL,
    classes TEXT NOT NULL,
    counts TEXT NOT NULL,
    cv TEXT NOT NULL,
    params BLOB NOT NULL,
    PRIMARY KEY (classifier_id, model_id)
) WITHOUT ROWID
"""

MIGRATIONS = (_BASE, _TO_V2, _TO_V3, _TO_V4)  # a version-1 store (user_version 0) skips the base's existing tables
SCHEMA_VERSION = len(MIGRATIONS)


class ItemStore(DurableSqlite, SqlItemStore):
    """The SQLite engine of `SqlItemStore`. Thread-safe: one connection behind a lock (writes are short; embedding happens
    before them). Other processes (a worker's re-embedding or index job) open their own store
    on the same file; WAL lets them read while we write and `busy_timeout` serialises writers."""

    def __init__(self, path: str | Path) -> None:
        DurableSqlite.__init__(self, path)
        with self._tx() as db:
            version = db.execute("PRAGMA user_version").fetchone()[0]
            if version < SCHEMA_VERSION:
                apply_migrations(db, version, MIGRATIONS)
                db.execute(f"PRAGMA user_version = {SCHEMA_VERSION}")

    @contextmanager
    def _read(self) -> Iterator[sqlite3.Connection]:
        """One read snapshot for several statements."""
        with self._lock:
            self._db.execute("BEGIN")
            try:
                yield self._db
            finally:
                self._db.execute("COMMIT")

    @contextmanager
    def _conn(self) -> Iterator[sqlite3.Connection]:
        with self._lock:
            yield self._db
