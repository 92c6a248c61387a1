"""VectorIndex: exact search against a numpy brute force, concurrency, snapshots."""

from __future__ import annotations

import math
import threading
import time

import numpy as np
import pytest

from service.items.index import (
    POINTS_PER_LIST,
    SnapshotError,
    VectorIndex,
    concrete_factory,
    insert_pending_until,
    nlist_for,
    train_threshold,
)


def unit(rng: np.random.Generator, n: int, d: int) -> np.ndarray:
    x = rng.standard_normal((n, d))
    return (x / np.linalg.norm(x, axis=1, keepdims=True)).astype(np.float32)


def brute_topk(base: np.ndarray, ids: np.ndarray, queries: np.ndarray, k: int) -> tuple[np.ndarray, np.ndarray]:
    """Reference: float64 scores, full sort (independent of FAISS)."""
    scores = queries.astype(np.float64) @ base.astype(np.float64).T  # [Q, N]
    order = np.argsort(-scores, axis=1, kind="stable")[:, :k]
    return np.take_along_axis(scores, order, axis=1), ids[order]


@pytest.mark.parametrize("k", [1, 7, 100, 500])
def test_exact_search_equals_numpy_brute_force(k: int) -> None:
    rng = np.random.default_rng(k)
    base, queries = unit(rng, 500, 24), unit(rng, 20, 24)
    ids = rng.permutation(10_000)[:500].astype(np.int64)  # arbitrary, non-contiguous pks
    index = VectorIndex(24)
    index.add(ids[:200], base[:200])
    index.add(ids[200:], base[200:])
    scores, got = index.search(queries, k)
    want_scores, want = brute_topk(base, ids, queries, k)
    assert got.shape == (20, min(k, 500))
    np.testing.assert_array_equal(got, want)  # random vectors: no ties
    np.testing.assert_allclose(scores, want_scores, atol=1e-5)


def test_remove_and_empty() -> None:
    rng = np.random.default_rng(1)
    index = VectorIndex(8)
    assert index.search(unit(rng, 2, 8), 5)[1].shape == (2, 0)
    base = unit(rng, 50, 8)
    index.add(np.arange(50), base)
    index.remove(np.array([3, 17]))
    assert index.ntotal == 48
    _, got = index.search(base[[3, 17]], 48)
    assert not {3, 17} & set(got.ravel().tolist())
    assert got.shape == (2, 48)


@pytest.mark.parametrize("factory", ["HNSW16", "IVF8,Flat"])
def test_ann_factories_train_once_and_find_the_vector_itself(factory: str) -> None:
    rng = np.random.default_rng(2)
    base = unit(rng, 600, 16)
    index = VectorIndex(16, factory, min_train=400)
    index.add(np.arange(300), base[:300])
    assert index.kind.startswith("IDMap2,Flat") == factory.startswith("IVF")  # IVF waits for training
    index.add(np.arange(300, 600), base[300:])
    assert index.kind == factory and index.ntotal == 600
    index.remove(np.array([5]))
    _, got = index.search(base[:20], 1)
    assert got[5, 0] != 5
    hits = [int(got[i, 0]) == i for i in range(20) if i != 5]
    assert sum(hits) >= 18  # approximate search: itself is the top hit almost always


@pytest.mark.parametrize(("params", "nprobe"), [("nprobe=1", 1), ("nprobe=16", 16), ("nprobe=99", 32)])
def test_search_params_reach_the_trained_and_the_reloaded_index(tmp_path, params: str, nprobe: int) -> None:
    """`index_search_params` is applied after training and again on load; nprobe is capped at nlist."""
    import faiss

    rng = np.random.default_rng(3)
    index = VectorIndex(16, "IVF32,Flat", min_train=400, search_params=params)
    index.add(np.arange(1300), unit(rng, 1300, 16))  # 39 per list: trains at 1,248
    assert faiss.extract_index_ivf(index._index).nprobe == nprobe
    index.save(tmp_path / "snap", model_id="m", changes=1)
    loaded, _ = VectorIndex.load(tmp_path / "snap", min_train=400, search_params=params)
    assert faiss.extract_index_ivf(loaded._index).nprobe == nprobe


