"""The item store's logic, once, in the SQL that SQLite and PostgreSQL both speak.

`SqlItemStore` implements the `ItemBackend` interface (backend.py) over a small connection
protocol, `Db`: `execute(sql, params)` returning a cursor and `executemany`. Statements use
`?` placeholders (the PostgreSQL connection rewrites them to `%s`), select their columns by
name and read rows by position, and use only what both engines share: `INSERT ... ON
CONFLICT ... DO UPDATE ... RETURNING`, `ON CONFLICT DO NOTHING`, `IN (...)` lists, `LIMIT`.
What differs is left to the engine's subclass (store.py for SQLite, postgres.py):

* `_tx()`: one write transaction, serialised against every other writer of the store (so
  check-then-write is atomic and the counter rows never deadlock), `_read()`: several
  statements on one snapshot, `_conn()`: a single statement;
* the schema and its migrations (`apply_migrations` runs the steps above the stored version).

Metadata filters are not evaluated here: searches evaluate them on the metadata kept beside
the served index (follower.py, filters.matches), so they keep answering while the store is down.

Tables (the same names and columns in both engines): `items` (the caller's id, JSON
metadata as text, sha256 and content type of the original, created time; `pk` is never
reused, so a FAISS id never is), `vectors` (one float32 blob per item and space), `models`
(per space: `changes`, the last change-log sequence number; `count`, its vectors; the
`complete` flag), `counters` (the item count), `changelog` (space, seq, item pk, op: 1
added, 0 removed, 2 metadata updated, time), `reembed` (the re-embedding job of a space)
and `orphans` (originals no row refers to: sha256, since when, and when a sweep began
deleting the file). The schema also holds `classifiers` and `classifier_fits`, which
service/classifiers/storage.py reads and writes through `transaction()` and `snapshot()`, so
classifiers live in whichever backend the items do.

Originals are removed by a deferred collection, decided in the store's transactions, so
that a host deleting an orphan cannot race another adding the same bytes: the write that
drops an original's last reference records it in `orphans`; a write adding those bytes
clears the row, or, while a sweep is deleting that file, refuses
(`OriginalInCollectionError`: the caller writes the file again and retries); it also checks,
inside its transaction (serialised with the sweep's), that each file exists, since one
written before a sweep's unlink may be gone by the time the sweep has finished.
`claim_orphans` marks the rows older than a grace period that are still unreferenced (one
transaction), the caller deletes their files, and `finish_orphans` drops the rows. A sweep
that died mid-way is taken over after `COLLECT_LEASE_S`.
"""

from __future__ import annotations

import json
import time
from collections.abc import Callable, Iterable, Iterator, Sequence
from contextlib import AbstractContextManager
from typing import Any, Protocol

import numpy as np

from service.items.backend import ChangeBatch, HitRecord, Item, ModelState, NewItem, ReembedProgress
from service.items.errors import ItemExistsError, OriginalInCollectionError

ADDED, REMOVED, UPDATED = 1, 0, 2  # change-log ops
ITEM_COLUMNS = "pk, id, metadata, sha256, content_type, created"
COLLECT_LEASE_S = 300.0  # a sweep's claim on an orphan lapses after this long (the sweeper died)
IN_CHUNK = 10_000  # ids per IN (...) list: under SQLite's bound-variable limit and PostgreSQL's


class Cursor(Protocol):
    rowcount: int

    def fetchone(self) -> Any: ...
    def fetchall(self) -> list[Any]: ...
    def __iter__(self) -> Iterator[Any]: ...


class Db(Protocol):
    """What the shared logic needs of a connection (sqlite3.Connection is one)."""

    def execute(self, sql: str, params: Sequence[Any] = ..., /) -> Any: ...
    def executemany(self, sql: str, rows: Iterable[Sequence[Any]], /) -> Any: ...


def apply_migrations(db: Db, version: int, steps: Sequence[str]) -> int:
    """Run the schema steps above `version` (step i brings the schema to version i + 1), each a
    `;`-separated script, inside the caller's transaction; returns the new version."""
    for step in steps[version:]:
        for statement in step.split(";"):
            if statement.strip():
                db.execute(statement)
    return max(version, len(steps))


