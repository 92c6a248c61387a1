"""A snapshot of the served follower, taken while another thread keeps adding and following
(what the API's background snapshot does): each snapshot is one instant, its index, its kept
records and its log position agreeing, and a follower read from it catches up to the store."""

from __future__ import annotations

import threading
from pathlib import Path

import numpy as np

from service.items.follower import LogFollower, LogPosition
from service.items.index import VectorIndex
from service.items.reindex import catch_up, read_snapshot, snapshot_path, write_snapshot
from service.items.sqlstore import SqlItemStore
from service.items.store import NewItem
from tests.service.conftest import make_settings

D = 8
BATCHES, PER_BATCH = 60, 25


def test_snapshots_of_a_follower_that_keeps_following_are_each_one_instant(
    store: SqlItemStore, store_url: str | None, tmp_path: Path
) -> None:
    settings = make_settings(tmp_path / "data", store_url=store_url)
    rng = np.random.default_rng(7)
    vectors = rng.standard_normal((BATCHES * PER_BATCH, D)).astype(np.float32)
    vectors /= np.linalg.norm(vectors, axis=1, keepdims=True)
    follower = LogFollower(store, "s", VectorIndex(D), LogPosition(0))
    done = threading.Event()

    def writer() -> None:
        for b in range(BATCHES):
            rows = range(b * PER_BATCH, (b + 1) * PER_BATCH)
            store.add([NewItem(f"i{r}", f"sha-{r}", "image/png", {"row": r}) for r in rows], {"s": vectors[rows]})
            follower.poll()
        done.set()

    thread = threading.Thread(target=writer)
    thread.start()
    seen = []
    while not done.is_set() or not seen:
        write_snapshot(settings, follower)
        loaded, has_records = read_snapshot(settings, store, "s", D)
        position = loaded.position
        # Only adds were logged, one row per item in order: position p holds exactly items 0..p-1.
        assert loaded.index.ntotal == position and has_records
        kept = loaded.records(range(BATCHES * PER_BATCH + 2))  # every pk the writer can have given
        assert sorted(r.metadata["row"] for r in kept.values()) == list(range(position))
        if position:
            _, hits = loaded.index.search(vectors[position - 1 : position], 1)
            assert kept[int(hits[0, 0])].id == f"i{position - 1}"
        seen.append(position)
    thread.join()
    assert snapshot_path(settings, "s").is_file() and len(seen) >= 2, seen
    final, has_records = read_snapshot(settings, store, "s", D)
    catch_up(final, has_records=has_records)
    assert final.position == store.state("s").changes == final.index.ntotal == BATCHES * PER_BATCH
