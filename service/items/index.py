"""The FAISS index of one model: inner product on unit vectors, ids = item store pks.

Exact by default (`IDMap2,Flat`: IndexFlatIP behind IndexIDMap2). Another `factory` string
(`HNSW32`, `IVF1024,Flat`, `IVF256,PQ16`, ...) is built with `faiss.index_factory(d, factory,
METRIC_INNER_PRODUCT)`; an index that needs training stays exact until it has enough vectors
(`min_train`, and for IVF at least 39 per inverted list, what FAISS's k-means asks for), then
is trained on all of them; the service retrains it from the store when the collection has
grown RETRAIN_GROWTH-fold (`upkeep_due`). `IVFauto` in the factory (`IVFauto,Flat`) lets the
number of lists follow the collection: each training picks `nlist_for(N)`. IVF indexes take
our ids natively; others (HNSW) are wrapped in IndexIDMap2. Indexes that cannot remove vectors
(HNSW) keep removed ids as tombstones filtered out of results, and are rebuilt when the
tombstones pass COMPACT_TOMBSTONES of them.

Graph indexes (HNSW) with `fresh_max` > 0 take adds into a fresh exact buffer (an exact
index beside the graph, searched with it and merged by score), so an add costs an append
whatever the graph's size and is searchable at once; `insert_pending`, called by a
background thread (`insert_pending_until`), moves the oldest fresh vectors into the graph a
few tens of milliseconds at a time. An HNSW insert searches the graph, and its cost grows
with the graph (about 6x from 10k to 1M vectors of 512 floats, as the graph leaves the CPU's
caches); this takes it off the write path. Past `fresh_max` fresh vectors an add inserts
its overflow into the graph itself: the buffer is bounded, and so is the exact scan each
search pays for it (the growing, unindexed segment of Lucene, Qdrant and Milvus).

Concurrency (faiss issue #367): searches share an RWLock, add/remove/train hold it alone.

Snapshot file: MAGIC, 8-byte header length, JSON header (model, dim, factory, ntotal, the
change-log position it reflects, tombstones, sizes and sha256 of the two sections), the bytes
of `faiss.serialize_index`, then the caller's `extra` bytes (the follower keeps the ids and
metadata of the items there, follower.py). Written to a temporary file, fsynced and renamed;
a truncated or corrupted file fails the length or sha256 check and raises SnapshotError
(callers rebuild).
"""

from __future__ import annotations

import hashlib
import json
import math
import re
import struct
import threading
import time
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import faiss
import numpy as np

from service.contract.atomic import write_atomic
from service.items.rwlock import RWLock
from service.settings import DEFAULT_INDEX_SEARCH_PARAMS

MAGIC = b"SIMCLR-EMBED-FAISS-1\n"
COMPACT_TOMBSTONES = 0.2
RETRAIN_GROWTH = 4
EXACT = "IDMap2,Flat"
# FAISS's k-means warns below 39 training points per centroid (faiss/Clustering.cpp).
POINTS_PER_LIST = 39
_AUTO_NLIST = re.compile(r"IVFauto\b")
_FIXED_NLIST = re.compile(r"IVF(\d+)\b")


class SnapshotError(Exception):
    """A snapshot that is missing, truncated, corrupt or for another index."""


@dataclass(frozen=True)
class SnapshotHeader:
    model_id: str
    dim: int
    factory: str
    ntotal: int
    changes: int
    tombstones: list[int]
    log: dict[str, Any]
    extra: bytes = b""  # what the writer stored beside the index (b"": nothing, or a snapshot older than it)


def _is_exact(factory: str) -> bool:
    return factory.replace(" ", "") in ("", "Flat", EXACT, "IDMap,Flat")


