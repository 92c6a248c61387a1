"""The item store on SQLite: one file, the source of truth for items, their vectors per vector
space, the counters and the change log (the `ItemBackend` interface of backend.py).

Durability: WAL journal with `synchronous=FULL`, so every commit is fsynced before the API
answers. `NORMAL` under WAL would already survive `kill -9` of the server (the commit sits in
the OS page cache), but it may lose the last commits on power loss; one fsync per request
(an add of many images is one transaction) is cheap next to embedding, so we take FULL and
an acknowledged add survives both.

Tables: `items` (the caller's id, JSON metadata, sha256 and content type of the original,
created time; `pk` is AUTOINCREMENT so a FAISS id is never reused), `vectors` (one float32
blob per item and space), `models` (per space: `changes`, the last change-log sequence
number; `count`, its vectors; the `complete` flag re-embedding sets once every item has a
vector in it), `counters` (the item count), `changelog` (space, seq, item pk, op: 1 added,
0 removed, time) and `reembed` (the re-embedding job of a space: owner, state, heartbeat).
Schema versions are `PRAGMA user_version`; a store written by an older version is migrated
at open, inside one write transaction (safe when several processes open it at once).

Metadata fields named in search filters get an index on first use, on the expressions
(`json_type(metadata, '$."f"')`, `json_extract(metadata, '$."f"')`), so a selective filter
reads only its matches.
"""

from __future__ import annotations

import hashlib
import json
import sqlite3
import time
from collections.abc import Iterator, Sequence
from contextlib import contextmanager
from pathlib import Path
from typing import Any

import numpy as np

from service.items.backend import ChangeBatch, Item, ModelState, NewItem, ReembedProgress
from service.items.errors import ItemExistsError
from service.items.filters import Condition
from service.items.sqlite import DurableSqlite

SCHEMA_VERSION = 2
MAX_FIELD_INDEXES = 32

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

ADDED, REMOVED = 1, 0


def _item(row: sqlite3.Row, models: list[str] | None = None) -> Item:
    meta = json.loads(row["metadata"]) if row["metadata"] is not None else None
    return Item(row["pk"], row["id"], meta, row["sha256"], row["content_type"], row["created"], models or [])


def _dumps(metadata: dict[str, Any] | None) -> str | None:
    return json.dumps(metadata, separators=(",", ":")) if metadata is not None else None


def _path(field: str) -> str:
    return f"'$.\"{field}\"'"  # field names are checked by filters.FIELD_NAME: no quotes inside


def _extract(field: str) -> str:
    return f"json_extract(metadata, {_path(field)})"


_NUMBER = "IN ('integer', 'real')"


def _kind(field: str) -> str:
    return f"json_type(metadata, {_path(field)})"


def _values_sql(field: str, values: Sequence[Any], args: list[Any]) -> str:
    """`field` equals one of `values`, with JSON types kept apart (see filters.py). The type
    test comes first so that the (type, value) index of the field answers it."""
    value, kind = _extract(field), _kind(field)
    parts = []
    strings = [v for v in values if isinstance(v, str)]
    numbers = [v for v in values if not isinstance(v, str | bool)]
    if strings:
        parts.append(f"({kind} = 'text' AND {value} IN ({','.join('?' * len(strings))}))")
        args.extend(strings)
    if numbers:
        parts.append(f"({kind} {_NUMBER} AND {value} IN ({','.join('?' * len(numbers))}))")
        args.extend(numbers)
    for flag in sorted({v for v in values if isinstance(v, bool)}):
        parts.append(f"{kind} = '{'true' if flag else 'false'}'")
    return "(" + " OR ".join(parts) + ")"


def _condition_sql(cond: Condition, args: list[Any]) -> str:
    if cond.op == "eq":
        return _values_sql(cond.field, [cond.value], args)
    if cond.op == "in":
        return _values_sql(cond.field, cond.value, args)
    symbol = {"gte": ">=", "gt": ">", "lte": "<=", "lt": "<"}[cond.op]
    args.append(cond.value)
    return f"({_kind(cond.field)} {_NUMBER} AND {_extract(cond.field)} {symbol} ?)"


