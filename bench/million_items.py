"""Add cost per 1,000 items as the collection grows, through the item layer below HTTP.

Each batch is what `ItemService._commit_add` does after embedding: one store transaction
(items, vectors, counters and change-log rows; fsynced) and the served index following the
log (the add cost is split into the two: the store's commit, and the index following the log,
whose FAISS insert is HNSW's graph search on that index type). Vectors come from a fixed-seed generator, so embedding is not the cost; originals are
left out (a blob is one small file write per item, independent of N). Snapshots are written
by a background thread from the served index, as the service does: copied in memory while
the log waits, then checksummed and written off every lock, so the adds below pay for that
copy and for sharing the CPU with the rest.

Index upkeep runs as in the service (`ItemService._maybe_upkeep`): when the served index asks
(`VectorIndex.upkeep_due`: an IVF index grown 4-fold since its training, an HNSW index past
20% tombstones) a background thread rebuilds it from the store through its own connection
while the old one serves, and the new one replaces it once built and caught up with the log.

Beside each checkpoint: what the code before the change log paid per add call, the
`COUNT(*)` over the space's vectors that `state()` ran inside the item mutex; filtered
search latency (1% and 50% selectivity, exact on Flat); the p50 of one unfiltered k=10 query;
recall@10 of the served index against the exact top 10 (kept incrementally over every vector
added, for 100 fixed queries drawn like the items); the process's RSS at that moment. At the
end, start-up from the last snapshot plus the replayed log tail, and the peak RSS.

`--race-faiss` adds the same vectors to a bare FAISS index of the same factory (no store, no
log, no ids) beside it and reports that index's add time per 1,000: the insert cost FAISS
itself has at that size (HNSW's grows with the graph), against which the item layer's is read.
Not for IVFauto, whose lists the service retrains as the collection grows.

On HNSW an add lands in the index's fresh buffer (exact, searched beside the graph) and a
background thread inserts it into the graph (`insert_pending_until`, as the service runs it),
up to `--fresh-max` vectors (the service's `index_fresh_max`); past it an add inserts its
overflow into the graph itself. Each checkpoint then also reports the vectors still in the
buffer, what the background graph inserts cost per 1,000 since the last checkpoint, how many
vectors adds inserted into the graph themselves since then (the buffer full), and the search
p50 again once the background has emptied the buffer (the first p50 is taken while it works,
and a search waits for its step, at most about 25 ms, to hold the index). With
`--rate R` the adds come at R items a second (what a host's embedding would deliver), not as
fast as the store takes them.

`--like FILE` draws the vectors with the mean and covariance of real embeddings (bench/
synthetic.py) instead of isotropic ones. `--delete-share F` deletes that share of the items
after the adds, with upkeep held back, then lets it run: search p50 fresh, with the
tombstones, and after the compaction (HNSW).

The store is the SQLite file under the data folder, or with `--store-url
postgresql://127.0.0.1:5432/NAME` a PostgreSQL database NAME that the bench creates on that
server and drops at the end (it must not exist).

    .venv/bin/python bench/million_items.py --items 1000000 --dim 512 --threads 1
    .venv/bin/python bench/million_items.py --items 200000 --dim 512 --store-url postgresql://127.0.0.1:5432/bench_adds
    .venv/bin/python bench/million_items.py --items 100000 --dim 512 --factory HNSW32 --threads 1
    .venv/bin/python bench/million_items.py --factory IVFauto,Flat --like EMBEDDINGS.npz --threads 1
    .venv/bin/python bench/million_items.py --items 100000 --factory HNSW32 --delete-share 0.5 --threads 1
    .venv/bin/python bench/million_items.py --factory HNSW32 --rate 500 --like EMBEDDINGS.npz --threads 1
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
from synthetic import source

from service.items.filters import parse_filter
from service.items.follower import LogFollower, LogPosition
from service.items.index import VectorIndex, insert_pending_until
from service.items.reindex import (
    build_from_store,
    load_or_build_index,
    open_backend,
    snapshot_path,
    write_snapshot,
)
from service.items.sqlstore import SqlItemStore
from service.items.store import NewItem
from service.settings import Settings

SPACE = "bench-model"
BATCH = 1000
K = 10


def rss_mib() -> float:
    """The process's resident set now (not its peak)."""
    for line in Path("/proc/self/status").read_text().splitlines():
        if line.startswith("VmRSS:"):
            return int(line.split()[1]) / 1024
    return float("nan")


