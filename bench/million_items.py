"""Add cost per 1,000 items as the collection grows, through the item layer below HTTP.

Each batch is what `ItemService._commit_add` does after embedding: one store transaction
(items, vectors, counters and change-log rows; fsynced) and the served index following the
log. Vectors come from a fixed-seed generator, so embedding is not the cost; originals are
left out (a blob is one small file write per item, independent of N). Snapshots are written
by a background thread from the served index, as the service does: copied in memory while
the log waits, then checksummed and written off every lock, so the adds below pay for that
copy and for sharing the CPU with the rest.

Beside each checkpoint: what the code before the change log paid per add call, the
`COUNT(*)` over the space's vectors that `state()` ran inside the item mutex; filtered
search latency (1% and 50% selectivity, exact on Flat); at the end, start-up from the last
snapshot plus the replayed log tail, and the process's peak RSS.

The store is the SQLite file under the data folder, or with `--store-url
postgresql://127.0.0.1:5432/NAME` a PostgreSQL database NAME that the bench creates on that
server and drops at the end (it must not exist).

    .venv/bin/python bench/million_items.py --items 1000000 --dim 512 --threads 1
    .venv/bin/python bench/million_items.py --items 200000 --dim 512 --store-url postgresql://127.0.0.1:5432/bench_adds
    .venv/bin/python bench/million_items.py --items 100000 --dim 512 --factory HNSW32 --threads 1
    .venv/bin/python bench/million_items.py --dim 512 --dir DIR --reopen   # start-up and search on DIR
"""

from __future__ import annotations

import argparse
import resource
import tempfile
import threading
import time
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path

import faiss
import numpy as np
import psycopg

from service.items.filters import parse_filter
from service.items.follower import LogFollower, LogPosition
from service.items.index import VectorIndex
from service.items.reindex import load_or_build_index, open_backend, snapshot_path, write_snapshot
from service.items.sqlstore import SqlItemStore
from service.items.store import NewItem
from service.settings import Settings

SPACE = "bench-model"
BATCH = 1000


def unit(rng: np.random.Generator, n: int, d: int) -> np.ndarray:
    x = rng.standard_normal((n, d), dtype=np.float32)
    return x / np.linalg.norm(x, axis=1, keepdims=True)


def old_count_ms(store: SqlItemStore) -> float:
    """The per-add COUNT(*) of the previous code, timed on the same store."""
    start = time.perf_counter()
    with store._read() as db:  # the engine's own read transaction, as state() ran it
        db.execute("SELECT COUNT(*) FROM vectors WHERE model_id = ?", (SPACE,)).fetchone()
    return (time.perf_counter() - start) * 1e3


@contextmanager
def bench_database(url: str | None) -> Iterator[None]:
    """Create the PostgreSQL database `url` names, drop it afterwards (nothing for SQLite)."""
    if url is None:
        yield
        return
    name = psycopg.conninfo.conninfo_to_dict(url)["dbname"]
    admin = psycopg.conninfo.make_conninfo(url, dbname="postgres")
    with psycopg.connect(admin, autocommit=True) as conn:
        conn.execute(f'CREATE DATABASE "{name}"')
    try:
        yield
    finally:
        with psycopg.connect(admin, autocommit=True) as conn:
            conn.execute(f'DROP DATABASE IF EXISTS "{name}" WITH (FORCE)')


def filtered_ms(follower: LogFollower, rng: np.random.Generator, share: float) -> float:
    """Median of 5 filtered searches (k=10) keeping items whose `u` < share."""
    where = parse_filter({"u": {"lt": share}})
    times = []
    for _ in range(5):
        query = unit(rng, 1, follower.index.dim)
        start = time.perf_counter()
        follower.index.search(query, 10, follower.matching(where))
        times.append((time.perf_counter() - start) * 1e3)
    return float(np.median(times))


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--items", type=int, default=1_000_000)
    ap.add_argument("--dim", type=int, default=512)
    ap.add_argument("--factory", default="Flat")
    ap.add_argument("--checkpoints", default="10000,100000,1000000")
    ap.add_argument("--snapshot-every", type=int, default=100_000, help="log rows between background snapshots")
    ap.add_argument("--threads", type=int, default=1, help="FAISS OpenMP threads")
    ap.add_argument("--dir", type=Path, default=None, help="data folder (default: a temporary one)")
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--reopen", action="store_true", help="add nothing: time start-up and search on --dir's items")
    ap.add_argument(
        "--store-url", default=None, help="postgresql://host:port/NAME: a database the bench creates and drops"
    )
    args = ap.parse_args()
    if args.reopen and args.store_url:
        ap.error("--reopen reads a SQLite store in --dir; the PostgreSQL database is dropped after each run")
    faiss.omp_set_num_threads(args.threads)
    with bench_database(args.store_url):
        run(args)