def search_until(
    index: VectorIndex, base: np.ndarray, done: threading.Event, errors: list[BaseException], seed: int
) -> None:
    """A reader thread: search until `done`; every hit is an id of `base` (its row) with its
    true inner product, best first. Failures go to `errors`."""
    r = np.random.default_rng(seed)
    try:
        while not done.is_set():
            q = unit(r, 4, base.shape[1])
            scores, ids = index.search(q, 10)
            for row in range(4):
                assert (ids[row] >= 0).all() and (ids[row] < len(base)).all()
                np.testing.assert_allclose(scores[row], base[ids[row]] @ q[row], atol=1e-5)
                assert (np.diff(scores[row]) <= 1e-6).all()  # best first
    except BaseException as exc:
        errors.append(exc)


def test_concurrent_adds_and_searches_are_consistent() -> None:
    """Writers add while readers search (faiss #367): no crash, every result is a real id
    whose score is its true inner product, and every vector is found after the fact."""
    rng = np.random.default_rng(3)
    d, batches, per = 32, 40, 50
    base = unit(rng, batches * per, d)
    index = VectorIndex(d)
    errors: list[BaseException] = []
    done = threading.Event()

    def writer(part: int) -> None:
        try:
            for b in range(part, batches, 2):
                sl = slice(b * per, (b + 1) * per)
                index.add(np.arange(sl.start, sl.stop), base[sl])
        except BaseException as exc:  # pragma: no cover - reported below
            errors.append(exc)

    writers = [threading.Thread(target=writer, args=(p,)) for p in range(2)]
    readers = [threading.Thread(target=search_until, args=(index, base, done, errors, s)) for s in range(4)]
    for t in writers + readers:
        t.start()
    for t in writers:
        t.join()
    done.set()
    for t in readers:
        t.join()
    assert not errors, errors[0]
    assert index.ntotal == len(base)
    _, top = index.search(base, 1)
    np.testing.assert_array_equal(top[:, 0], np.arange(len(base)))


@pytest.mark.parametrize(
    ("factory", "exact"), [("Flat", True), ("HNSW16", True), ("HNSW16,PQ4", False), ("IVF8,Flat", False)]
)
def test_reconstruct_gives_back_the_added_vectors_or_none(factory: str, exact: bool) -> None:
    """Searches by item id read the query vector back from the index: bit for bit what was
    added where the index keeps it (flat storage), else None (the caller reads the store)."""
    rng = np.random.default_rng(5)
    base = unit(rng, 400, 16)
    index = VectorIndex(16, factory, min_train=300)
    index.add(np.arange(400) * 7, base)
    got = index.reconstruct(np.array([14, 0, 7 * 399]))
    if exact:
        assert got is not None
        np.testing.assert_array_equal(got, base[[2, 0, 399]])
    else:
        assert got is None
    assert index.reconstruct(np.array([0, 5])) is None  # 5 was never added
    index.remove(np.array([14]))
    assert index.reconstruct(np.array([14])) is None  # removed (a tombstone on HNSW)


def test_snapshot_round_trip_and_corruption(tmp_path) -> None:
    rng = np.random.default_rng(4)
    base = unit(rng, 100, 8)
    index = VectorIndex(8)
    index.add(np.arange(100) * 3, base)
    path = tmp_path / "m.faiss"
    index.save(path, model_id="m", changes=42)
    loaded, head = VectorIndex.load(path)
    assert (head.model_id, head.changes, head.ntotal) == ("m", 42, 100)
    np.testing.assert_array_equal(loaded.search(base, 5)[1], index.search(base, 5)[1])

    data = path.read_bytes()
    path.write_bytes(data[: len(data) - 10])  # truncated
    with pytest.raises(SnapshotError, match="truncated or corrupt"):
        VectorIndex.load(path)
    flipped = bytearray(data)
    flipped[-100] ^= 0xFF  # one corrupted byte in the FAISS payload
    path.write_bytes(bytes(flipped))
    with pytest.raises(SnapshotError):
        VectorIndex.load(path)
    path.write_bytes(b"garbage")
    with pytest.raises(SnapshotError):
        VectorIndex.load(path)
    with pytest.raises(SnapshotError):
        VectorIndex.load(tmp_path / "missing.faiss")


def test_snapshot_keeps_the_extra_bytes_and_checks_them(tmp_path) -> None:
    index = VectorIndex(8)
    index.add(np.arange(3), unit(np.random.default_rng(7), 3, 8))
    path = tmp_path / "m.faiss"
    extra = b'[[0,"a",{"n":1}]]'
    index.save(path, model_id="m", changes=3, extra=extra)
    assert VectorIndex.load(path)[1].extra == extra
    data = bytearray(path.read_bytes())
    data[-3] ^= 0x01  # one bit of the extra section
    path.write_bytes(bytes(data))
    with pytest.raises(SnapshotError, match="truncated or corrupt"):
        VectorIndex.load(path)
    path.write_bytes(bytes(data[:-1]))
    with pytest.raises(SnapshotError, match="truncated or corrupt"):
        VectorIndex.load(path)
    index.save(path, model_id="m", changes=3)  # nothing beside the index
    assert VectorIndex.load(path)[1].extra == b""


