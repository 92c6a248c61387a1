"""The item store: one SQLite file, the source of truth for items and their vectors.

Durability: WAL journal with `synchronous=FULL`, so every commit is fsynced before the API
answers. `NORMAL` under WAL would already survive `kill -9` of the server (the commit sits in
the OS page cache), but it may lose the last commits on power loss; one fsync per request
(an add of many images is one transaction) is cheap next to embedding, so we take FULL and
an acknowledged add survives both.

Tables: `items` (the caller's id, JSON metadata, sha256 and content type of the original,
created time; `pk` is AUTOINCREMENT so a FAISS id is never reused), `vectors` (one float32
blob per item and model) and `models` (per model: a change counter bumped on every vector
insert or delete, which snapshots record, and the `complete` flag re-embedding sets once
every item has a vector for it).
"""

from __future__ import annotations

import json
import sqlite3
import threading
import time
from collections.abc import Iterator, Sequence
from contextlib import contextmanager
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np

_SCHEMA = """
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


class DuplicateItemError(Exception):
    """Ids that already exist (an add without `replace`)."""

    def __init__(self, ids: list[str]) -> None:
        super().__init__(", ".join(ids))
        self.ids = ids


@dataclass(frozen=True)
class NewItem:
    id: str
    sha256: str
    content_type: str
    metadata: dict[str, Any] | None = None


@dataclass(frozen=True)
class Item:
    pk: int
    id: str
    metadata: dict[str, Any] | None
    sha256: str
    content_type: str
    created: float
    models: list[str] = field(default_factory=list)


@dataclass(frozen=True)
class ModelState:
    model_id: str
    changes: int
    count: int
    complete: bool


def _item(row: sqlite3.Row, models: list[str] | None = None) -> Item:
    meta = json.loads(row["metadata"]) if row["metadata"] is not None else None
    return Item(row["pk"], row["id"], meta, row["sha256"], row["content_type"], row["created"], models or [])


class ItemStore:
    """Thread-safe: one connection behind a lock (writes are short; embedding happens
    before them). Other processes (a re-indexing worker) open their own store on the same
    file; WAL lets them read while we write and `busy_timeout` serialises writers."""

    def __init__(self, path: str | Path) -> None:
        self.path = Path(path)
        self.path.parent.mkdir(parents=True, exist_ok=True)
        self._lock = threading.RLock()
        self._db = sqlite3.connect(self.path, isolation_level=None, check_same_thread=False, timeout=30.0)
        self._db.row_factory = sqlite3.Row
        self._db.execute("PRAGMA journal_mode=WAL")
        self._db.execute("PRAGMA synchronous=FULL")
        self._db.execute("PRAGMA foreign_keys=ON")
        with self._lock:
            self._db.executescript(_SCHEMA)

    def close(self) -> None:
        with self._lock:
            self._db.close()

    @contextmanager
    def _tx(self) -> Iterator[sqlite3.Connection]:
        """An IMMEDIATE transaction: takes the write lock up front, so check-then-write is atomic."""
        with self._lock:
            self._db.execute("BEGIN IMMEDIATE")
            try:
                yield self._db
            except BaseException:
                self._db.execute("ROLLBACK")
                raise
            self._db.execute("COMMIT")

    def _bump(self, db: sqlite3.Connection, model_id: str, dim: int, by: int) -> None:
        db.execute(
            "INSERT INTO models(model_id, dim, changes) VALUES (?, ?, ?) "
            "ON CONFLICT(model_id) DO UPDATE SET changes = changes + excluded.changes",
            (model_id, dim, by),
        )

    def _bump_for_items(self, db: sqlite3.Connection, pks: Sequence[int]) -> None:
        """Count the vectors of `pks` (about to be deleted) as changes of their models."""
        marks = ",".join("?" * len(pks))
        rows = db.execute(
            f"SELECT model_id, COUNT(*) AS n FROM vectors WHERE item IN ({marks}) GROUP BY model_id", list(pks)
        ).fetchall()
        for row in rows:
            db.execute("UPDATE models SET changes = changes + ? WHERE model_id = ?", (row["n"], row["model_id"]))

    # -- writes -------------------------------------------------------------------------

    def add(
        self, items: Sequence[NewItem], vectors: dict[str, np.ndarray], *, replace: bool = False
    ) -> tuple[list[int], list[int], list[str]]:
        """Insert `items` with one vector per item for each model in `vectors` ([N, D] each).

        Returns (new pks in order, pks replaced, sha256s no longer referenced). Without
        `replace`, any existing id raises DuplicateItemError and nothing is written."""
        ids = [it.id for it in items]
        now = time.time()
        with self._tx() as db:
            marks = ",".join("?" * len(ids))
            old = db.execute(f"SELECT pk, id, sha256 FROM items WHERE id IN ({marks})", ids).fetchall()
            if old and not replace:
                raise DuplicateItemError(sorted(r["id"] for r in old))
            old_pks = [r["pk"] for r in old]
            if old_pks:
                self._bump_for_items(db, old_pks)
                db.execute(f"DELETE FROM items WHERE pk IN ({','.join('?' * len(old_pks))})", old_pks)
            pks = []
            for it in items:
                meta = json.dumps(it.metadata, separators=(",", ":")) if it.metadata is not None else None
                cur = db.execute(
                    "INSERT INTO items(id, metadata, sha256, content_type, created) VALUES (?, ?, ?, ?, ?)",
                    (it.id, meta, it.sha256, it.content_type, now),
                )
                pks.append(int(cur.lastrowid))
            for model_id, vecs in vectors.items():
                vecs = np.ascontiguousarray(vecs, dtype=np.float32)  # [N, D]
                db.executemany(
                    "INSERT INTO vectors(model_id, item, vec) VALUES (?, ?, ?)",
                    [(model_id, pk, vecs[i].tobytes()) for i, pk in enumerate(pks)],
                )
                self._bump(db, model_id, vecs.shape[1], len(pks))
            orphans = self._orphans(db, {r["sha256"] for r in old})
        return pks, old_pks, orphans

    def _orphans(self, db: sqlite3.Connection, shas: set[str]) -> list[str]:
        return [s for s in shas if db.execute("SELECT 1 FROM items WHERE sha256 = ? LIMIT 1", (s,)).fetchone() is None]

    def delete(self, item_id: str) -> tuple[int, list[str]] | None:
        """Remove an item and its vectors; returns (pk, sha256s no longer referenced) or None."""
        with self._tx() as db:
            row = db.execute("SELECT pk, sha256 FROM items WHERE id = ?", (item_id,)).fetchone()
            if row is None:
                return None
            self._bump_for_items(db, [row["pk"]])
            db.execute("DELETE FROM items WHERE pk = ?", (row["pk"],))
            return row["pk"], self._orphans(db, {row["sha256"]})

    def put_vectors(self, model_id: str, pks: Sequence[int], vecs: np.ndarray) -> int:
        """Store vectors of existing items (re-embedding); items deleted meanwhile are skipped."""
        vecs = np.ascontiguousarray(vecs, dtype=np.float32)  # [N, D]
        with self._tx() as db:
            before = db.total_changes
            db.executemany(
                "INSERT OR IGNORE INTO vectors(model_id, item, vec) SELECT ?, ?, ? WHERE EXISTS (SELECT 1 FROM items WHERE pk = ?)",
                [(model_id, int(pk), vecs[i].tobytes(), int(pk)) for i, pk in enumerate(pks)],
            )
            written = db.total_changes - before
            self._bump(db, model_id, vecs.shape[1], written)
        return written

    def mark_complete(self, model_id: str, dim: int) -> bool:
        """Flag `model_id` complete if every item has a vector for it (atomic with adds)."""
        with self._tx() as db:
            if self._missing_count(db, model_id):
                return False
            self._bump(db, model_id, dim, 0)
            db.execute("UPDATE models SET complete = 1, completed_at = ? WHERE model_id = ?", (time.time(), model_id))
            return True

    def clear_complete(self, model_id: str) -> None:
        """A model no longer served stops receiving vectors for new items: not complete."""
        with self._tx() as db:
            db.execute("UPDATE models SET complete = 0 WHERE model_id = ?", (model_id,))

    # -- reads --------------------------------------------------------------------------

    def _missing_count(self, db: sqlite3.Connection, model_id: str) -> int:
        return db.execute(
            "SELECT COUNT(*) FROM items i WHERE NOT EXISTS (SELECT 1 FROM vectors v WHERE v.model_id = ? AND v.item = i.pk)",
            (model_id,),
        ).fetchone()[0]

    def missing(self, model_id: str, limit: int, after: int = 0) -> list[tuple[int, str]]:
        """Up to `limit` items with pk > `after` and no vector for `model_id`: (pk, sha256), oldest first."""
        with self._lock:
            rows = self._db.execute(
                "SELECT pk, sha256 FROM items i WHERE pk > ? AND NOT EXISTS "
                "(SELECT 1 FROM vectors v WHERE v.model_id = ? AND v.item = i.pk) ORDER BY pk LIMIT ?",
                (after, model_id, limit),
            ).fetchall()
        return [(r["pk"], r["sha256"]) for r in rows]

    def get(self, item_id: str) -> Item | None:
        with self._lock:
            row = self._db.execute("SELECT * FROM items WHERE id = ?", (item_id,)).fetchone()
            if row is None:
                return None
            models = [
                r[0]
                for r in self._db.execute("SELECT model_id FROM vectors WHERE item = ? ORDER BY model_id", (row["pk"],))
            ]
        return _item(row, models)

    def by_pks(self, pks: Sequence[int]) -> dict[int, Item]:
        if not pks:
            return {}
        with self._lock:
            rows = self._db.execute(
                f"SELECT * FROM items WHERE pk IN ({','.join('?' * len(pks))})", [int(p) for p in pks]
            ).fetchall()
        return {r["pk"]: _item(r) for r in rows}

    def page(self, offset: int, limit: int) -> tuple[list[Item], int]:
        """Items in insertion order and the total count."""
        with self._lock:
            rows = self._db.execute("SELECT * FROM items ORDER BY pk LIMIT ? OFFSET ?", (limit, offset)).fetchall()
            total = self._db.execute("SELECT COUNT(*) FROM items").fetchone()[0]
            models: dict[int, list[str]] = {r["pk"]: [] for r in rows}
            if rows:
                marks = ",".join("?" * len(rows))
                for pk, model_id in self._db.execute(
                    f"SELECT item, model_id FROM vectors WHERE item IN ({marks}) ORDER BY model_id", list(models)
                ):
                    models[pk].append(model_id)
        return [_item(r, models[r["pk"]]) for r in rows], total

    def count(self) -> int:
        with self._lock:
            return self._db.execute("SELECT COUNT(*) FROM items").fetchone()[0]

    def vector(self, item_id: str, model_id: str) -> np.ndarray | None:
        with self._lock:
            row = self._db.execute(
                "SELECT v.vec FROM vectors v JOIN items i ON i.pk = v.item WHERE i.id = ? AND v.model_id = ?",
                (item_id, model_id),
            ).fetchone()
        return None if row is None else np.frombuffer(row[0], dtype=np.float32).copy()

    def vectors(self, model_id: str) -> tuple[np.ndarray, np.ndarray, int]:
        """All vectors of `model_id`: (pks int64 [N], vectors float32 [N, D], change counter), one snapshot."""
        with self._lock:
            self._db.execute("BEGIN")  # one read snapshot for rows and counter
            try:
                state = self._db.execute("SELECT dim, changes FROM models WHERE model_id = ?", (model_id,)).fetchone()
                rows = self._db.execute(
                    "SELECT item, vec FROM vectors WHERE model_id = ? ORDER BY item", (model_id,)
                ).fetchall()
            finally:
                self._db.execute("COMMIT")
        dim = state["dim"] if state else 0
        pks = np.fromiter((r[0] for r in rows), dtype=np.int64, count=len(rows))
        vecs = np.frombuffer(b"".join(r[1] for r in rows), dtype=np.float32).reshape(len(rows), dim)
        return pks, vecs, (state["changes"] if state else 0)

    def state(self, model_id: str) -> ModelState:
        with self._lock:
            row = self._db.execute("SELECT changes, complete FROM models WHERE model_id = ?", (model_id,)).fetchone()
            count = self._db.execute("SELECT COUNT(*) FROM vectors WHERE model_id = ?", (model_id,)).fetchone()[0]
        if row is None:
            return ModelState(model_id, 0, count, False)
        return ModelState(model_id, row["changes"], count, bool(row["complete"]))

    def completed_models(self) -> list[str]:
        """Models flagged complete, most recently completed first."""
        with self._lock:
            rows = self._db.execute(
                "SELECT model_id FROM models WHERE complete = 1 ORDER BY completed_at DESC"
            ).fetchall()
        return [r[0] for r in rows]