class ExactTopK:
    """The exact top K of fixed queries over every vector added so far, merged batch by batch
    (float64 scores), so recall is checked at any size without keeping the vectors."""

    def __init__(self, queries: np.ndarray) -> None:
        self.queries = queries.astype(np.float64)  # [Q, D]
        self.scores = np.full((len(queries), K), -np.inf)
        self.pks = np.full((len(queries), K), -1, dtype=np.int64)

    def add(self, pks: list[int], vecs: np.ndarray) -> None:
        scores = np.concatenate([self.scores, self.queries @ vecs.astype(np.float64).T], axis=1)  # [Q, K + n]
        pk_rows = np.concatenate([self.pks, np.broadcast_to(np.asarray(pks), (len(scores), len(pks)))], axis=1)
        best = np.argsort(-scores, axis=1, kind="stable")[:, :K]
        self.scores = np.take_along_axis(scores, best, axis=1)
        self.pks = np.take_along_axis(pk_rows, best, axis=1)

    def recall(self, follower: LogFollower) -> float:
        _, found = follower.index.search(self.queries.astype(np.float32), K)  # [Q, K]
        return float(np.mean([len(set(f.tolist()) & set(t.tolist())) / K for f, t in zip(found, self.pks)]))


def search_p50_ms(follower: LogFollower, queries: np.ndarray) -> float:
    times = []
    for q in queries:
        start = time.perf_counter()
        follower.index.search(q[None], K)
        times.append((time.perf_counter() - start) * 1e3)
    return float(np.median(times))


class Upkeep:
    """The service's index upkeep (ItemService._maybe_upkeep / _rebuild) for the bench: a
    background rebuild from the store on its own connection while the old index serves."""

    def __init__(self, settings: Settings, store: SqlItemStore, dim: int) -> None:
        self.settings, self.store, self.dim = settings, store, dim
        self.thread: threading.Thread | None = None
        self.built: LogFollower | None = None
        self.why, self.began = "", 0.0

    def _rebuild(self) -> None:
        own = open_backend(self.settings)
        follower = build_from_store(self.settings, own, SPACE, self.dim)
        follower.store = self.store
        own.close()
        self.built = follower

    def start_if_due(self, follower: LogFollower) -> None:
        if self.thread is None and (why := follower.index.upkeep_due()):
            self.why, self.began = why, time.perf_counter()
            print(f"# upkeep ({why}) started at {follower.index.ntotal:,} vectors: {follower.index.kind}", flush=True)
            self.thread = threading.Thread(target=self._rebuild, daemon=True)
            self.thread.start()

    def swap(self, follower: LogFollower, *, wait: bool = False) -> LogFollower:
        """The rebuilt follower, caught up, once it is ready (else `follower`)."""
        if self.thread is None or (self.thread.is_alive() and not wait):
            return follower
        self.thread.join()
        self.thread, built, self.built = None, self.built, None
        if built is None:  # the rebuild failed (its traceback is printed)
            return follower
        built.poll()
        print(
            f"# upkeep ({self.why}) done in {time.perf_counter() - self.began:.1f} s: {built.index.kind}, "
            f"{built.index.ntotal:,} vectors",
            flush=True,
        )
        return built


def wait_for_graph(follower: LogFollower) -> None:
    """Until the background graph inserts have emptied the fresh buffer."""
    while follower.index.pending:
        time.sleep(0.05)