def test_nlist_follows_the_collection_and_every_list_gets_its_training_points() -> None:
    # 4 sqrt(n) rounded down to a power of two, at most n / 39
    assert [nlist_for(n) for n in (1, 100, 10_000, 40_000, 160_000, 640_000, 1_000_000)] == [
        1, 2, 256, 512, 1024, 2048, 2048,
    ]  # fmt: skip
    for n in (50, 1234, 10_000, 77_777, 2_000_000):
        lists = nlist_for(n)
        cap = min(4 * math.sqrt(n), n / POINTS_PER_LIST)
        assert lists & (lists - 1) == 0 and lists <= cap < 2 * lists
    assert train_threshold("IVF1024,Flat", 10_000) == 39 * 1024  # a fixed nlist waits for its points
    assert train_threshold("IVF16,Flat", 10_000) == 10_000
    assert train_threshold("IVFauto,Flat", 10_000) == train_threshold("HNSW32", 10_000) == 10_000
    assert concrete_factory("IVFauto,PQ8", 10_000) == "IVF256,PQ8"


def test_an_auto_ivf_index_is_trained_with_the_lists_its_size_calls_for() -> None:
    import faiss

    rng = np.random.default_rng(11)
    index = VectorIndex(16, "IVFauto,Flat", min_train=500)
    index.add(np.arange(400), unit(rng, 400, 16))
    assert index.kind.startswith("IDMap2,Flat (until 500")
    index.add(np.arange(400, 1000), unit(rng, 600, 16))
    assert faiss.extract_index_ivf(index._index).nlist == nlist_for(1000) == 16
    assert index.kind == "IVFauto,Flat (16 lists, trained on 1000 vectors)"
    index.add(np.arange(1000, 4000), unit(rng, 3000, 16))
    assert index.upkeep_due() == "retrain"  # grown 4-fold: the service rebuilds it, as below
    vecs = unit(rng, 4000, 16)
    rebuilt = VectorIndex(16, "IVFauto,Flat", min_train=500)
    rebuilt.add(np.arange(4000), vecs)
    assert faiss.extract_index_ivf(rebuilt._index).nlist == 64 and rebuilt.upkeep_due() is None


def test_upkeep_is_due_for_tombstones_and_growth() -> None:
    rng = np.random.default_rng(6)
    hnsw = VectorIndex(16, "HNSW16")
    hnsw.add(np.arange(100), unit(rng, 100, 16))
    hnsw.remove(np.arange(20))
    assert hnsw.upkeep_due() is None  # 20 of 100: at the limit, not past it
    hnsw.remove(np.array([20]))
    assert hnsw.upkeep_due() == "compact"
    ivf = VectorIndex(16, "IVF4,Flat", min_train=200)
    ivf.add(np.arange(250), unit(rng, 250, 16))
    assert ivf.trained_on == 250 and ivf.upkeep_due() is None
    ivf.add(np.arange(250, 1000), unit(rng, 750, 16))
    assert ivf.upkeep_due() == "retrain"
    assert VectorIndex(16).upkeep_due() is None  # Flat: never


def graph_with_fresh(rng: np.random.Generator) -> tuple[VectorIndex, np.ndarray, np.ndarray]:
    """An HNSW index of 500 vectors (ids 0, 3, 6, ...): the first 400 in the graph (an add's
    overflow past `fresh_max` goes there itself), the last 100 in the fresh buffer."""
    base, ids = unit(rng, 500, 16), np.arange(500, dtype=np.int64) * 3
    index = VectorIndex(16, "HNSW16", fresh_max=100)
    index.add(ids, base)
    return index, base, ids