def nlist_for(n: int) -> int:
    """Inverted lists for an IVF index trained on n vectors: the power of two at or below
    4 sqrt(n) (the low end of FAISS's guideline, "between 4*sqrt(N) and 16*sqrt(N)", wiki
    'Guidelines to choose an index', so that a fixed nprobe scans a larger share), and at
    most n / POINTS_PER_LIST so that every list gets its training points."""
    cap = min(4 * math.sqrt(n), n / POINTS_PER_LIST)
    return 1 << max(0, math.floor(math.log2(max(cap, 1.0))))


def concrete_factory(factory: str, n: int) -> str:
    """`factory` with `IVFauto` replaced by the lists for n training vectors."""
    return _AUTO_NLIST.sub(f"IVF{nlist_for(n)}", factory)


def train_threshold(factory: str, min_train: int) -> int:
    """Vectors a trainable `factory` waits for: `min_train`, and for a fixed number of IVF
    lists at least POINTS_PER_LIST per list."""
    fixed = _FIXED_NLIST.search(factory)
    return max(min_train, POINTS_PER_LIST * int(fixed.group(1))) if fixed else min_train


def _build(dim: int, factory: str) -> faiss.Index:
    """An empty index for `factory` (concrete: no `IVFauto`) that accepts add_with_ids."""
    if _is_exact(factory):
        return faiss.index_factory(dim, EXACT, faiss.METRIC_INNER_PRODUCT)
    index = faiss.index_factory(dim, factory, faiss.METRIC_INNER_PRODUCT)
    if faiss.try_extract_index_ivf(index) is None:
        index = faiss.index_factory(dim, f"IDMap2,{factory}", faiss.METRIC_INNER_PRODUCT)
    return index


def _hnsw_of(index: faiss.Index) -> Any:
    """The IndexHNSW behind our ID map, or None (flat, IVF, PQ: not a graph)."""
    if not hasattr(index, "index"):
        return None
    inner = faiss.downcast_index(index.index)
    return inner if isinstance(inner, getattr(faiss, "IndexHNSW")) else None  # noqa: B009 - the stubs lack it


def _apply_params(index: faiss.Index, params: str) -> None:
    space = faiss.ParameterSpace()
    for item in filter(None, params.split(",")):
        name, value = item.split("=")
        try:
            space.set_index_parameter(index, name, float(value) if "." in value else int(value))
        except RuntimeError:
            continue  # the parameter does not apply to this index type
    ivf = faiss.try_extract_index_ivf(index)
    if ivf is not None:
        ivf.nprobe = min(ivf.nprobe, ivf.nlist)


@dataclass(frozen=True)
class FrozenIndex:
    """A VectorIndex serialised at one instant: its FAISS bytes and the header fields of its
    state (see `VectorIndex.frozen`)."""

    blob: bytes
    header: dict[str, Any]

    def save(
        self, path: str | Path, *, model_id: str, changes: int, log: dict[str, Any] | None = None, extra: bytes = b""
    ) -> None:
        """Write the snapshot file atomically (see `VectorIndex.save`); checksums computed here,
        off the index's lock."""
        header = {
            "model_id": model_id,
            **self.header,
            "changes": changes,
            "log": log or {},
            "sha256": hashlib.sha256(self.blob).hexdigest(),
            "size": len(self.blob),
            "extra_sha256": hashlib.sha256(extra).hexdigest(),
            "extra_size": len(extra),
        }
        head = json.dumps(header).encode()
        write_atomic(Path(path), MAGIC + struct.pack("<Q", len(head)) + head + self.blob + extra)