def idle_p50_ms(follower: LogFollower, queries: np.ndarray) -> float:
    """search_p50_ms once the graph holds every vector."""
    wait_for_graph(follower)
    return search_p50_ms(follower, queries)


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
        query = rng.standard_normal((1, follower.index.dim), dtype=np.float32)
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
    ap.add_argument("--race-faiss", action="store_true", help="time a bare FAISS index of the factory beside it")
    ap.add_argument("--like", type=Path, default=None, help="real embeddings (.npz `vectors`) to draw vectors like")
    ap.add_argument("--delete-share", type=float, default=0.0, help="share of the items deleted after the adds")
    ap.add_argument("--rate", type=float, default=0.0, help="items added a second (0: as fast as they go)")
    ap.add_argument(
        "--fresh-max", type=int, default=Settings().index_fresh_max, help="HNSW: the fresh buffer's bound (0: none)"
    )
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
        data_dir=root,
        index_factory=args.factory,
        index_min_train_vectors=10_000,
        store_url=args.store_url,
        index_fresh_max=args.fresh_max,
    )
    draw, dim, drawn = source(args.like, args.dim)
    store = open_backend(settings)
    index = VectorIndex(dim, args.factory, min_train=10_000, fresh_max=args.fresh_max)
    follower = LogFollower(store, SPACE, index, LogPosition(store.state(SPACE).changes))
    served = [follower]  # what the background graph inserts follow (the upkeep swaps it)
    stop_inserts = threading.Event()
    inserter = threading.Thread(target=insert_pending_until, args=(lambda: served[0].index, stop_inserts), daemon=True)
    inserter.start()
    rng = np.random.default_rng(args.seed)
    vec_rng = np.random.default_rng([args.seed, 1])  # the vectors' own stream
    queries = draw(np.random.default_rng([args.seed, 2]), 100)  # [100, D], not among the items
    exact = ExactTopK(queries)
    upkeep = Upkeep(settings, store, dim)
    snapshotter: threading.Thread | None = None
    bare = faiss.index_factory(dim, args.factory, faiss.METRIC_INNER_PRODUCT) if args.race_faiss else None

    where = args.store_url or settings.sqlite_store_path
    print(
        f"# {args.items} items ({drawn}), {args.factory}, batch {BATCH}, FAISS threads {args.threads}, {where}, "
        f"fresh buffer {args.fresh_max:,}, {f'{args.rate:,.0f} items/s' if args.rate else 'adds as fast as they go'}"
    )
    print(f"# RSS before the first add: {rss_mib():.0f} MiB")
    print(
        "| items | add ms / 1,000 (last 10 batches) | of which store commit | of which index insert "
        "| add CPU ms / 1,000 (this thread) | bare FAISS add ms / 1,000 | old COUNT(*) ms per add call "
        "| filter 1% ms | filter 50% ms | search p50 ms | recall@10 | RSS MiB | fresh | graph insert ms / 1,000 "
        "| inserted by adds | search p50 ms, graph idle | index |"
    )
    print("|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|---|")
    window: list[float] = []
    store_window: list[float] = []  # the store transaction alone; the rest is the index following the log
    bare_window: list[float] = []
    cpu_window: list[float] = []  # this thread's CPU time: what other processes' load does not inflate
    last_snapshot = 0
    graph_mark = [0, 0.0, 0]  # graph inserts (background vectors and seconds, by adds) at the last checkpoint
    began_run = due = time.perf_counter()

    def report(label: str, served: LogFollower) -> None:
        rss = rss_mib()
        index = served.index
        moved, took = index.graph_inserted - graph_mark[0], index.graph_insert_s - graph_mark[1]
        by_adds = index.overflow_inserted - graph_mark[2]
        graph_mark[:] = [index.graph_inserted, index.graph_insert_s, index.overflow_inserted]
        print(
            f"| {label} | {np.median(window):.1f} | {np.median(store_window):.1f} | "
            f"{np.median(window) - np.median(store_window):.1f} | {np.median(cpu_window):.1f} | "
            f"{f'{np.median(bare_window):.1f}' if bare_window else '-'} | {old_count_ms(store):.1f} | "
            f"{filtered_ms(served, rng, 0.01):.1f} | {filtered_ms(served, rng, 0.5):.1f} | "
            f"{search_p50_ms(served, queries):.2f} | {exact.recall(served):.3f} | {rss:,.0f} | "
            f"{index.pending:,} | {f'{took / moved * 1e6:.1f}' if moved > 0 else '-'} | {by_adds:,} | "
            f"{idle_p50_ms(served, queries):.2f} | {index.kind} |",
            flush=True,
        )

    for start in range(0, 0 if args.reopen else args.items, BATCH):
        n = min(BATCH, args.items - start)
        vecs = draw(vec_rng, n)  # [n, D]
        shares = rng.random(n)
        new = [
            NewItem(f"item-{start + i}", f"{start + i:064x}", "image/png", {"u": float(shares[i])}) for i in range(n)
        ]
        if args.rate:  # one batch every n / rate seconds; no burst to catch up after a checkpoint's pause
            time.sleep(max(0.0, due - time.perf_counter()))
            due = max(due, time.perf_counter()) + n / args.rate
        began, began_cpu = time.perf_counter(), time.thread_time()
        pks, _, _ = store.add(new, {SPACE: vecs})
        committed = time.perf_counter()
        follower.poll()
        window = [*window, (time.perf_counter() - began) * 1e3 * BATCH / n][-10:]
        store_window = [*store_window, (committed - began) * 1e3 * BATCH / n][-10:]
        cpu_window = [*cpu_window, (time.thread_time() - began_cpu) * 1e3 * BATCH / n][-10:]
        exact.add(pks, vecs)
        if bare is not None:
            began = time.perf_counter()
            bare.add(vecs)
            bare_window = [*bare_window, (time.perf_counter() - began) * 1e3 * BATCH / n][-10:]
        follower = served[0] = upkeep.swap(follower)
        upkeep.start_if_due(follower)
        done = start + n
        if done - last_snapshot >= args.snapshot_every and (snapshotter is None or not snapshotter.is_alive()):
            last_snapshot = done
            # as the service's background snapshot: the served follower, written off its locks
            snapshotter = threading.Thread(target=write_snapshot, args=(settings, follower), daemon=True)
            snapshotter.start()
        if done in checkpoints:
            report(f"{done:,}", follower)
    if upkeep.thread is not None:  # the last rebuild, finished: what the service serves next
        follower = served[0] = upkeep.swap(follower, wait=True)
        report(f"{follower.index.ntotal:,}, after that upkeep", follower)
    print(f"# {args.items:,} adds in {time.perf_counter() - began_run:.0f} s; {follower.index.pending:,} still fresh")
    wait_for_graph(follower)
    print(f"# the graph holds every vector {time.perf_counter() - began_run:.0f} s after the first add", flush=True)
    stop_inserts.set()
    inserter.join()
    if args.delete_share:
        delete_and_compact(args, store, follower, upkeep, queries, exact)
    if snapshotter is not None:
        snapshotter.join()
    store.close()
    del follower, upkeep, bare  # start-up below loads the index into a process that no longer holds one
    if snapshot_path(settings, SPACE).is_file() and not args.delete_share:
        reopened = open_backend(settings)
        began = time.perf_counter()
        loaded, how = load_or_build_index(settings, reopened, SPACE, dim)
        seconds = time.perf_counter() - began
        print(f"\nstart-up: {seconds:.1f} s ({how}, {loaded.applied:,} log rows replayed after it)")
        one, half = (filtered_ms(loaded, rng, share) for share in (0.01, 0.5))
        print(
            f"filtered search over {loaded.index.ntotal:,} items: 1% {one:.1f} ms, 50% {half:.1f} ms (k=10, median of 5)"
        )
        reopened.close()
    print(
        f"peak RSS (the background snapshot's copy included): {resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024:.0f} MiB"
    )