def run(args: argparse.Namespace) -> None:
    checkpoints = sorted(c for c in map(int, args.checkpoints.split(",")) if c <= args.items)
    root = args.dir or Path(tempfile.mkdtemp(prefix="million-"))
    settings = Settings(
        data_dir=root, index_factory=args.factory, index_min_train_vectors=10_000, store_url=args.store_url
    )
    store = open_backend(settings)
    follower = LogFollower(
        store, SPACE, VectorIndex(args.dim, args.factory, min_train=10_000), LogPosition(store.state(SPACE).changes)
    )
    rng = np.random.default_rng(args.seed)
    snapshotter: threading.Thread | None = None

    def snapshot() -> None:  # as the service's background snapshot: the served follower, written off its locks
        write_snapshot(settings, follower)

    where = args.store_url or settings.sqlite_store_path
    print(f"# {args.items} items, dim {args.dim}, {args.factory}, batch {BATCH}, FAISS threads {args.threads}, {where}")
    print(
        "| items | add ms / 1,000 (last 10 batches) | add CPU ms / 1,000 (this thread) "
        "| old COUNT(*) ms per add call | filter 1% ms | filter 50% ms |"
    )
    print("|---:|---:|---:|---:|---:|---:|")
    window: list[float] = []
    cpu_window: list[float] = []  # this thread's CPU time: what other processes' load does not inflate
    last_snapshot = 0
    for start in range(0, 0 if args.reopen else args.items, BATCH):
        n = min(BATCH, args.items - start)
        vecs = unit(rng, n, args.dim)  # [n, D]
        shares = rng.random(n)
        new = [
            NewItem(f"item-{start + i}", f"{start + i:064x}", "image/png", {"u": float(shares[i])}) for i in range(n)
        ]
        began, began_cpu = time.perf_counter(), time.thread_time()
        store.add(new, {SPACE: vecs})
        follower.poll()
        window = [*window, (time.perf_counter() - began) * 1e3 * BATCH / n][-10:]
        cpu_window = [*cpu_window, (time.thread_time() - began_cpu) * 1e3 * BATCH / n][-10:]
        done = start + n
        if done - last_snapshot >= args.snapshot_every and (snapshotter is None or not snapshotter.is_alive()):
            last_snapshot = done
            snapshotter = threading.Thread(target=snapshot, daemon=True)
            snapshotter.start()
        if done in checkpoints:
            print(
                f"| {done:,} | {np.median(window):.1f} | {np.median(cpu_window):.1f} | {old_count_ms(store):.1f} | "
                f"{filtered_ms(follower, rng, 0.01):.1f} | {filtered_ms(follower, rng, 0.5):.1f} |",
                flush=True,
            )
    if snapshotter is not None:
        snapshotter.join()
    store.close()
    if snapshot_path(settings, SPACE).is_file():
        reopened = open_backend(settings)
        began = time.perf_counter()
        loaded, source = load_or_build_index(settings, reopened, SPACE, args.dim)
        seconds = time.perf_counter() - began
        print(f"\nstart-up: {seconds:.1f} s ({source}, {loaded.applied:,} log rows replayed after it)")
        one, half = (filtered_ms(loaded, rng, share) for share in (0.01, 0.5))
        print(
            f"filtered search over {loaded.index.ntotal:,} items: 1% {one:.1f} ms, 50% {half:.1f} ms (k=10, median of 5)"
        )
        reopened.close()
    print(
        f"peak RSS (the background snapshot's copy included): {resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024:.0f} MiB"
    )


if __name__ == "__main__":
    main()
