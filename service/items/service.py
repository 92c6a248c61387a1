"""ItemService: items, their vectors and the served FAISS index, tied to the encoder runtime.

One vector space's index is served at a time. Activating another model starts re-embedding
(a background thread running `reindex.reembed_all`, or a worker; a claim in the store makes
it run once); until the new space is complete, searches answer from the old index and adds
are embedded with both models. Then the new index is swapped in atomically.

The served index follows the store's change log (`follower.LogFollower`): a background
thread applies it every `index_follow_s`, so items written by any process (a worker's bulk
job or re-embedding) become searchable within a poll, and this process's own writes apply
it right after their commit, so a caller reads its own writes. Images are decoded and
embedded first (slow, no lock held), then under one mutex the originals are written and the
store commits (counters and log rows in the same transaction). Snapshots are written off
the hot path: another thread copies the served index in memory while the log waits, then
checksums and writes it off every lock, so no add or search waits on a full-index write.
On HNSW an add lands in the index's fresh buffer and another thread inserts it into the
graph (`index.insert_pending_until`), so no add waits on the graph's insert either.

The store unreachable (PostgreSQL down): writes answer StoreUnavailableError (503), searches
answer from the served index and the ids and metadata kept with it, a search by item id
included (its vector is read back from the index, `VectorIndex.reconstruct`; an IVF or
PQ index cannot give it back, so there such a search needs the store and answers 503). A
host started meanwhile serves the active model's snapshot from its own disk when it has one
(searches answer, writes 503), and once the store answers checks it against the store and
replays the log after it before taking writes again; without a snapshot it is not ready
until the store answers.
"""

from __future__ import annotations

import asyncio
import logging
import threading
import time
from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any, Protocol

import numpy as np

from service.contract.imaging import EncodedImages
from service.contract.registry import ModelRegistry
from service.contract.variants import split_vector_space
from service.items.backend import Item, NewItem, ReembedProgress
from service.items.errors import (
    IndexNotReadyError,
    InvalidItemRequestError,
    ItemConflictError,
    ItemNotFoundError,
    OriginalInCollectionError,
    StoreUnavailableError,
)
from service.items.filters import Condition
from service.items.follower import LogFollower
from service.items.index import SnapshotError, VectorIndex, insert_pending_until
from service.items.reindex import (
    Encoder,
    build_from_store,
    catch_up,
    load_or_build_index,
    open_store,
    read_snapshot,
    reembed_all,
    space_of,
    write_snapshot,
)
from service.settings import Settings

log = logging.getLogger(__name__)

SNAPSHOT_FRACTION = 10  # a snapshot once the log since the last one reaches 1/10 of the index


class Runtime(Protocol):
    """What the item service needs of service.runtime.RuntimeManager."""

    def get(self, model_id: str | None = None) -> Encoder: ...

    async def embed(self, images: EncodedImages, model_id: str | None = None) -> tuple[str, np.ndarray]: ...

    def add_listener(self, callback: Any) -> None: ...


@dataclass(frozen=True)
class Hit:
    id: str
    score: float
    metadata: dict[str, Any] | None


@dataclass(frozen=True)
class SearchOptions:
    """What narrows a search: metadata conditions (AND), a score floor, and (per query) an
    item pk to leave out (the query item itself, for `exclude_self`)."""

    where: Sequence[Condition] = ()
    min_score: float | None = None


def _no_index() -> IndexNotReadyError:
    return IndexNotReadyError("no model's index is being served yet; activate a model and retry")