def test_graph_adds_go_to_the_fresh_buffer_and_searches_merge_it_exactly() -> None:
    """The fresh buffer holds at most fresh_max vectors and is searched with the graph; the
    merged results equal a float64 brute force over every vector (HNSW at efSearch 128 over
    400 vectors is exact on these queries), unfiltered and restricted to a subset."""
    rng = np.random.default_rng(12)
    index, base, ids = graph_with_fresh(rng)
    assert (index.pending, index._index.ntotal, index.ntotal) == (100, 400, 500)
    np.testing.assert_array_equal(index.reconstruct(ids[400:]), base[400:])  # the buffer's, bit for bit
    queries = np.concatenate([base[[0, 399, 400, 499]], unit(rng, 16, 16)])  # graph, fresh and new vectors
    for k in (1, 10, 150):
        scores, got = index.search(queries, k)
        want_scores, want = brute_topk(base, ids, queries, k)
        np.testing.assert_array_equal(got, want)
        np.testing.assert_allclose(scores, want_scores, atol=1e-5)
    subset = rng.choice(ids, 60, replace=False)  # from both parts
    rows = np.searchsorted(ids, np.sort(subset))
    scores, got = index.search(queries, 10, subset)
    np.testing.assert_array_equal(got, brute_topk(base[rows], ids[rows], queries, 10)[1])


def test_insert_pending_moves_the_fresh_buffer_into_the_graph() -> None:
    rng = np.random.default_rng(13)
    index, base, ids = graph_with_fresh(rng)
    queries = unit(rng, 20, 16)
    before = index.search(queries, 10)
    moved = []
    while step := index.insert_pending(budget_s=0.001):
        moved.append(step)
    assert sum(moved) == 100 and len(moved) > 1  # a few vectors a step, in its time budget
    assert (index.pending, index._index.ntotal, index.ntotal) == (0, 500, 500)
    after = index.search(queries, 10)
    np.testing.assert_array_equal(after[1], before[1])
    np.testing.assert_array_equal(after[1], brute_topk(base, ids, queries, 10)[1])
    np.testing.assert_allclose(after[0], before[0], atol=1e-6)


def test_fresh_removals_are_outright_and_graph_removals_tombstones() -> None:
    rng = np.random.default_rng(14)
    index, base, ids = graph_with_fresh(rng)
    index.remove(np.array([ids[10], ids[450], ids[451]]))  # one in the graph, two fresh
    assert index._tombstones == {int(ids[10])} and index.pending == 98 and index.ntotal == 497
    _, got = index.search(base[[10, 450, 451, 452]], 1)
    assert got[3, 0] == ids[452] and not {ids[10], ids[450], ids[451]} & set(got.ravel().tolist())
    np.testing.assert_array_equal(index.reconstruct(ids[[0, 452]]), base[[0, 452]])  # graph and fresh
    assert index.reconstruct(ids[[450]]) is None


@pytest.mark.parametrize("reader_fresh_max", [100, 0])
def test_snapshot_keeps_the_fresh_buffer(tmp_path, reader_fresh_max: int) -> None:
    """A snapshot holds the fresh vectors beside the graph; a host without the buffer
    (fresh_max 0) inserts them into its graph at load."""
    rng = np.random.default_rng(15)
    index, base, ids = graph_with_fresh(rng)
    index.save(tmp_path / "s", model_id="m", changes=500)
    loaded, head = VectorIndex.load(tmp_path / "s", fresh_max=reader_fresh_max)
    assert head.ntotal == loaded.ntotal == 500
    assert loaded.pending == (100 if reader_fresh_max else 0)
    queries = unit(rng, 20, 16)
    np.testing.assert_array_equal(loaded.search(queries, 10)[1], brute_topk(base, ids, queries, 10)[1])


def test_background_inserts_beside_adds_and_searches() -> None:
    """`insert_pending_until` empties the buffer while writers add and readers search: every
    result is a real id with its true score, best first; at the end the graph holds every
    vector and finds each one itself."""
    rng = np.random.default_rng(16)
    d, batches, per = 32, 40, 50
    base = unit(rng, batches * per, d)
    index = VectorIndex(d, "HNSW16", fresh_max=300)
    stop = threading.Event()
    errors: list[BaseException] = []
    inserter = threading.Thread(target=insert_pending_until, args=(lambda: index, stop), kwargs={"idle_s": 0.005})
    inserter.start()

    readers = [threading.Thread(target=search_until, args=(index, base, stop, errors, s)) for s in range(2)]
    for t in readers:
        t.start()
    for b in range(batches):
        index.add(np.arange(b * per, (b + 1) * per), base[b * per : (b + 1) * per])
        assert index.pending <= 300
    deadline = time.monotonic() + 30
    while index.pending:
        assert time.monotonic() < deadline
        time.sleep(0.01)
    stop.set()
    for t in [inserter, *readers]:
        t.join()
    assert not errors, errors[0]
    assert index._index.ntotal == index.ntotal == len(base)
    _, top = index.search(base, 1)
    assert np.mean(top[:, 0] == np.arange(len(base))) > 0.99