class VectorIndex:
    def __init__(
        self,
        dim: int,
        factory: str = "Flat",
        *,
        min_train: int = 10_000,
        search_params: str = DEFAULT_INDEX_SEARCH_PARAMS,
        fresh_max: int = 0,
    ) -> None:
        self.dim = dim
        self.factory = factory
        self.min_train = train_threshold(factory, min_train)
        self.search_params = search_params
        self.lock = RWLock()
        self._tombstones: set[int] = set()
        target = _build(dim, concrete_factory(factory, self.min_train))
        # Trainable targets wait (exact) until min_train vectors exist.
        self._index = target if target.is_trained else _build(dim, EXACT)
        self._final = target.is_trained
        self.trained_on = 0  # vectors the trained target was trained on (0: untrained or untrainable)
        _apply_params(self._index, search_params)
        self.fresh_max = fresh_max
        self._fresh = self._fresh_buffer()
        self._step = 64  # fresh vectors per insert_pending call, adapted to its time budget
        self.graph_inserted, self.graph_insert_s = 0, 0.0  # what insert_pending moved, and its time
        self.overflow_inserted = 0  # vectors that adds inserted into the graph themselves (the buffer full)

    def _fresh_buffer(self) -> Any:
        """An empty fresh buffer when this index is a graph and buffers its adds, else None."""
        return _build(self.dim, EXACT) if self.fresh_max and _hnsw_of(self._index) is not None else None

    @property
    def ntotal(self) -> int:
        """Vectors searchable (tombstones excluded), the fresh buffer's included."""
        return self._index.ntotal + self.pending - len(self._tombstones)

    @property
    def pending(self) -> int:
        """Fresh vectors not yet in the graph (searched exactly meanwhile)."""
        return 0 if self._fresh is None else int(self._fresh.ntotal)

    @property
    def kind(self) -> str:
        if not self._final:
            return f"{EXACT} (until {self.min_train} vectors to train {self.factory})"
        ivf = faiss.try_extract_index_ivf(self._index)
        if ivf is not None and _AUTO_NLIST.search(self.factory):
            return f"{self.factory} ({ivf.nlist} lists, trained on {self.trained_on} vectors)"
        return self.factory

    def add(self, ids: np.ndarray, vectors: np.ndarray) -> None:
        """ids int64 [N], vectors float32 [N, D] (unit norm)."""
        ids = np.ascontiguousarray(ids, dtype=np.int64)
        vectors = np.ascontiguousarray(vectors, dtype=np.float32)
        if vectors.ndim != 2 or vectors.shape[1] != self.dim or len(ids) != len(vectors):
            raise ValueError(f"expected ids [N] and vectors [N, {self.dim}], got {ids.shape} and {vectors.shape}")
        if not len(ids):
            return
        with self.lock.write():
            if not self._final and self._index.ntotal + len(ids) >= self.min_train:
                self._train_with(ids, vectors)
                return
            if self._fresh is None:
                self._index.add_with_ids(vectors, ids)
                return
            # the overflow past fresh_max goes into the graph now: the buffer stays bounded
            direct = max(0, self._fresh.ntotal + len(ids) - self.fresh_max)
            if direct:
                self._index.add_with_ids(vectors[:direct], ids[:direct])
                self.overflow_inserted += direct
            if direct < len(ids):
                self._fresh.add_with_ids(vectors[direct:], ids[direct:])

    def insert_pending(self, budget_s: float = 0.025) -> int:
        """Move the oldest fresh vectors into the graph, about `budget_s` of graph inserts
        (searches wait that long at most); returns how many moved."""
        with self.lock.write():
            if not self.pending:
                return 0
            n = min(self.pending, self._step)
            began = time.perf_counter()
            self._move_fresh(n)
            took = time.perf_counter() - began
            self.graph_inserted, self.graph_insert_s = self.graph_inserted + n, self.graph_insert_s + took
        self._step = int(min(4096, max(8, n * budget_s / max(took, 1e-6))))
        return n

    def _move_fresh(self, n: int) -> None:
        """The n oldest fresh vectors into the graph (write lock held)."""
        fresh = self._fresh
        ids = faiss.vector_to_array(fresh.id_map)[:n].astype(np.int64)
        self._index.add_with_ids(fresh.index.reconstruct_n(0, n), ids)  # [n, D]
        fresh.remove_ids(faiss.IDSelectorBatch(ids))

    def _train_with(self, ids: np.ndarray, vectors: np.ndarray) -> None:
        """Move from the exact stand-in to the trained target (write lock held)."""
        old = self._index
        mapped: Any = faiss.downcast_index(old)  # an IndexIDMap over the exact stand-in
        old_ids = faiss.vector_to_array(mapped.id_map).astype(np.int64)
        old_vecs = mapped.index.reconstruct_n(0, old.ntotal)  # [M, D]
        all_ids = np.concatenate([old_ids, ids])
        all_vecs = np.ascontiguousarray(np.concatenate([old_vecs, vectors]))
        target = _build(self.dim, concrete_factory(self.factory, len(all_vecs)))
        target.train(all_vecs)
        target.add_with_ids(all_vecs, all_ids)
        _apply_params(target, self.search_params)
        self._index, self._final = target, True
        self.trained_on = len(all_vecs)

    def remove(self, ids: np.ndarray) -> None:
        ids = np.ascontiguousarray(ids, dtype=np.int64)
        with self.lock.write():
            fresh = np.isin(ids, faiss.vector_to_array(self._fresh.id_map)) if self.pending else None
            if fresh is not None and fresh.any():  # fresh vectors are removed outright
                self._fresh.remove_ids(faiss.IDSelectorBatch(ids[fresh]))
                ids = ids[~fresh]
            try:
                self._index.remove_ids(faiss.IDSelectorBatch(ids))
            except RuntimeError:  # e.g. HNSW cannot remove: filter at search time instead
                self._tombstones.update(int(i) for i in ids)

    def upkeep_due(self) -> str | None:
        """Why this index should be rebuilt from the store, if it should: "compact" when
        tombstones pass COMPACT_TOMBSTONES of its vectors (HNSW cannot remove, and every search
        asks for k plus their number); "retrain" when a trained index (IVF) holds
        RETRAIN_GROWTH times the vectors it was trained on (its lists were fitted to a
        collection that has since grown, and FAISS wants about 39 points per list)."""
        with self.lock.read():
            total, dead = self._index.ntotal, len(self._tombstones)
        if dead and dead > COMPACT_TOMBSTONES * total:
            return "compact"
        if self.trained_on and total >= RETRAIN_GROWTH * self.trained_on:
            return "retrain"
        return None

    def _holds_exact_vectors(self) -> bool:
        """Whether the index keeps each vector as it was added: flat storage behind our ID map
        (Flat, HNSW over flat storage), not PQ or scalar-quantised codes. IVF indexes keep no
        direct map from our ids to their lists (it would cost a hash entry per vector), so
        they cannot give a vector back by id."""
        if faiss.try_extract_index_ivf(self._index) is not None:
            return False
        mapped: Any = self._index  # IndexIDMap2 over the codes
        hnsw = _hnsw_of(mapped)
        inner = faiss.downcast_index(mapped.index if hnsw is None else hnsw.storage)
        return isinstance(inner, faiss.IndexFlat)

    def reconstruct(self, ids: np.ndarray) -> np.ndarray | None:
        """The vectors stored under `ids` (float32 [N, D], bit for bit what was added), or None
        when this index does not keep them exactly (`_holds_exact_vectors`) or lacks one of
        the ids: the caller reads them from the store instead."""
        with self.lock.read():
            if not self._holds_exact_vectors() or any(int(i) in self._tombstones for i in ids):
                return None
            out = np.empty((len(ids), self.dim), dtype=np.float32)
            try:
                for row, i in enumerate(ids):
                    out[row] = self._reconstruct_one(int(i))
            except RuntimeError:  # an id the index does not hold
                return None
        return out

    def _reconstruct_one(self, i: int) -> np.ndarray:
        """The vector of id i from the fresh buffer or the graph (RuntimeError: neither holds it)."""
        if self.pending:
            try:
                return self._fresh.reconstruct(i)
            except RuntimeError:  # not fresh: in the graph, if anywhere
                pass
        return np.asarray(self._index.reconstruct(i))

    @property
    def exact(self) -> bool:
        """Searches return the true top k (Flat, or a trainable index still waiting for data)."""
        return not self._final or _is_exact(self.factory)

    @staticmethod
    def _selector_params(index: faiss.Index, subset: np.ndarray) -> faiss.SearchParameters:
        """Search parameters restricting `index`'s candidates to the ids `subset` (int64),
        keeping its own efSearch / nprobe (plain SearchParameters would reset them)."""
        selector = faiss.IDSelectorBatch(np.ascontiguousarray(subset, dtype=np.int64))
        params: Any
        ivf = faiss.try_extract_index_ivf(index)
        hnsw = _hnsw_of(index)
        if ivf is not None:
            params = faiss.SearchParametersIVF()
            params.nprobe = ivf.nprobe
        elif hnsw is not None:
            params = getattr(faiss, "SearchParametersHNSW")()  # noqa: B009
            params.efSearch = hnsw.hnsw.efSearch
        else:
            params = faiss.SearchParameters()
        params.sel = selector
        return params

    @classmethod
    def _search_one(
        cls, index: faiss.Index, queries: np.ndarray, want: int, subset: np.ndarray | None
    ) -> tuple[np.ndarray, np.ndarray]:
        """(scores, ids) [Q, <= want] of one FAISS index (read lock held)."""
        want = min(want, index.ntotal if subset is None else min(index.ntotal, len(subset)))
        if want == 0:
            empty = np.empty((len(queries), 0))
            return empty.astype(np.float32), empty.astype(np.int64)
        params = None if subset is None else cls._selector_params(index, subset)
        return index.search(queries, want, params=params)

    def search(self, queries: np.ndarray, k: int, subset: np.ndarray | None = None) -> tuple[np.ndarray, np.ndarray]:
        """queries float32 [Q, D] -> (scores [Q, k'], ids [Q, k']), best first, k' <= k; -1 ids
        dropped. `subset` (int64 ids) restricts candidates to those ids inside FAISS (an
        IDSelector): exact on Flat, approximate on IVF and HNSW."""
        queries = np.ascontiguousarray(queries, dtype=np.float32)
        if queries.ndim != 2 or queries.shape[1] != self.dim:
            raise ValueError(f"expected queries [Q, {self.dim}], got {queries.shape}")
        with self.lock.read():
            scores, ids = self._search_one(self._index, queries, k + len(self._tombstones), subset)  # [Q, want]
            if self.pending:  # the fresh buffer's best, merged by score
                fresh_scores, fresh_ids = self._search_one(self._fresh, queries, k, subset)
                scores, ids = np.concatenate([scores, fresh_scores], 1), np.concatenate([ids, fresh_ids], 1)
                order = np.argsort(-scores, axis=1, kind="stable")
                scores, ids = np.take_along_axis(scores, order, 1), np.take_along_axis(ids, order, 1)
            dead = self._tombstones.copy()
        if dead or (ids < 0).any():
            keep = [
                [j for j in range(ids.shape[1]) if ids[q, j] >= 0 and int(ids[q, j]) not in dead][:k]
                for q in range(len(queries))
            ]
            width = min((len(row) for row in keep), default=0)
            scores = np.stack([scores[q, row[:width]] for q, row in enumerate(keep)])
            ids = np.stack([ids[q, row[:width]] for q, row in enumerate(keep)])
        return scores[:, :k], ids[:, :k]

    # -- snapshots ----------------------------------------------------------------------

    def frozen(self) -> FrozenIndex:
        """The index serialised as it is now (the read lock held for the copy only), to be
        written as a snapshot off every lock (`FrozenIndex.save`)."""
        with self.lock.read():
            fresh = faiss.serialize_index(self._fresh).tobytes() if self.pending else b""
            return FrozenIndex(
                blob=faiss.serialize_index(self._index).tobytes() + fresh,
                header={
                    "dim": self.dim,
                    "factory": self.factory,
                    "final": self._final,
                    "trained_on": self.trained_on,
                    "ntotal": self.ntotal,
                    "tombstones": sorted(self._tombstones),
                    "fresh_size": len(fresh),  # the fresh buffer's bytes, at the blob's end
                },
            )

    def save(
        self, path: str | Path, *, model_id: str, changes: int, log: dict[str, Any] | None = None, extra: bytes = b""
    ) -> None:
        """Write the snapshot atomically; `changes` is the change-log position the index
        reflects (`log`: the rest of the follower's position, see follower.LogPosition;
        `extra`: bytes kept with it, given back by `load`)."""
        self.frozen().save(path, model_id=model_id, changes=changes, log=log, extra=extra)

    @classmethod
    def load(
        cls,
        path: str | Path,
        *,
        min_train: int = 10_000,
        search_params: str = DEFAULT_INDEX_SEARCH_PARAMS,
        fresh_max: int = 0,
    ) -> tuple[VectorIndex, SnapshotHeader]:
        """Read a snapshot; raises SnapshotError when it is missing or damaged in any way."""
        try:
            data = Path(path).read_bytes()
        except OSError as exc:
            raise SnapshotError(f"cannot read {path}: {exc}") from exc
        try:
            if not data.startswith(MAGIC):
                raise SnapshotError(f"{path} is not an index snapshot")
            (hlen,) = struct.unpack_from("<Q", data, len(MAGIC))
            start = len(MAGIC) + 8
            header = json.loads(data[start : start + hlen])
            size, extra_size = header["size"], header.get("extra_size", 0)
            blob = data[start + hlen : start + hlen + size]
            extra = data[start + hlen + size :]
            if (
                len(blob) != size
                or hashlib.sha256(blob).hexdigest() != header["sha256"]
                or len(extra) != extra_size
                or (extra_size and hashlib.sha256(extra).hexdigest() != header["extra_sha256"])
            ):
                raise SnapshotError(f"{path} is truncated or corrupt (size or sha256 mismatch)")
            fresh_size = int(header.get("fresh_size", 0))  # 0 in snapshots older than the fresh buffer
            index = faiss.deserialize_index(np.frombuffer(blob, dtype=np.uint8, count=size - fresh_size))
            fresh = (
                faiss.deserialize_index(np.frombuffer(blob, np.uint8, offset=size - fresh_size)) if fresh_size else None
            )
        except SnapshotError:
            raise
        except (struct.error, ValueError, KeyError, TypeError, RuntimeError) as exc:
            raise SnapshotError(f"{path} is unreadable: {exc}") from exc
        self = cls(
            header["dim"], header["factory"], min_train=min_train, search_params=search_params, fresh_max=fresh_max
        )
        self._index, self._final = index, bool(header["final"])
        self.trained_on = int(header.get("trained_on", 0))
        self._tombstones = set(header["tombstones"])
        _apply_params(self._index, search_params)
        if fresh is not None:  # the snapshot's buffer (an IndexIDMap2, as _fresh_buffer builds)
            self._fresh = fresh
            if not fresh_max:  # a host without the buffer inserts it into its graph
                self._move_fresh(self.pending)
                self._fresh = None
        meta = SnapshotHeader(
            header["model_id"],
            header["dim"],
            header["factory"],
            header["ntotal"],
            header["changes"],
            header["tombstones"],
            header.get("log", {}),
            extra,
        )
        return self, meta


def insert_pending_until(
    served: Callable[[], VectorIndex | None], stop: threading.Event, *, budget_s: float = 0.025, idle_s: float = 0.05
) -> None:
    """Move the served index's fresh vectors into its graph until `stop` (the body of a
    background thread; `served` is read again each step, so an index swapped in is followed).
    Pauses briefly between steps so that searches waiting on the lock get in (it prefers
    writers)."""
    while True:
        index = served()
        moved = index.insert_pending(budget_s) if index is not None else 0
        if stop.wait(0.002 if moved else idle_s):
            return
