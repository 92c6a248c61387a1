"""The item store on both backends (a real SQLite file, a real PostgreSQL database): counters
kept in each write's transaction, the change log and its replay, compaction, the
re-embedding claim; migration of a version-1 SQLite store."""

from __future__ import annotations

import sqlite3
import threading
from pathlib import Path

import numpy as np
import psycopg
import pytest

from service.items.backend import HitRecord
from service.items.errors import ItemExistsError, OriginalInCollectionError
from service.items.filters import parse_filter
from service.items.follower import LogFollower, LogPosition
from service.items.index import VectorIndex
from service.items.postgres import SCHEMA_VERSION, PgItemStore
from service.items.sqlstore import SqlItemStore
from service.items.store import ItemStore, NewItem

D = 8


def unit(rng: np.random.Generator, n: int) -> np.ndarray:
    x = rng.standard_normal((n, D))
    return (x / np.linalg.norm(x, axis=1, keepdims=True)).astype(np.float32)


def new(ids: list[str], meta: list[dict] | None = None) -> list[NewItem]:
    return [NewItem(i, f"sha-{i}", "image/png", (meta or [None] * len(ids))[n]) for n, i in enumerate(ids)]


def true_counts(store: SqlItemStore, space: str) -> tuple[int, int]:
    """COUNT(*) of items and of the space's vectors, read independently of the counters."""
    with store._conn() as db:
        items = db.execute("SELECT COUNT(*) FROM items").fetchone()[0]
        vectors = db.execute("SELECT COUNT(*) FROM vectors WHERE model_id = ?", (space,)).fetchone()[0]
    return items, vectors


def search_ids(index: VectorIndex, queries: np.ndarray, k: int) -> np.ndarray:
    return index.search(queries, k)[1]


def test_counters_and_log_replay_follow_random_writes(store: SqlItemStore) -> None:
    """Random adds, replaces, deletes and re-embeddings in two spaces: the counters equal
    COUNT(*), and a follower replaying the log from zero in batches of 7 holds exactly the
    store's vectors (same search results as an index built from them)."""
    rng = np.random.default_rng(0)
    followers = {s: LogFollower(store, s, VectorIndex(D), LogPosition(0), batch=7) for s in ("a", "b@int8")}
    live: set[str] = set()
    for step in range(60):
        action = rng.choice(["add", "replace", "delete"], p=[0.5, 0.25, 0.25])
        if action == "add" or not live:
            ids = [f"i{step}-{j}" for j in range(int(rng.integers(1, 6)))]
            store.add(new(ids), {"a": unit(rng, len(ids))})
            live.update(ids)
        elif action == "replace":
            ids = list(rng.choice(sorted(live), size=min(3, len(live)), replace=False))
            store.add(new(ids), {"a": unit(rng, len(ids))}, replace=True)
        else:
            victim = str(rng.choice(sorted(live)))
            assert store.delete(victim) is not None
            live.discard(victim)
        if step % 10 == 9:  # re-embedding fills space b for every item lacking it
            missing = store.missing("b@int8", 1000)
            assert store.put_vectors("b@int8", [pk for pk, _ in missing], unit(rng, len(missing))) == len(missing)
        if step % 4 == 0:
            for follower in followers.values():
                follower.poll()
        for space in followers:
            items, vectors = true_counts(store, space)
            assert store.count() == items == len(live)
            assert store.state(space).count == vectors
    queries = unit(rng, 10)
    for space, follower in followers.items():
        follower.poll()
        pks, vecs, last = store.vectors(space)
        assert follower.position == last == store.state(space).changes
        assert follower.index.ntotal == len(pks) and not follower.at.above
        rebuilt = VectorIndex(D)
        rebuilt.add(pks, vecs)
        np.testing.assert_array_equal(search_ids(follower.index, queries, 15), search_ids(rebuilt, queries, 15))