def _item(row: Sequence[Any], models: list[str] | None = None) -> Item:
    pk, item_id, metadata, sha256, content_type, created = row[:6]
    meta = json.loads(metadata) if metadata is not None else None
    return Item(pk, item_id, meta, sha256, content_type, created, models or [])


def _record_of(item_id: str, metadata: str | None) -> HitRecord:
    return HitRecord(item_id, json.loads(metadata) if metadata is not None else None)


def _dumps(metadata: dict[str, Any] | None) -> str | None:
    return json.dumps(metadata, separators=(",", ":")) if metadata is not None else None


def _marks(n: int) -> str:
    return ",".join("?" * n)


class SqlItemStore:
    """The `ItemBackend` over an engine subclass's connections (see the module docstring)."""

    def _tx(self) -> AbstractContextManager[Db]:
        raise NotImplementedError

    def _read(self) -> AbstractContextManager[Db]:
        raise NotImplementedError

    def _conn(self) -> AbstractContextManager[Db]:
        raise NotImplementedError

    def close(self) -> None:
        raise NotImplementedError

    # -- tables beside the items (service/classifiers/storage.py) -----------------------

    def transaction(self) -> AbstractContextManager[Db]:
        """A write transaction of this store, serialised with its item writes, for the other
        tables of its schema; it commits (durably) when the block ends, or rolls back."""
        return self._tx()

    def snapshot(self) -> AbstractContextManager[Db]:
        """Several reads of the other tables of the schema on one snapshot."""
        return self._read()

    # -- counters and the change log (inside a write transaction) -----------------------

    def _record(
        self,
        db: Db,
        space: str,
        dim: int,
        added: Sequence[int],
        removed: Sequence[int],
        updated: Sequence[int] = (),
    ) -> None:
        """Bump the space's counters and append its log rows: removals, additions, then
        metadata updates (which change no vector, but the metadata that followers keep beside
        the index). The sequence numbers come from the counter row this statement updates
        (and, in PostgreSQL, row-locks until commit), so they become visible in commit order."""
        n = len(added) + len(removed) + len(updated)
        if not n:
            return
        (last,) = db.execute(
            "INSERT INTO models(model_id, dim, changes, count) VALUES (?, ?, ?, ?) "
            "ON CONFLICT(model_id) DO UPDATE SET changes = models.changes + excluded.changes, "
            "count = models.count + excluded.count RETURNING changes",
            (space, dim, n, len(added) - len(removed)),
        ).fetchone()
        now, seq = time.time(), iter(range(last - n + 1, last + 1))
        rows = [(space, next(seq), int(pk), REMOVED, now) for pk in removed]
        rows += [(space, next(seq), int(pk), ADDED, now) for pk in added]
        rows += [(space, next(seq), int(pk), UPDATED, now) for pk in updated]
        db.executemany("INSERT INTO changelog(space, seq, item, op, at) VALUES (?, ?, ?, ?, ?)", rows)

    def _remove_items(self, db: Db, pks: Sequence[int]) -> None:
        """Delete items (their vectors cascade), logging each vector's removal per space."""
        marks = _marks(len(pks))
        by_space: dict[str, list[int]] = {}
        for row in db.execute(f"SELECT model_id, item FROM vectors WHERE item IN ({marks}) ORDER BY item", list(pks)):
            by_space.setdefault(row[0], []).append(row[1])
        for space in sorted(by_space):
            self._record(db, space, 0, [], by_space[space])
        db.execute(f"DELETE FROM items WHERE pk IN ({marks})", list(pks))
        db.execute("UPDATE counters SET value = value - ? WHERE name = 'items'", (len(pks),))

    @staticmethod
    def _orphans(db: Db, shas: set[str]) -> list[str]:
        """Record the originals among `shas` that no item refers to now as candidates for the sweep."""
        found = [
            s
            for s in sorted(shas)
            if db.execute("SELECT 1 FROM items WHERE sha256 = ? LIMIT 1", (s,)).fetchone() is None
        ]
        db.executemany(
            "INSERT INTO orphans(sha256, since) VALUES (?, ?) ON CONFLICT(sha256) DO NOTHING",
            [(s, time.time()) for s in found],
        )
        return found

    @staticmethod
    def _adopt(db: Db, shas: Sequence[str], now: float) -> None:
        """Clear the orphan rows of originals being referenced again, unless a sweep is deleting one."""
        marks = _marks(len(shas))
        busy = db.execute(
            f"SELECT sha256 FROM orphans WHERE sha256 IN ({marks}) AND deleting > ?", [*shas, now - COLLECT_LEASE_S]
        ).fetchall()
        if busy:
            raise OriginalInCollectionError(
                f"the original {busy[0][0]} is being deleted by a sweep of unreferenced originals; retry"
            )
        db.execute(f"DELETE FROM orphans WHERE sha256 IN ({marks})", list(shas))

    @staticmethod
    def _models_of(db: Db, pk: int) -> list[str]:
        return [r[0] for r in db.execute("SELECT model_id FROM vectors WHERE item = ? ORDER BY model_id", (pk,))]

    @staticmethod
    def _item_count(db: Db) -> int:
        return int(db.execute("SELECT value FROM counters WHERE name = 'items'").fetchone()[0])

    # -- writes -------------------------------------------------------------------------

    def add(
        self,
        items: Sequence[NewItem],
        vectors: dict[str, np.ndarray],
        *,
        replace: bool = False,
        present: Callable[[str], bool] | None = None,
    ) -> tuple[list[int], list[int], list[str]]:
        """Insert `items` with one vector per item for each space in `vectors` ([N, D] each).

        Returns (new pks in order, pks replaced, sha256s no longer referenced: recorded for
        the sweep). Without `replace`, any existing id raises ItemExistsError and nothing is
        written; OriginalInCollectionError when a sweep is deleting one of the originals, or
        `present(sha256)` (the originals' store) says one is missing."""
        ids = [it.id for it in items]
        now = time.time()
        with self._tx() as db:
            shas = sorted({it.sha256 for it in items})
            self._adopt(db, shas, now)
            if present is not None and (gone := [s for s in shas if not present(s)]):
                raise OriginalInCollectionError(f"the original {gone[0]} was deleted by a sweep; write it again")
            old = db.execute(f"SELECT pk, id, sha256 FROM items WHERE id IN ({_marks(len(ids))})", ids).fetchall()
            if old and not replace:
                raise ItemExistsError(sorted(r[1] for r in old))
            old_pks = [r[0] for r in old]
            if old_pks:
                self._remove_items(db, old_pks)
            pks = []
            for it in items:
                (pk,) = db.execute(
                    "INSERT INTO items(id, metadata, sha256, content_type, created) VALUES (?, ?, ?, ?, ?) RETURNING pk",
                    (it.id, _dumps(it.metadata), it.sha256, it.content_type, now),
                ).fetchone()
                pks.append(int(pk))
            db.execute("UPDATE counters SET value = value + ? WHERE name = 'items'", (len(pks),))
            for space in sorted(vectors):
                vecs = np.ascontiguousarray(vectors[space], dtype=np.float32)  # [N, D]
                db.executemany(
                    "INSERT INTO vectors(model_id, item, vec) VALUES (?, ?, ?)",
                    [(space, pk, vecs[i].tobytes()) for i, pk in enumerate(pks)],
                )
                self._record(db, space, vecs.shape[1], pks, [])
            orphans = self._orphans(db, {r[2] for r in old})
        return pks, old_pks, orphans

    def delete(self, item_id: str) -> tuple[int, list[str]] | None:
        """Remove an item and its vectors; returns (pk, sha256s no longer referenced: recorded
        for the sweep) or None."""
        with self._tx() as db:
            row = db.execute("SELECT pk, sha256 FROM items WHERE id = ?", (item_id,)).fetchone()
            if row is None:
                return None
            self._remove_items(db, [row[0]])
            return row[0], self._orphans(db, {row[1]})

    def update_metadata(self, item_id: str, metadata: dict[str, Any] | None, *, merge: bool) -> Item | None:
        """Replace an item's metadata, or merge `metadata` into it (a key set to null is
        removed); vectors are untouched, so the index needs no change. None: no such item."""
        return self.update_metadata_many([(item_id, metadata)], merge=merge)[0]

    def update_metadata_many(
        self, changes: Sequence[tuple[str, dict[str, Any] | None]], *, merge: bool
    ) -> list[Item | None]:
        """`update_metadata` for many items in one transaction (one commit): a write-back of
        predictions over the whole collection. One result per change, None for a missing item."""
        out: list[Item | None] = []
        with self._tx() as db:
            for item_id, metadata in changes:
                row = db.execute(f"SELECT {ITEM_COLUMNS} FROM items WHERE id = ?", (item_id,)).fetchone()
                if row is None:
                    out.append(None)
                    continue
                current = _item(row)
                if merge:
                    merged = dict(current.metadata or {})
                    merged.update(metadata or {})
                    metadata = {k: v for k, v in merged.items() if v is not None} or None
                db.execute("UPDATE items SET metadata = ? WHERE pk = ?", (_dumps(metadata), current.pk))
                models = self._models_of(db, current.pk)
                for space in models:
                    self._record(db, space, 0, [], [], [current.pk])
                out.append(
                    Item(
                        current.pk, current.id, metadata, current.sha256, current.content_type, current.created, models
                    )
                )
        return out

    def put_vectors(self, space: str, pks: Sequence[int], vecs: np.ndarray) -> int:
        """Store vectors of existing items (re-embedding); items deleted meanwhile are skipped."""
        vecs = np.ascontiguousarray(vecs, dtype=np.float32)  # [N, D]
        with self._tx() as db:
            written = []
            for i, pk in enumerate(pks):
                cur = db.execute(
                    "INSERT INTO vectors(model_id, item, vec) SELECT ?, pk, ? FROM items WHERE pk = ? "
                    "ON CONFLICT DO NOTHING",
                    (space, vecs[i].tobytes(), int(pk)),
                )
                if cur.rowcount:
                    written.append(int(pk))
            self._record(db, space, vecs.shape[1], written, [])
        return len(written)

    def mark_complete(self, space: str, dim: int) -> bool:
        """Flag `space` complete if every item has a vector in it (atomic with adds): its
        vector count equals the item count, since a space holds at most one vector per item."""
        with self._tx() as db:
            items = self._item_count(db)
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
        with self._conn() as db:
            rows = db.execute(
                "SELECT pk, sha256 FROM items i WHERE pk > ? AND NOT EXISTS "
                "(SELECT 1 FROM vectors v WHERE v.model_id = ? AND v.item = i.pk) ORDER BY pk LIMIT ?",
                (after, space, limit),
            ).fetchall()
        return [(r[0], r[1]) for r in rows]

    def get(self, item_id: str) -> Item | None:
        with self._read() as db:
            row = db.execute(f"SELECT {ITEM_COLUMNS} FROM items WHERE id = ?", (item_id,)).fetchone()
            if row is None:
                return None
            models = self._models_of(db, row[0])
        return _item(row, models)

    def shas(self, ids: Sequence[str]) -> dict[str, str]:
        """The sha256 of the original of each stored id among `ids`."""
        if not ids:
            return {}
        with self._conn() as db:
            rows = db.execute(f"SELECT id, sha256 FROM items WHERE id IN ({_marks(len(ids))})", list(ids)).fetchall()
        return {r[0]: r[1] for r in rows}

    def by_pks(self, pks: Sequence[int]) -> dict[int, Item]:
        if not len(pks):
            return {}
        with self._conn() as db:
            rows = db.execute(
                f"SELECT {ITEM_COLUMNS} FROM items WHERE pk IN ({_marks(len(pks))})", [int(p) for p in pks]
            ).fetchall()
        return {r[0]: _item(r) for r in rows}

    def items_after(self, after: int, limit: int) -> list[Item]:
        """Up to `limit` items with pk > `after`, oldest first: a walk over the whole collection
        that neither skips nor repeats an item when others are added or deleted meanwhile."""
        with self._read() as db:
            rows = db.execute(
                f"SELECT {ITEM_COLUMNS} FROM items WHERE pk > ? ORDER BY pk LIMIT ?", (after, limit)
            ).fetchall()
        return [_item(r) for r in rows]

    def page(self, offset: int, limit: int) -> tuple[list[Item], int]:
        """Items in insertion order and the total count."""
        with self._read() as db:
            rows = db.execute(
                f"SELECT {ITEM_COLUMNS} FROM items ORDER BY pk LIMIT ? OFFSET ?", (limit, offset)
            ).fetchall()
            total = self._item_count(db)
            models: dict[int, list[str]] = {r[0]: [] for r in rows}
            if rows:
                for pk, space in db.execute(
                    f"SELECT item, model_id FROM vectors WHERE item IN ({_marks(len(rows))}) ORDER BY model_id",
                    list(models),
                ):
                    models[pk].append(space)
        return [_item(r, models[r[0]]) for r in rows], total

    def count(self) -> int:
        with self._conn() as db:
            return self._item_count(db)

    def vector(self, item_id: str, space: str) -> np.ndarray | None:
        with self._conn() as db:
            row = db.execute(
                "SELECT v.vec FROM vectors v JOIN items i ON i.pk = v.item WHERE i.id = ? AND v.model_id = ?",
                (item_id, space),
            ).fetchone()
        return None if row is None else np.frombuffer(row[0], dtype=np.float32).copy()

    def vectors(self, space: str) -> tuple[np.ndarray, np.ndarray, int]:
        """All vectors of `space`: (pks int64 [N], vectors float32 [N, D], last log seq), one snapshot."""
        with self._read() as db:
            state = db.execute("SELECT dim, changes FROM models WHERE model_id = ?", (space,)).fetchone()
            rows = db.execute("SELECT item, vec FROM vectors WHERE model_id = ? ORDER BY item", (space,)).fetchall()
        dim = state[0] if state else 0
        pks = np.fromiter((r[0] for r in rows), dtype=np.int64, count=len(rows))
        vecs = np.frombuffer(b"".join(r[1] for r in rows), dtype=np.float32).reshape(len(rows), dim)
        return pks, vecs, (state[1] if state else 0)

    def vectors_of(self, space: str, pks: Sequence[int]) -> tuple[np.ndarray, np.ndarray]:
        """The vectors of `pks` in `space` that exist: (pks int64 [M], vectors float32 [M, D])."""
        found: list[int] = []
        blobs: list[bytes] = []
        with self._read() as db:
            for start in range(0, len(pks), IN_CHUNK):
                part = [int(p) for p in pks[start : start + IN_CHUNK]]
                for pk, vec in db.execute(
                    f"SELECT item, vec FROM vectors WHERE model_id = ? AND item IN ({_marks(len(part))})",
                    [space, *part],
                ):
                    found.append(pk)
                    blobs.append(vec)
        vecs = np.frombuffer(b"".join(blobs), dtype=np.float32)
        return np.asarray(found, dtype=np.int64), vecs.reshape(len(found), -1) if found else vecs.reshape(0, 0)

    def state(self, space: str) -> ModelState:
        with self._conn() as db:
            row = db.execute("SELECT changes, count, complete FROM models WHERE model_id = ?", (space,)).fetchone()
        if row is None:
            return ModelState(space, 0, 0, False)
        return ModelState(space, row[0], row[1], bool(row[2]))

    def completed_models(self) -> list[str]:
        """Spaces flagged complete, most recently completed first."""
        with self._conn() as db:
            rows = db.execute("SELECT model_id FROM models WHERE complete = 1 ORDER BY completed_at DESC").fetchall()
        return [r[0] for r in rows]

    # -- the change log -----------------------------------------------------------------

    def changes_since(self, space: str, after: int, limit: int) -> ChangeBatch:
        """Up to `limit` log rows of `space` with seq > `after`, with the added vectors and the
        items' current ids and metadata (one snapshot)."""
        with self._read() as db:
            dim_row = db.execute("SELECT dim FROM models WHERE model_id = ?", (space,)).fetchone()
            rows = db.execute(
                "SELECT c.seq, c.item, c.op, v.vec, i.id, i.metadata FROM changelog c LEFT JOIN vectors v "
                "ON c.op = 1 AND v.model_id = c.space AND v.item = c.item "
                "LEFT JOIN items i ON c.op <> 0 AND i.pk = c.item "
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
            updated=np.fromiter((r[2] == UPDATED for r in rows), dtype=bool, count=len(rows)),
            records={r[1]: _record_of(r[4], r[5]) for r in rows if r[4] is not None},
        )

    def first_seq(self, space: str) -> int | None:
        """The oldest retained log seq of `space` (None: no rows)."""
        with self._conn() as db:
            row = db.execute("SELECT MIN(seq) FROM changelog WHERE space = ?", (space,)).fetchone()
        return row[0]

    def compact_log(self, space: str, upto: int, older_than_s: float) -> int:
        """Drop `space`'s log rows with seq <= `upto` written more than `older_than_s` ago."""
        with self._tx() as db:
            cur = db.execute(
                "DELETE FROM changelog WHERE space = ? AND seq <= ? AND at < ?",
                (space, upto, time.time() - older_than_s),
            )
            return int(cur.rowcount)

    # -- originals no row refers to ----------------------------------------------------

    def claim_orphans(self, grace_s: float, limit: int = 1000) -> list[str]:
        """Mark for deletion the orphans recorded over `grace_s` ago (or claimed by a sweep that
        lapsed) that no item refers to, and return them; rows of referenced ones are dropped."""
        now = time.time()
        with self._tx() as db:
            rows = db.execute(
                "SELECT sha256 FROM orphans WHERE (deleting IS NULL AND since <= ?) OR deleting <= ? LIMIT ?",
                (now - grace_s, now - COLLECT_LEASE_S, limit),
            ).fetchall()
            claimed = []
            for (sha,) in rows:
                if db.execute("SELECT 1 FROM items WHERE sha256 = ? LIMIT 1", (sha,)).fetchone() is None:
                    db.execute("UPDATE orphans SET deleting = ? WHERE sha256 = ?", (now, sha))
                    claimed.append(sha)
                else:
                    db.execute("DELETE FROM orphans WHERE sha256 = ?", (sha,))
        return claimed

    def finish_orphans(self, shas: Sequence[str]) -> None:
        """The files of claimed orphans are deleted: drop their rows (adds of those bytes may go on)."""
        if shas:
            with self._tx() as db:
                db.execute(f"DELETE FROM orphans WHERE sha256 IN ({_marks(len(shas))})", list(shas))

    # -- the re-embedding job -----------------------------------------------------------

    def claim_reembed(self, space: str, owner: str, lease_s: float) -> bool:
        """Take the re-embedding of `space` unless another owner holds a live claim."""
        now = time.time()
        with self._tx() as db:
            row = db.execute("SELECT owner, state, updated FROM reembed WHERE space = ?", (space,)).fetchone()
            if row and row[1] == "running" and row[0] != owner and row[2] > now - lease_s:
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
            return int(cur.rowcount) == 1

    def reembed_progress(self, space: str) -> ReembedProgress | None:
        """The job's state; `done` and `total` are the space's vector count and the item count."""
        with self._read() as db:
            row = db.execute(
                "SELECT state, owner, started, updated, error FROM reembed WHERE space = ?", (space,)
            ).fetchone()
            if row is None:
                return None
            done = db.execute("SELECT count FROM models WHERE model_id = ?", (space,)).fetchone()
            total = self._item_count(db)
        state, owner, started, updated, error = row
        return ReembedProgress(space, state, done[0] if done else 0, total, owner, started, updated, error)