class ItemStore(DurableSqlite):
    """Thread-safe: one connection behind a lock (writes are short; embedding happens
    before them). Other processes (a worker's re-embedding or index job) open their own store
    on the same file; WAL lets them read while we write and `busy_timeout` serialises writers."""

    def __init__(self, path: str | Path) -> None:
        super().__init__(path)
        self._indexed_fields: set[str] = set()
        with self._tx() as db:
            version = db.execute("PRAGMA user_version").fetchone()[0]
            if version < SCHEMA_VERSION:
                for statement in (_BASE + _TO_V2).split(";"):
                    if statement.strip():
                        db.execute(statement)
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

    # -- counters and the change log (inside a write transaction) -----------------------

    def _record(
        self, db: sqlite3.Connection, space: str, dim: int, added: Sequence[int], removed: Sequence[int]
    ) -> None:
        """Bump the space's counters and append its log rows: removals, then additions."""
        n = len(added) + len(removed)
        if not n:
            return
        (last,) = db.execute(
            "INSERT INTO models(model_id, dim, changes, count) VALUES (?, ?, ?, ?) "
            "ON CONFLICT(model_id) DO UPDATE SET changes = changes + excluded.changes, count = count + excluded.count "
            "RETURNING changes",
            (space, dim, n, len(added) - len(removed)),
        ).fetchone()
        now, first = time.time(), last - n + 1
        rows = [(space, first + i, int(pk), REMOVED, now) for i, pk in enumerate(removed)]
        rows += [(space, first + len(removed) + i, int(pk), ADDED, now) for i, pk in enumerate(added)]
        db.executemany("INSERT INTO changelog(space, seq, item, op, at) VALUES (?, ?, ?, ?, ?)", rows)

    def _remove_items(self, db: sqlite3.Connection, pks: Sequence[int]) -> None:
        """Delete items (their vectors cascade), logging each vector's removal per space."""
        marks = ",".join("?" * len(pks))
        by_space: dict[str, list[int]] = {}
        for row in db.execute(f"SELECT model_id, item FROM vectors WHERE item IN ({marks})", list(pks)):
            by_space.setdefault(row[0], []).append(row[1])
        for space, removed in by_space.items():
            self._record(db, space, 0, [], removed)
        db.execute(f"DELETE FROM items WHERE pk IN ({marks})", list(pks))
        db.execute("UPDATE counters SET value = value - ? WHERE name = 'items'", (len(pks),))

    def _orphans(self, db: sqlite3.Connection, shas: set[str]) -> list[str]:
        return [s for s in shas if db.execute("SELECT 1 FROM items WHERE sha256 = ? LIMIT 1", (s,)).fetchone() is None]

    # -- writes -------------------------------------------------------------------------

    def add(
        self, items: Sequence[NewItem], vectors: dict[str, np.ndarray], *, replace: bool = False
    ) -> tuple[list[int], list[int], list[str]]:
        """Insert `items` with one vector per item for each space in `vectors` ([N, D] each).

        Returns (new pks in order, pks replaced, sha256s no longer referenced). Without
        `replace`, any existing id raises ItemExistsError and nothing is written."""
        ids = [it.id for it in items]
        now = time.time()
        with self._tx() as db:
            marks = ",".join("?" * len(ids))
            old = db.execute(f"SELECT pk, id, sha256 FROM items WHERE id IN ({marks})", ids).fetchall()
            if old and not replace:
                raise ItemExistsError(sorted(r["id"] for r in old))
            old_pks = [r["pk"] for r in old]
            if old_pks:
                self._remove_items(db, old_pks)
            pks = []
            for it in items:
                cur = db.execute(
                    "INSERT INTO items(id, metadata, sha256, content_type, created) VALUES (?, ?, ?, ?, ?)",
                    (it.id, _dumps(it.metadata), it.sha256, it.content_type, now),
                )
                pks.append(int(cur.lastrowid or 0))
            db.execute("UPDATE counters SET value = value + ? WHERE name = 'items'", (len(pks),))
            for space, vecs in vectors.items():
                vecs = np.ascontiguousarray(vecs, dtype=np.float32)  # [N, D]
                db.executemany(
                    "INSERT INTO vectors(model_id, item, vec) VALUES (?, ?, ?)",
                    [(space, pk, vecs[i].tobytes()) for i, pk in enumerate(pks)],
                )
                self._record(db, space, vecs.shape[1], pks, [])
            orphans = self._orphans(db, {r["sha256"] for r in old})
        return pks, old_pks, orphans

    def delete(self, item_id: str) -> tuple[int, list[str]] | None:
        """Remove an item and its vectors; returns (pk, sha256s no longer referenced) or None."""
        with self._tx() as db:
            row = db.execute("SELECT pk, sha256 FROM items WHERE id = ?", (item_id,)).fetchone()
            if row is None:
                return None
            self._remove_items(db, [row["pk"]])
            return row["pk"], self._orphans(db, {row["sha256"]})

    def update_metadata(self, item_id: str, metadata: dict[str, Any] | None, *, merge: bool) -> Item | None:
        """Replace an item's metadata, or merge `metadata` into it (a key set to null is
        removed); vectors are untouched, so the index needs no change. None: no such item."""
        return self.update_metadata_many([(item_id, metadata)], merge=merge)[0]

    def update_metadata_many(
        self, changes: Sequence[tuple[str, dict[str, Any] | None]], *, merge: bool
    ) -> list[Item | None]:
        """`update_metadata` for many items in one transaction (one fsync): a write-back of
        predictions over the whole collection. One result per change, None for a missing item."""
        out: list[Item | None] = []
        with self._tx() as db:
            for item_id, metadata in changes:
                row = db.execute("SELECT * FROM items WHERE id = ?", (item_id,)).fetchone()
                if row is None:
                    out.append(None)
                    continue
                if merge:
                    current = json.loads(row["metadata"]) if row["metadata"] is not None else {}
                    current.update(metadata or {})
                    metadata = {k: v for k, v in current.items() if v is not None} or None
                db.execute("UPDATE items SET metadata = ? WHERE pk = ?", (_dumps(metadata), row["pk"]))
                models = [
                    r[0]
                    for r in db.execute("SELECT model_id FROM vectors WHERE item = ? ORDER BY model_id", (row["pk"],))
                ]
                out.append(
                    Item(row["pk"], row["id"], metadata, row["sha256"], row["content_type"], row["created"], models)
                )
        return out

    def put_vectors(self, space: str, pks: Sequence[int], vecs: np.ndarray) -> int:
        """Store vectors of existing items (re-embedding); items deleted meanwhile are skipped."""
        vecs = np.ascontiguousarray(vecs, dtype=np.float32)  # [N, D]
        with self._tx() as db:
            written = []
            for i, pk in enumerate(pks):
                cur = db.execute(
                    "INSERT OR IGNORE INTO vectors(model_id, item, vec) "
                    "SELECT ?, ?, ? WHERE EXISTS (SELECT 1 FROM items WHERE pk = ?)",
                    (space, int(pk), vecs[i].tobytes(), int(pk)),
                )
                if cur.rowcount:
                    written.append(int(pk))
            self._record(db, space, vecs.shape[1], written, [])
        return len(written)

    def mark_complete(self, space: str, dim: int) -> bool:
        """Flag `space` complete if every item has a vector in it (atomic with adds): its
        vector count equals the item count, since a space holds at most one vector per item."""
        with self._tx() as db:
            (items,) = db.execute("SELECT value FROM counters WHERE name = 'items'").fetchone()
            row = db.execute("SELECT count FROM models WHERE model_id = ?", (space,)).fetchone()
            if (row[0] if row else 0) != items:
                return False
            db.execute(
                "INSERT INTO models(model_id, dim, complete, completed_at) VALUES (?, ?, 1, ?) "
                "ON CONFLICT(model_id) DO UPDATE SET complete = 1, completed_at = excluded.completed_at",
                (space, dim, time.time()),
            )
            return True

    def clear_complete(self, space: str) -> None:
        """A space no longer served stops receiving vectors for new items: not complete."""
        with self._tx() as db:
            db.execute("UPDATE models SET complete = 0 WHERE model_id = ?", (space,))

    # -- reads --------------------------------------------------------------------------

    def missing(self, space: str, limit: int, after: int = 0) -> list[tuple[int, str]]:
        """Up to `limit` items with pk > `after` and no vector in `space`: (pk, sha256), oldest first."""
        with self._lock:
            rows = self._db.execute(
                "SELECT pk, sha256 FROM items i WHERE pk > ? AND NOT EXISTS "
                "(SELECT 1 FROM vectors v WHERE v.model_id = ? AND v.item = i.pk) ORDER BY pk LIMIT ?",
                (after, space, limit),
            ).fetchall()
        return [(r["pk"], r["sha256"]) for r in rows]

    def get(self, item_id: str) -> Item | None:
        with self._read() as db:
            row = db.execute("SELECT * FROM items WHERE id = ?", (item_id,)).fetchone()
            if row is None:
                return None
            models = [
                r[0] for r in db.execute("SELECT model_id FROM vectors WHERE item = ? ORDER BY model_id", (row["pk"],))
            ]
        return _item(row, models)

    def shas(self, ids: Sequence[str]) -> dict[str, str]:
        """The sha256 of the original of each stored id among `ids`."""
        if not ids:
            return {}
        with self._lock:
            rows = self._db.execute(
                f"SELECT id, sha256 FROM items WHERE id IN ({','.join('?' * len(ids))})", list(ids)
            ).fetchall()
        return {r[0]: r[1] for r in rows}

    def by_pks(self, pks: Sequence[int]) -> dict[int, Item]:
        if not len(pks):
            return {}
        with self._lock:
            rows = self._db.execute(
                f"SELECT * FROM items WHERE pk IN ({','.join('?' * len(pks))})", [int(p) for p in pks]
            ).fetchall()
        return {r["pk"]: _item(r) for r in rows}

    def page(self, offset: int, limit: int) -> tuple[list[Item], int]:
        """Items in insertion order and the total count."""
        with self._read() as db:
            rows = db.execute("SELECT * FROM items ORDER BY pk LIMIT ? OFFSET ?", (limit, offset)).fetchall()
            (total,) = db.execute("SELECT value FROM counters WHERE name = 'items'").fetchone()
            models: dict[int, list[str]] = {r["pk"]: [] for r in rows}
            if rows:
                marks = ",".join("?" * len(rows))
                for pk, space in db.execute(
                    f"SELECT item, model_id FROM vectors WHERE item IN ({marks}) ORDER BY model_id", list(models)
                ):
                    models[pk].append(space)
        return [_item(r, models[r["pk"]]) for r in rows], total

    def items_after(self, after: int, limit: int) -> list[Item]:
        """Up to `limit` items with pk > `after`, oldest first: a walk over the whole collection
        that neither skips nor repeats an item when others are added or deleted meanwhile."""
        with self._lock:
            rows = self._db.execute("SELECT * FROM items WHERE pk > ? ORDER BY pk LIMIT ?", (after, limit)).fetchall()
        return [_item(r) for r in rows]

    def count(self) -> int:
        with self._lock:
            return int(self._db.execute("SELECT value FROM counters WHERE name = 'items'").fetchone()[0])

    def vector(self, item_id: str, space: str) -> np.ndarray | None:
        with self._lock:
            row = self._db.execute(
                "SELECT v.vec FROM vectors v JOIN items i ON i.pk = v.item WHERE i.id = ? AND v.model_id = ?",
                (item_id, space),
            ).fetchone()
        return None if row is None else np.frombuffer(row[0], dtype=np.float32).copy()

    def vectors(self, space: str) -> tuple[np.ndarray, np.ndarray, int]:
        """All vectors of `space`: (pks int64 [N], vectors float32 [N, D], last log seq), one snapshot."""
        with self._read() as db:
            state = db.execute("SELECT dim, changes FROM models WHERE model_id = ?", (space,)).fetchone()
            rows = db.execute("SELECT item, vec FROM vectors WHERE model_id = ? ORDER BY item", (space,)).fetchall()
        dim = state["dim"] if state else 0
        pks = np.fromiter((r[0] for r in rows), dtype=np.int64, count=len(rows))
        vecs = np.frombuffer(b"".join(r[1] for r in rows), dtype=np.float32).reshape(len(rows), dim)
        return pks, vecs, (state["changes"] if state else 0)

    def vectors_of(self, space: str, pks: Sequence[int]) -> tuple[np.ndarray, np.ndarray]:
        """The vectors of `pks` in `space` that exist: (pks int64 [M], vectors float32 [M, D])."""
        found: list[int] = []
        blobs: list[bytes] = []
        with self._read() as db:
            for start in range(0, len(pks), 10_000):  # under SQLite's bound-variable limit
                part = [int(p) for p in pks[start : start + 10_000]]
                marks = ",".join("?" * len(part))
                for pk, vec in db.execute(
                    f"SELECT item, vec FROM vectors WHERE model_id = ? AND item IN ({marks})", [space, *part]
                ):
                    found.append(pk)
                    blobs.append(vec)
        vecs = np.frombuffer(b"".join(blobs), dtype=np.float32)
        return np.asarray(found, dtype=np.int64), vecs.reshape(len(found), -1) if found else vecs.reshape(0, 0)

    def state(self, space: str) -> ModelState:
        with self._lock:
            row = self._db.execute(
                "SELECT changes, count, complete FROM models WHERE model_id = ?", (space,)
            ).fetchone()
        if row is None:
            return ModelState(space, 0, 0, False)
        return ModelState(space, row["changes"], row["count"], bool(row["complete"]))

    def completed_models(self) -> list[str]:
        """Spaces flagged complete, most recently completed first."""
        with self._lock:
            rows = self._db.execute(
                "SELECT model_id FROM models WHERE complete = 1 ORDER BY completed_at DESC"
            ).fetchall()
        return [r[0] for r in rows]

    def _ensure_field_indexes(self, fields: set[str]) -> None:
        """An index on (JSON type, value) per filtered field, made on first use (up to
        MAX_FIELD_INDEXES): a condition is a type test and a value range on it."""
        new = fields - self._indexed_fields
        if not new:
            return
        with self._tx() as db:
            existing = {r[0] for r in db.execute("SELECT name FROM sqlite_master WHERE name LIKE 'items_meta_%'")}
            for name in sorted(new):
                index = "items_meta_" + hashlib.sha256(name.encode()).hexdigest()[:16]
                if index not in existing and len(existing) < MAX_FIELD_INDEXES:
                    db.execute(f"CREATE INDEX {index} ON items({_kind(name)}, {_extract(name)})")
                    existing.add(index)
        self._indexed_fields |= new

    def matching_pks(self, conditions: Sequence[Condition]) -> np.ndarray:
        """pks (int64, ascending) of the items whose metadata meets every condition."""
        self._ensure_field_indexes({c.field for c in conditions})
        args: list[Any] = []
        where = " AND ".join(_condition_sql(c, args) for c in conditions) or "1"
        with self._lock:
            # no ORDER BY: SQLite would then scan by pk instead of using the field's index
            rows = self._db.execute(f"SELECT pk FROM items WHERE {where}", args).fetchall()
        return np.sort(np.fromiter((r[0] for r in rows), dtype=np.int64, count=len(rows)))

    # -- the change log -----------------------------------------------------------------

    def changes_since(self, space: str, after: int, limit: int) -> ChangeBatch:
        """Up to `limit` log rows of `space` with seq > `after`, with the added vectors (one snapshot)."""
        with self._read() as db:
            dim_row = db.execute("SELECT dim FROM models WHERE model_id = ?", (space,)).fetchone()
            rows = db.execute(
                "SELECT c.seq, c.item, c.op, v.vec FROM changelog c LEFT JOIN vectors v "
                "ON c.op = 1 AND v.model_id = c.space AND v.item = c.item "
                "WHERE c.space = ? AND c.seq > ? ORDER BY c.seq LIMIT ?",
                (space, after, limit),
            ).fetchall()
        dim = dim_row[0] if dim_row else 0
        vecs = [r[3] for r in rows if r[3] is not None]
        return ChangeBatch(
            seqs=np.fromiter((r[0] for r in rows), dtype=np.int64, count=len(rows)),
            pks=np.fromiter((r[1] for r in rows), dtype=np.int64, count=len(rows)),
            added=np.fromiter((r[2] == ADDED for r in rows), dtype=bool, count=len(rows)),
            present=np.fromiter((r[3] is not None for r in rows), dtype=bool, count=len(rows)),
            vectors=np.frombuffer(b"".join(vecs), dtype=np.float32).reshape(len(vecs), dim),
        )

    def first_seq(self, space: str) -> int | None:
        """The oldest retained log seq of `space` (None: no rows)."""
        with self._lock:
            row = self._db.execute("SELECT MIN(seq) FROM changelog WHERE space = ?", (space,)).fetchone()
        return row[0]

    def compact_log(self, space: str, upto: int, older_than_s: float) -> int:
        """Drop `space`'s log rows with seq <= `upto` written more than `older_than_s` ago."""
        with self._tx() as db:
            cur = db.execute(
                "DELETE FROM changelog WHERE space = ? AND seq <= ? AND at < ?",
                (space, upto, time.time() - older_than_s),
            )
            return cur.rowcount

    # -- the re-embedding job -----------------------------------------------------------

    def claim_reembed(self, space: str, owner: str, lease_s: float) -> bool:
        """Take the re-embedding of `space` unless another owner holds a live claim."""
        now = time.time()
        with self._tx() as db:
            row = db.execute("SELECT owner, state, updated FROM reembed WHERE space = ?", (space,)).fetchone()
            if row and row["state"] == "running" and row["owner"] != owner and row["updated"] > now - lease_s:
                return False
            db.execute(
                "INSERT INTO reembed(space, owner, state, started, updated, error) VALUES (?, ?, 'running', ?, ?, NULL) "
                "ON CONFLICT(space) DO UPDATE SET owner = excluded.owner, state = 'running', "
                "started = excluded.started, updated = excluded.updated, error = NULL",
                (space, owner, now, now),
            )
            return True

    def report_reembed(self, space: str, owner: str, state: str = "running", error: str | None = None) -> bool:
        """Renew the claim (and set the state); False when another owner has taken it over."""
        with self._tx() as db:
            cur = db.execute(
                "UPDATE reembed SET state = ?, updated = ?, error = ? WHERE space = ? AND owner = ?",
                (state, time.time(), error, space, owner),
            )
            return cur.rowcount == 1

    def reembed_progress(self, space: str) -> ReembedProgress | None:
        """The job's state; `done` and `total` are the space's vector count and the item count."""
        with self._read() as db:
            row = db.execute("SELECT * FROM reembed WHERE space = ?", (space,)).fetchone()
            if row is None:
                return None
            done = db.execute("SELECT count FROM models WHERE model_id = ?", (space,)).fetchone()
            (total,) = db.execute("SELECT value FROM counters WHERE name = 'items'").fetchone()
        return ReembedProgress(
            space,
            row["state"],
            done[0] if done else 0,
            total,
            row["owner"],
            row["started"],
            row["updated"],
            row["error"],
        )