def test_hnsw_replay_keeps_no_tombstone_for_an_item_added_and_deleted_between_polls(store: SqlItemStore) -> None:
    rng = np.random.default_rng(1)
    follower = LogFollower(store, "a", VectorIndex(D, "HNSW16"), LogPosition(0))
    store.add(new(["keep", "gone"]), {"a": unit(rng, 2)})
    store.delete("gone")  # its addition is read after its vector is deleted
    follower.poll()
    assert follower.index.ntotal == 1 and not follower.at.gone
    assert not follower.index._tombstones


def test_duplicates_metadata_patch_and_completion(store: SqlItemStore) -> None:
    rng = np.random.default_rng(2)
    store.add(new(["x", "y"], [{"a": 1, "b": "s"}, None]), {"a": unit(rng, 2)})
    with pytest.raises(ItemExistsError) as err:
        store.add(new(["y", "z"]), {"a": unit(rng, 2)})
    assert err.value.ids == ["y"] and store.count() == 2  # nothing written
    merged = store.update_metadata("x", {"b": None, "c": [1]}, merge=True)
    assert merged is not None and merged.metadata == {"a": 1, "c": [1]} and merged.models == ["a"]
    replaced = store.update_metadata("x", {"z": 0}, merge=False)
    assert replaced is not None and store.get("x").metadata == {"z": 0}  # type: ignore[union-attr]
    assert store.update_metadata("nope", {}, merge=True) is None
    before = store.state("a")
    store.update_metadata("y", {"k": 1}, merge=True)
    after = store.state("a")
    # a metadata update is one log row (followers keep metadata beside the index), not a vector change
    assert after.changes == before.changes + 1 and after.count == before.count
    batch = store.changes_since("a", before.changes, 10)
    assert batch.updated is not None and batch.updated.tolist() == [True] and not batch.added.any()
    (pk,) = batch.pks.tolist()
    assert batch.records[pk].id == "y" and batch.records[pk].metadata == {"k": 1}
    assert store.mark_complete("a", D) and not store.mark_complete("b", D)


def test_follower_keeps_ids_and_metadata_with_the_index(store: SqlItemStore) -> None:
    """What hits show and filters test is kept by the log: adds, metadata updates (one row per
    space holding the item), replaces and deletes; a follower started later reads it all."""
    rng = np.random.default_rng(4)
    store.add(new(["a", "b", "c"], [{"n": 1}, {"n": 2}, None]), {"s": unit(rng, 3)})
    follower = LogFollower(store, "s", VectorIndex(D), LogPosition(0))
    follower.poll()
    pk = {it.id: it.pk for it in store.items_after(0, 10)}
    n_is_2 = parse_filter({"n": 2})
    assert follower.matching(n_is_2).tolist() == [pk["b"]]
    store.update_metadata("a", {"n": 2}, merge=False)
    store.add(new(["c"], [{"n": 2}]), {"s": unit(rng, 1)}, replace=True)  # a new pk
    store.delete("b")
    follower.poll()
    c_pk = store.get("c").pk  # type: ignore[union-attr]
    assert follower.matching(n_is_2).tolist() == [pk["a"], c_pk]
    assert follower.records([pk["a"], pk["b"], pk["c"], c_pk]) == {
        pk["a"]: HitRecord("a", {"n": 2}),
        c_pk: HitRecord("c", {"n": 2}),
    }
    assert follower.pks_of(["a", "b", "c", "never"]) == [pk["a"], None, c_pk, None]  # c: its replacement's pk
    later = LogFollower(store, "s", VectorIndex(D), LogPosition(store.state("s").changes))
    later.load_records()
    assert later.records([pk["a"], c_pk]) == follower.records([pk["a"], c_pk])
    assert later.matching(n_is_2).tolist() == follower.matching(n_is_2).tolist()
    restored = LogFollower(store, "s", VectorIndex(D), LogPosition(0))  # as from a snapshot's section
    restored.restore_records(follower.records_json())
    assert restored.records([pk["a"], pk["b"], c_pk]) == follower.records([pk["a"], c_pk])
    assert restored.pks_of(["a", "b", "c"]) == [pk["a"], None, c_pk]