def delete_and_compact(
    args: argparse.Namespace,
    store: SqlItemStore,
    follower: LogFollower,
    upkeep: Upkeep,
    queries: np.ndarray,
    exact: ExactTopK,  # over every item added
) -> None:
    """Search p50 fresh, after deleting `--delete-share` of the items (upkeep held back, so
    the index holds them as tombstones where it cannot remove), and after the upkeep the
    service would run then."""
    fresh, fresh_recall = search_p50_ms(follower, queries), exact.recall(follower)
    doomed = np.random.default_rng([args.seed, 3]).permutation(args.items)[: int(args.delete_share * args.items)]
    began = time.perf_counter()
    for count, i in enumerate(doomed, 1):
        store.delete(f"item-{i}")
        if count % BATCH == 0:
            follower.poll()
    follower.poll()
    print(f"# {len(doomed):,} deletions in {time.perf_counter() - began:.0f} s", flush=True)
    survivors = ExactTopK(queries)
    pks, vecs, _ = store.vectors(SPACE)
    survivors.add(pks.tolist(), vecs)
    del pks, vecs
    heavy = search_p50_ms(follower, queries)
    due = follower.index.upkeep_due()
    upkeep.start_if_due(follower)
    compacted = upkeep.swap(follower, wait=True)
    while compacted.index.insert_pending():  # the rebuild's fresh buffer, into its graph
        pass
    after = search_p50_ms(compacted, queries)
    print(f"deleted {args.delete_share:.0%} ({len(doomed):,} items); upkeep due: {due}")
    print("| index state | vectors searchable | search p50 ms | recall@10 vs exact over the live items |")
    print("|---|---:|---:|---:|")
    print(f"| fresh, {args.items:,} items | {args.items:,} | {fresh:.2f} | {fresh_recall:.3f} |")
    print(
        f"| after the deletions (tombstones) | {follower.index.ntotal:,} | {heavy:.2f} | {survivors.recall(follower):.3f} |"
    )
    print(f"| after the compaction | {compacted.index.ntotal:,} | {after:.2f} | {survivors.recall(compacted):.3f} |")


if __name__ == "__main__":
    main()