class ItemService:
    def __init__(self, settings: Settings, runtime: Runtime, *, reembed_in_process: bool = True) -> None:
        self.settings = settings
        self.runtime = runtime
        self.registry = ModelRegistry(settings.models_dir)
        self.store, self.blobs = open_store(settings)
        self.reembed_in_process = reembed_in_process
        self.served: str | None = None  # the served vector space
        self.pending: str | None = None
        self.index_source = ""  # how the served index was obtained: "snapshot" or "rebuilt: ..."
        self._follower: LogFollower | None = None
        self._snapshot_applied = 0  # follower.applied when the last snapshot was started
        self._snapshotter: threading.Thread | None = None
        self._upkeep: threading.Thread | None = None
        self._mutex = threading.RLock()
        self._job: tuple[str, threading.Thread, threading.Event] | None = None
        self._closing = threading.Event()
        self._swept_at = time.monotonic()
        self._unstarted: str | None = None  # why the store failed at start: _start_serving is retried
        self._offline = False  # serving a snapshot read while the store was down, not caught up yet
        self._poller = threading.Thread(target=self._follow_loop, name="index-follow", daemon=True)
        self._inserter = threading.Thread(  # HNSW: the fresh buffer into the graph, off the write path
            target=insert_pending_until, args=(self._served_index, self._closing), name="index-graph", daemon=True
        )

    # -- lifecycle ----------------------------------------------------------------------

    def start(self) -> None:
        """Serve an index (`_start_serving`) and follow the log. A store unreachable at start
        leaves the host up with the active model's local snapshot if it has one (searches
        answer, writes 503), else without an index (not ready, writes 503); the follow loop
        retries until the store answers, with no restart."""
        try:
            self._start_serving()
        except StoreUnavailableError as exc:
            log.warning("the item store is unreachable at start (%s); retrying while following", exc.message)
            self._unstarted = exc.message
            self._serve_local_snapshot()
        self.runtime.add_listener(self.on_activate)
        self._poller.start()
        self._inserter.start()

    def _serve_local_snapshot(self) -> None:
        """While the store is down at start: serve the active model's snapshot on this host's
        disk when it holds the items' ids and metadata (the registry is on the shared data
        dir, readable without the store). It is checked and caught up in `_start_serving`."""
        active_id = self.registry.active()
        if not active_id:
            return
        space = space_of(self.settings, self.registry, active_id)
        try:
            follower, has_records = read_snapshot(self.settings, self.store, space, self._dim(space))
        except SnapshotError as exc:
            log.warning("no local snapshot of %s to serve while the store is down: %s", space, exc)
            return
        if not has_records:
            log.warning("the local snapshot of %s lacks the items' ids and metadata; not serving it", space)
            return
        with self._mutex:
            self._follower, self._offline = follower, True
            self.served, self.index_source = space, "snapshot (the store was unreachable at start)"
        log.info("serving the local snapshot of %s (%d vectors) until the store answers", space, follower.index.ntotal)

    def _catch_up_offline(self) -> None:
        """The store answers again: replay the log after the snapshot served meanwhile, or
        drop it when the store no longer matches it (`_start_serving` then rebuilds)."""
        follower = self._follower
        assert follower is not None
        try:
            catch_up(follower, has_records=True)
        except SnapshotError as exc:
            log.warning("the snapshot served while the store was down is unusable (%s); rebuilding", exc)
            with self._mutex:
                self._follower, self.served = None, None
        self._offline = False

    def _start_serving(self) -> None:
        """Pick the served space (the active model's when complete), load its index.

        Models are held as vector spaces (model and variant, `space_of`) from here on."""
        if self._offline:
            self._catch_up_offline()
        active_id = self.registry.active()
        active = space_of(self.settings, self.registry, active_id) if active_id else None
        completed = self.store.completed_models()
        if active and (active in completed or (self.store.count() == 0 and self._mark_complete(active))):
            self._install(active)
        elif completed:
            self._install(completed[0])
        if active_id and active != self.served:
            self.on_activate(active_id)
        self._unstarted = None

    def close(self) -> None:
        """Stop re-embedding and following, snapshot the served index, close the store."""
        self._closing.set()
        if self._job:
            self._job[2].set()
            self._job[1].join(timeout=30)
        for loop in (self._poller, self._inserter):
            if loop.is_alive():
                loop.join(timeout=30)
        for thread in (self._snapshotter, self._upkeep):
            if thread:
                thread.join(timeout=300)
        with self._mutex:
            try:
                if self._follower is not None and not self._offline:
                    self._follower.poll()
                    write_snapshot(self.settings, self._follower)
            except StoreUnavailableError as exc:  # the snapshot on disk stays, the log replays after it
                log.warning("no snapshot at shutdown: %s", exc.message)
            self.store.close()

    def _dim(self, space: str) -> int:
        return self.registry.get(split_vector_space(space)[0]).embedding_dim

    def _mark_complete(self, space: str) -> bool:
        return self.store.mark_complete(space, self._dim(space))

    def _install(self, space: str) -> None:
        """Load or build `space`'s index and serve it (the old one is dropped)."""
        if space == self.served:
            return
        follower, source = load_or_build_index(self.settings, self.store, space, self._dim(space))
        with self._mutex:
            follower.poll()  # rows committed while it was built
            old = self.served
            self._follower, self._snapshot_applied = follower, 0
            self.served, self.index_source = space, source
            if self.pending == space:
                self.pending = None
            if old:
                self.store.clear_complete(old)
        log.info("serving the index of %s (%d vectors, %s)", space, follower.index.ntotal, source)

    def on_activate(self, model_id: str) -> None:
        """RuntimeManager listener: re-embed everything with `model_id`, then swap."""
        space = space_of(self.settings, self.registry, model_id)  # at this deployment's variant
        with self._mutex:
            if self._job and self._job[0] != space:
                self._job[2].set()
                self._job = None
            if space == self.served:
                self.pending = None
                return
            self.pending = space
            if self.reembed_in_process and self._job is None:
                stop = threading.Event()
                thread = threading.Thread(
                    target=self._reembed, args=(space, stop), name=f"reembed-{space}", daemon=True
                )
                self._job = (space, thread, stop)
                thread.start()

    def _reembed(self, space: str, stop: threading.Event) -> None:
        try:
            try:
                encoder: Encoder | None = self.runtime.get(space)  # the loaded session of that space
            except Exception:
                encoder = None  # not loaded here: reembed_all opens its own
            reembed_all(self.settings, self.registry, space, encoder=encoder, should_stop=stop)
            if not stop.is_set() and self.pending == space and self.store.state(space).complete:
                self._install(space)
        except Exception:
            log.exception("re-embedding into %s failed; still serving %s", space, self.served)
        finally:
            with self._mutex:
                if self._job and self._job[0] == space:
                    self._job = None

    def _follow_loop(self) -> None:
        """Apply the change log to the served index; swap to a pending space that another
        process completed; start a background snapshot when enough has changed."""
        while not self._closing.wait(self.settings.index_follow_s):
            try:
                if self._unstarted is not None:
                    self._start_serving()
                follower = self._follower
                if follower is not None:
                    follower.poll()
                    self._maybe_snapshot(follower)
                    self._maybe_upkeep(follower)
                if time.monotonic() - self._swept_at >= self.settings.originals_sweep_s:
                    self.sweep_originals()
                pending = self.pending
                if pending is not None and self._job is None and self.store.state(pending).complete:
                    self._install(pending)
            except StoreUnavailableError as exc:  # the database is down: searches answer from the index meanwhile
                log.warning("following the change log: %s", exc.message)
            except Exception:  # a failed poll (e.g. the store busy) is retried at the next tick
                log.exception("following the change log failed; retrying")

    def sweep_originals(self) -> int:
        """Delete the originals no item has referred to for `originals_grace_s` (sqlstore.py,
        "Originals": decided in the store's transaction, so no host's add of the same bytes
        loses its file); returns how many were deleted."""
        self._swept_at = time.monotonic()
        shas = self.store.claim_orphans(self.settings.originals_grace_s)
        for sha in shas:
            self.blobs.delete(sha)
        self.store.finish_orphans(shas)
        return len(shas)

    def _maybe_snapshot(self, follower: LogFollower) -> None:
        due = max(self.settings.index_snapshot_every, follower.index.ntotal // SNAPSHOT_FRACTION)
        busy = self._snapshotter is not None and self._snapshotter.is_alive()
        if busy or follower.applied - self._snapshot_applied < due:
            return
        self._snapshot_applied = follower.applied
        self._snapshotter = threading.Thread(
            target=self._background_snapshot, args=(follower,), name="index-snapshot", daemon=True
        )
        self._snapshotter.start()

    def _background_snapshot(self, follower: LogFollower) -> None:
        """The served index as it is, copied in memory while the log waits (write_snapshot),
        then checksummed and written off every lock: an add waits at most for the copy, a
        search not at all. (Loading the last snapshot and replaying the log on a copy instead
        cost a core for most of the time at 1M items.)"""
        try:
            write_snapshot(self.settings, follower)
        except Exception:
            log.exception("background snapshot of %s failed; the next one retries", follower.space)

    def _maybe_upkeep(self, follower: LogFollower) -> None:
        """Rebuild the served index in the background when it asks (VectorIndex.upkeep_due)."""
        if (self._upkeep is not None and self._upkeep.is_alive()) or not (why := follower.index.upkeep_due()):
            return
        self._upkeep = threading.Thread(
            target=self._rebuild, args=(follower.space, follower.index.dim, why), name="index-upkeep", daemon=True
        )
        self._upkeep.start()

    def _rebuild(self, space: str, dim: int, why: str) -> None:
        """Build a new index from the store (own connection) while the old one serves, then
        swap it in once it has caught up with the log."""
        store, _ = open_store(self.settings)
        try:
            follower = build_from_store(self.settings, store, space, dim)
            write_snapshot(self.settings, follower)  # of the copy, before it serves
        except Exception:
            log.exception("rebuilding the index of %s (%s) failed; the old one keeps serving", space, why)
            store.close()
            return
        follower.store = self.store  # the background connection closes below
        store.close()
        with self._mutex:
            if self.served != space or self._closing.is_set():
                return
            follower.poll()
            self._follower, self._snapshot_applied = follower, 0
        log.info("index of %s rebuilt in the background (%s): %d vectors", space, why, follower.index.ntotal)

    def reembedding(self) -> ReembedProgress | None:
        """The re-embedding job of the pending space (or the last one of the served space)."""
        space = self.pending or self.served
        return self.store.reembed_progress(space) if space else None

    # -- embedding ----------------------------------------------------------------------

    async def _embed(self, space: str, images: EncodedImages) -> np.ndarray:
        """Images -> float32 [N, D] in `space` (micro-batched; loads a retired model again)."""
        _, vectors = await self.runtime.embed(images, model_id=space)
        return vectors

    def _writable(self) -> None:
        """Writes wait until the store answered since start-up: then the served index (a
        snapshot read meanwhile) has been caught up, so this write's log row is applied after
        every earlier one."""
        if self._unstarted is not None:
            raise StoreUnavailableError(self._unstarted)

    def _targets(self) -> list[str]:
        self._writable()
        if self.served is None:
            raise _no_index()
        return [self.served] + ([self.pending] if self.pending else [])

    # -- items --------------------------------------------------------------------------

    async def add(
        self,
        ids: Sequence[str],
        originals: Sequence[tuple[bytes, str]],
        images: EncodedImages,
        metadata: Sequence[dict[str, Any] | None],
        *,
        replace: bool,
    ) -> list[str]:
        """Store items (originals as (bytes, media type), their `images`, metadata) with a vector
        per served/pending space, and index them. All or nothing."""
        datas, types = [d for d, _ in originals], [t for _, t in originals]
        vectors: dict[str, np.ndarray] = {}
        while True:
            for space in self._targets():
                if space not in vectors:
                    vectors[space] = await self._embed(space, images)
            try:
                if await asyncio.to_thread(self._commit_add, ids, datas, types, metadata, vectors, replace):
                    return list(ids)
            except OriginalInCollectionError:  # a sweep is deleting one of these files: write it again
                await asyncio.sleep(OriginalInCollectionError.retry_after_s)

    def _commit_add(
        self,
        ids: Sequence[str],
        datas: Sequence[bytes],
        types: Sequence[str],
        metadata: Sequence[dict[str, Any] | None],
        vectors: dict[str, np.ndarray],
        replace: bool,
    ) -> bool:
        with self._mutex:
            targets = self._targets()
            if any(m not in vectors for m in targets):
                return False  # the spaces changed while embedding: embed with the new model first
            shas = [self.blobs.put(d) for d in datas]
            new = [NewItem(i, s, t, m) for i, s, t, m in zip(ids, shas, types, metadata, strict=True)]
            self.store.add(new, {m: vectors[m] for m in targets}, replace=replace, present=self.blobs.exists)
            self._apply_log()
        return True

    def _apply_log(self) -> None:
        """Bring the served index up to the log now (read-your-writes after a commit)."""
        if self._follower is not None:
            self._follower.poll()

    def get(self, item_id: str) -> Item:
        item = self.store.get(item_id)
        if item is None:
            raise ItemNotFoundError(f"no item with id {item_id!r}")
        return item

    def original(self, item_id: str) -> tuple[bytes, str]:
        item = self.get(item_id)
        try:
            return self.blobs.get(item.sha256), item.content_type
        except OSError as exc:
            raise ItemNotFoundError(
                f"the original of {item_id!r} is missing from the blob store", code="original_missing"
            ) from exc

    def delete(self, item_id: str) -> None:
        with self._mutex:
            self._writable()
            if self.store.delete(item_id) is None:
                raise ItemNotFoundError(f"no item with id {item_id!r}")
            self._apply_log()  # an original no longer referenced is left to sweep_originals

    def update_metadata(self, item_id: str, metadata: dict[str, Any] | None, *, merge: bool) -> Item:
        """Replace an item's metadata, or merge into it (a key set to null removes it)."""
        with self._mutex:
            self._writable()
            item = self.store.update_metadata(item_id, metadata, merge=merge)
            if item is None:
                raise ItemNotFoundError(f"no item with id {item_id!r}")
            self._apply_log()  # searches filter on the new metadata at once
        return item

    def page(self, offset: int, limit: int) -> tuple[list[Item], int]:
        return self.store.page(offset, limit)

    # -- search -------------------------------------------------------------------------

    def _served_index(self) -> VectorIndex | None:
        follower = self._follower
        return None if follower is None else follower.index

    def _served(self) -> tuple[str, LogFollower]:
        """The served space and its follower, read once without the mutex: a write holding it
        while the store does not answer (up to `store_timeout_s`) must not hold up searches."""
        follower = self._follower  # one reference: its space is the served one
        if follower is None:
            self._writable()  # no index yet: it is loaded once the store answers
            raise _no_index()
        return follower.space, follower

    def _candidates(
        self, follower: LogFollower, queries: np.ndarray, want: int, where: Sequence[Condition]
    ) -> tuple[np.ndarray, np.ndarray]:
        """(scores [Q, k'], pks [Q, k']) of the best `want` per query among the items meeting
        `where` (evaluated on the metadata kept with the index): FAISS with an IDSelector on
        the matching pks (exact on Flat), or, on an approximate index, an exact scan of the
        matching items' stored vectors when they are few enough and the store answers."""
        index = follower.index
        if not where:
            return index.search(queries, want)
        subset = follower.matching(where)
        if index.exact or len(subset) > self.settings.index_filter_scan_max:
            return index.search(queries, want, subset)
        try:
            pks, vecs = self.store.vectors_of(follower.space, subset.tolist())  # [M], [M, D]
        except StoreUnavailableError:  # the store is down: the index's own (approximate) answer
            return index.search(queries, want, subset)
        if not len(pks):
            return np.empty((len(queries), 0), np.float32), np.empty((len(queries), 0), np.int64)
        scores = queries @ vecs.T  # [Q, M]
        order = np.argsort(-scores, axis=1, kind="stable")[:, :want]
        return np.take_along_axis(scores, order, axis=1), pks[order]

    def search_vectors(
        self,
        vectors: Sequence[Sequence[float]] | np.ndarray,
        k: int,
        space: str | None = None,
        options: SearchOptions = SearchOptions(),
        exclude: Sequence[int | None] | None = None,
    ) -> tuple[str, list[list[Hit]]]:
        """Top-k items per query by inner product with each unit-normalised vector ([Q, D]),
        in one FAISS pass. `exclude[q]`: a pk left out of query q's results."""
        served, follower = self._served()
        index = follower.index
        if space is not None and space != served:
            # the caller embedded with a model we are no longer serving
            raise ItemConflictError(f"the served index is now {served}; retry the search", code="model_changed")
        queries = np.asarray(vectors, dtype=np.float64)
        if queries.ndim != 2 or queries.shape[1] != index.dim:
            width = queries.shape[-1] if queries.ndim else 0
            raise InvalidItemRequestError(
                f"the vector has {width} dimensions; model {served} uses {index.dim}", code="wrong_dimension"
            )
        norms = np.linalg.norm(queries, axis=1, keepdims=True)  # [Q, 1]
        if not np.isfinite(norms).all() or (norms == 0).any():
            raise InvalidItemRequestError("the vector must be finite and non-zero", code="invalid_vector")
        excluded = list(exclude) if exclude is not None else [None] * len(queries)
        extra = int(any(p is not None for p in excluded))
        scores, pks = self._candidates(follower, (queries / norms).astype(np.float32), k + extra, options.where)
        items = follower.records({int(p) for p in pks.ravel()})
        floor = -np.inf if options.min_score is None else options.min_score
        results = []
        for row_scores, row_pks, skip in zip(scores, pks, excluded, strict=True):
            hits = [
                Hit(items[int(p)].id, float(s), items[int(p)].metadata)
                for s, p in zip(row_scores, row_pks, strict=True)
                if int(p) in items and int(p) != skip and s >= floor
            ]
            results.append(hits[:k])
        return split_vector_space(served)[0], results

    def search_items(
        self, item_ids: Sequence[str], k: int, options: SearchOptions = SearchOptions(), *, exclude_self: bool = False
    ) -> tuple[str, list[list[Hit]]]:
        """Search with the vectors of `item_ids`, optionally leaving each item out of its own
        results. The vectors are read back from the served index with the pks kept beside it
        (no store read, so this answers while the store is down); where the index cannot give
        them back (IVF, PQ codes) or lacks one, from the store."""
        served, follower = self._served()
        known = follower.pks_of(item_ids)
        found = follower.index.reconstruct(np.asarray(known, dtype=np.int64)) if None not in known else None
        if found is not None:
            return self.search_vectors(found, k, served, options, known if exclude_self else None)
        vectors, pks = [], []
        for item_id in item_ids:
            item = self.get(item_id)  # 404 when the item does not exist
            vector = self.store.vector(item_id, served)
            if vector is None:
                raise ItemConflictError(
                    f"item {item_id!r} has no vector under model {served} yet; retry", code="item_not_indexed"
                )
            vectors.append(vector)
            pks.append(item.pk if exclude_self else None)
        return self.search_vectors(np.stack(vectors), k, served, options, pks)

    async def search_image(
        self, image: EncodedImages, k: int, options: SearchOptions = SearchOptions()
    ) -> tuple[str, list[Hit]]:
        """Embed `image` with the served model (not necessarily the active one) and search.

        The served index can swap while the image is being embedded (a re-embedding just
        completed); the query is then embedded again with the new model, not refused."""
        for retries_left in (2, 1, 0):
            served, _ = self._served()
            vectors = await self._embed(served, image)  # [1, D]
            try:
                model_id, hits = await asyncio.to_thread(self.search_vectors, vectors, k, served, options)
                return model_id, hits[0]
            except ItemConflictError as exc:
                if exc.code != "model_changed" or not retries_left:
                    raise
        raise AssertionError("the last try returns or raises")

    def stats(self) -> dict[str, Any]:
        """For /readyz and /metrics (`store`: "ok", or why the store does not answer)."""
        follower = self._follower
        index = follower.index if follower else None
        try:
            items, store = self.store.count(), "ok"
        except StoreUnavailableError as exc:
            items, store = None, exc.message
        return {
            "served_model": self.served,
            "pending_model": self.pending,
            "items": items,
            "store": store,
            "index_size": index.ntotal if index else 0,
            "index_kind": index.kind if index else None,
            "index_fresh": index.pending if index else 0,  # HNSW: not yet in the graph, searched exactly
            "log_position": follower.position if follower else None,
        }


def build_item_service(settings: Settings, runtime: Runtime, *, reembed_in_process: bool = True) -> ItemService:
    """Open the store and serve the index of the active model (app lifespan; call close() at shutdown)."""
    service = ItemService(settings, runtime, reembed_in_process=reembed_in_process)
    service.start()
    return service