def test_an_original_is_collected_only_when_unreferenced_after_the_grace(store: SqlItemStore) -> None:
    """The deferred collection: a delete records the orphan, the same bytes added again clear
    it, a sweep claims only what is still unreferenced past the grace, and an add of bytes
    being deleted is refused until the sweep has finished."""
    rng = np.random.default_rng(6)
    store.add(new(["a", "b"]), {"s": unit(rng, 2)})
    store.delete("a")
    assert store.claim_orphans(grace_s=3600) == []  # recorded, but within the grace
    store.add([NewItem("a2", "sha-a", "image/png")], {"s": unit(rng, 1)})  # the same bytes again
    assert store.claim_orphans(grace_s=0) == []  # referenced again: the candidate is gone
    store.delete("a2")
    store.delete("b")
    claimed = store.claim_orphans(grace_s=0)
    assert claimed == ["sha-a", "sha-b"]
    with pytest.raises(OriginalInCollectionError):  # its file is being deleted: write it again, retry
        store.add([NewItem("b2", "sha-b", "image/png")], {"s": unit(rng, 1)})
    assert store.get("b2") is None
    assert store.claim_orphans(grace_s=0) == []  # claimed once
    store.finish_orphans(claimed)
    store.add([NewItem("b2", "sha-b", "image/png")], {"s": unit(rng, 1)})
    store.delete("b2")
    assert store.claim_orphans(grace_s=0) == ["sha-b"]
    # a file written before a sweep's unlink: the add's own transaction finds it missing
    with pytest.raises(OriginalInCollectionError):
        store.add([NewItem("c", "sha-c", "image/png")], {"s": unit(rng, 1)}, present=lambda sha: sha != "sha-c")
    assert store.get("c") is None and store.count() == 0


def test_compaction_and_a_snapshot_older_than_the_log(store: SqlItemStore) -> None:
    rng = np.random.default_rng(3)
    store.add(new([f"i{j}" for j in range(10)]), {"a": unit(rng, 10)})
    assert store.first_seq("a") == 1
    assert store.compact_log("a", 4, older_than_s=3600) == 0  # too young to drop
    assert store.compact_log("a", 4, older_than_s=0) == 4
    assert store.first_seq("a") == 5 and store.state("a").changes == 10


def test_migrates_a_version_1_store(tmp_path: Path) -> None:
    """A store written before counters and the log: opened, migrated, counts right, and
    its old change counter carries on as the log's sequence."""
    path = tmp_path / "items.sqlite3"
    db = sqlite3.connect(path)
    db.executescript(
        """
        CREATE TABLE items (pk INTEGER PRIMARY KEY AUTOINCREMENT, id TEXT NOT NULL UNIQUE, metadata TEXT,
            sha256 TEXT NOT NULL, content_type TEXT NOT NULL, created REAL NOT NULL);
        CREATE TABLE vectors (model_id TEXT NOT NULL, item INTEGER NOT NULL REFERENCES items(pk) ON DELETE CASCADE,
            vec BLOB NOT NULL, PRIMARY KEY (model_id, item)) WITHOUT ROWID;
        CREATE TABLE models (model_id TEXT PRIMARY KEY, dim INTEGER NOT NULL, changes INTEGER NOT NULL DEFAULT 0,
            complete INTEGER NOT NULL DEFAULT 0, completed_at REAL);
        INSERT INTO items(id, metadata, sha256, content_type, created) VALUES ('p', NULL, 's1', 'image/png', 0),
            ('q', '{"n": 2}', 's2', 'image/png', 0);
        INSERT INTO models VALUES ('a', 2, 7, 1, 0);
        """
    )
    vec = np.ones(2, np.float32).tobytes()
    db.executemany("INSERT INTO vectors VALUES ('a', ?, ?)", [(1, vec), (2, vec)])
    db.commit()
    db.close()
    store = ItemStore(path)
    assert store.count() == 2 and store.state("a").count == 2 and store.state("a").changes == 7
    assert store.completed_models() == ["a"]
    store.delete("p")
    assert store.state("a").changes == 8 and store.state("a").count == 1
    assert store.changes_since("a", 7, 10).pks.tolist() == [1]
    store.close()
    assert ItemStore(path).count() == 1  # opening again does not migrate twice


def test_reembed_claim_is_held_once_and_lapses(store: SqlItemStore) -> None:
    assert store.claim_reembed("b", "host:1", lease_s=60)
    assert not store.claim_reembed("b", "host:2", lease_s=60)  # live claim: the second asker leaves
    assert store.report_reembed("b", "host:1")
    assert store.claim_reembed("b", "host:2", lease_s=0)  # a lapsed claim is taken over
    assert not store.report_reembed("b", "host:1")  # the first runner learns it lost the job
    store.report_reembed("b", "host:2", "succeeded")
    progress = store.reembed_progress("b")
    assert progress is not None and (progress.state, progress.owner) == ("succeeded", "host:2")


def another_connection(store: SqlItemStore) -> SqlItemStore:
    """The same store opened again, as another process would (its own connection or pool)."""
    return PgItemStore(store.url) if isinstance(store, PgItemStore) else ItemStore(store.path)  # type: ignore[attr-defined]


def test_concurrent_writers_are_followed_without_loss(store: SqlItemStore) -> None:
    """Four writers with their own connections add, replace and delete at once while a
    follower polls: it ends holding exactly the store's vectors, at the log's last seq, no
    hole left open."""
    follower = LogFollower(store, "a", VectorIndex(D), LogPosition(0), batch=16)
    done = threading.Event()

    def write(w: int) -> None:
        rng = np.random.default_rng(10 + w)
        own = another_connection(store)
        try:
            for step in range(15):
                ids = [f"w{w}-{step}-{j}" for j in range(3)]
                own.add(new(ids), {"a": unit(rng, 3)})
                own.add(new(ids[:1]), {"a": unit(rng, 1)}, replace=True)
                assert own.delete(ids[2]) is not None
        finally:
            own.close()

    def follow() -> None:
        while not done.is_set():
            follower.poll()

    poller = threading.Thread(target=follow)
    poller.start()
    writers = [threading.Thread(target=write, args=(w,)) for w in range(4)]
    for t in writers:
        t.start()
    for t in writers:
        t.join()
    done.set()
    poller.join()
    follower.poll()
    pks, vecs, last = store.vectors("a")
    assert len(pks) == 4 * 15 * 2 == store.count() == store.state("a").count
    assert follower.position == last == store.state("a").changes == 4 * 15 * 6
    assert not follower.at.above and follower.index.ntotal == len(pks)
    rebuilt = VectorIndex(D)
    rebuilt.add(pks, vecs)
    queries = unit(np.random.default_rng(4), 8)
    np.testing.assert_array_equal(search_ids(follower.index, queries, 20), search_ids(rebuilt, queries, 20))


def test_postgres_hosts_starting_at_once_migrate_once(postgres_url: str) -> None:
    """Eight stores opened at once on an empty database: all open, the schema is made once."""
    barrier = threading.Barrier(8)
    opened: list[PgItemStore] = []
    failures: list[BaseException] = []

    def open_one() -> None:
        barrier.wait()
        try:
            opened.append(PgItemStore(postgres_url, pool_size=1))
        except BaseException as exc:  # reported below
            failures.append(exc)

    threads = [threading.Thread(target=open_one) for _ in range(8)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    assert not failures and len(opened) == 8
    opened[0].add(new(["x"]), {"a": unit(np.random.default_rng(0), 1)})
    assert all(s.count() == 1 for s in opened)
    with psycopg.connect(postgres_url) as conn:
        assert conn.execute("SELECT version FROM simclr_schema").fetchall() == [(SCHEMA_VERSION,)]
    for s in opened:
        s.close()
