"""Opening a vector space's index (snapshot plus change log, or rebuilt from the store), and
re-embedding every item under a newly activated model.

`reembed_all` is a plain function so it runs both in a background thread of the API process
and in a Celery worker (`index` queue); a claim in the store makes it run once per
activation whoever asks. It embeds the originals of items that have no vector in the space
yet, in batches, until none is left, then flags the space complete in the store (atomically
with adds, so an item added meanwhile is never missed) and writes the index snapshot. An API
in another process notices the flag and swaps to the new index.

Vectors are keyed by vector space (service.contract.variants.vector_space: the model and the
variant that wrote them), never by bare model: `space_of` gives the space this deployment
writes a model's vectors in, so a worker and the API hosts fill the same one, and a change of
variant is a new space, re-embedded like a new model, never mixed into the old index.
"""

from __future__ import annotations

import logging
import os
import socket
import threading
import uuid
from collections.abc import Callable
from pathlib import Path
from typing import Protocol

import numpy as np

from service.contract.imaging import ImageDecodeError, ResizePolicy
from service.contract.registry import ModelCard, ModelRegistry
from service.contract.variants import split_vector_space
from service.items.backend import ItemBackend
from service.items.blobs import BlobStore
from service.items.follower import LogFollower, LogPosition
from service.items.index import SnapshotError, VectorIndex
from service.items.sqlstore import SqlItemStore
from service.items.store import ItemStore
from service.settings import Settings

log = logging.getLogger(__name__)
REEMBED_LEASE_S = 60.0  # a claim not renewed for this long is taken over


class Encoder(Protocol):
    """What re-embedding needs of service.runtime.EncoderRuntime."""

    card: ModelCard
    policy: ResizePolicy
    space: str  # the vector space (model and variant) its vectors belong to

    def embed(self, images: np.ndarray) -> np.ndarray: ...  # uint8 [N, S, S, 3] -> float32 [N, D]


class ReembedError(RuntimeError):
    """Some originals could not be re-embedded; the model is not flagged complete."""


def open_backend(settings: Settings) -> SqlItemStore:
    """The item store `settings.store_url` names: SQLite (default) or PostgreSQL."""
    if settings.uses_postgres:
        from service.items.postgres import PgItemStore  # psycopg only where it is used

        return PgItemStore(
            str(settings.store_url), pool_size=settings.store_pool_size, timeout_s=settings.store_timeout_s
        )
    return ItemStore(settings.sqlite_store_path)


def open_store(settings: Settings) -> tuple[SqlItemStore, BlobStore]:
    """The item store and the originals (always on the shared data dir)."""
    return open_backend(settings), BlobStore(settings.items_dir / "blobs")


def snapshot_path(settings: Settings, space: str) -> Path:
    return settings.index_dir / f"{space}.faiss"


def _empty_index(settings: Settings, dim: int) -> VectorIndex:
    return VectorIndex(
        dim,
        settings.index_factory,
        min_train=settings.index_min_train_vectors,
        search_params=settings.index_search_params,
        fresh_max=settings.index_fresh_max,
    )


def read_snapshot(settings: Settings, store: ItemBackend, space: str, dim: int) -> tuple[LogFollower, bool]:
    """The snapshot of `space` on this host's disk as a follower at the position it reflects,
    and whether it held the items' ids and metadata (snapshots written before they were kept
    there did not). Reads nothing from the store, so a host started while the store is down
    can serve it (`catch_up` once the store answers). SnapshotError when unusable."""
    index, head = VectorIndex.load(
        snapshot_path(settings, space),
        min_train=settings.index_min_train_vectors,
        search_params=settings.index_search_params,
        fresh_max=settings.index_fresh_max,
    )
    if (head.model_id, head.dim, head.factory) != (space, dim, settings.index_factory):
        raise SnapshotError(f"snapshot is for {head.model_id}/{head.dim}/{head.factory}")
    follower = LogFollower(store, space, index, LogPosition.from_json(head.log, head.changes))
    if head.extra:
        follower.restore_records(head.extra)
    return follower, bool(head.extra)


def catch_up(follower: LogFollower, *, has_records: bool) -> int:
    """Follow a snapshot just read (`read_snapshot`) to the end of the log, after checking that
    the store still matches it; returns the rows replayed. SnapshotError when the snapshot is
    ahead of the store, the log no longer reaches back to it, or the counts disagree."""
    store, space, changes = follower.store, follower.space, follower.position
    last = store.state(space).changes
    if changes > last:
        raise SnapshotError(f"snapshot is ahead of the store (log position {changes} > {last})")
    first = store.first_seq(space)
    if changes < last and (first is None or first > changes + 1):
        raise SnapshotError(f"the log after position {changes} was compacted (oldest row {first})")
    replayed = follower.poll()
    state = store.state(space)
    if state.changes == follower.position and state.count != follower.index.ntotal:
        raise SnapshotError(f"snapshot plus log hold {follower.index.ntotal} vectors, the store {state.count}")
    if not has_records:
        follower.load_records()
    log.info("index of %s: snapshot at %d plus %d log rows", space, changes, replayed)
    return replayed


def load_or_build_index(settings: Settings, store: ItemBackend, space: str, dim: int) -> tuple[LogFollower, str]:
    """The index of `space` and its log follower (with the items' ids and metadata): its
    snapshot plus the log after it when the log still reaches back to it, else rebuilt from
    the store. Returns (follower, how)."""
    try:
        follower, has_records = read_snapshot(settings, store, space, dim)
        catch_up(follower, has_records=has_records)
        return follower, "snapshot"
    except SnapshotError as exc:
        reason = str(exc)
    follower = build_from_store(settings, store, space, dim)
    log.info("index of %s rebuilt from the store (%d vectors): %s", space, follower.index.ntotal, reason)
    return follower, f"rebuilt: {reason}"


def build_from_store(settings: Settings, store: ItemBackend, space: str, dim: int) -> LogFollower:
    """A fresh index of every vector of `space` (a trainable one trained on all of them),
    followed to the end of the log, with the items' ids and metadata."""
    pks, vecs, changes = store.vectors(space)
    index = _empty_index(settings, dim)
    index.add(pks, vecs)
    follower = LogFollower(store, space, index, LogPosition(changes))
    follower.poll()  # rows committed since the read
    follower.load_records()  # after the poll: later log rows only bring them up to date
    return follower


def write_snapshot(settings: Settings, follower: LogFollower) -> None:
    """Snapshot a follower's index and kept records at one position, then compact the log up
    to it. Safe on the served follower while it follows and serves: it is held still only
    while its index is copied in memory; checksums, serialising the records and the disk write
    happen off its locks."""
    captured = follower.capture()
    captured.save(snapshot_path(settings, follower.space))
    follower.store.compact_log(follower.space, captured.at.position, settings.index_log_retention_s)


def space_of(settings: Settings, registry: ModelRegistry, model_id: str) -> str:
    """The vector space this deployment writes `model_id`'s vectors in (service.runtime.space_for)."""
    from service.runtime import space_for  # onnxruntime only where it is needed

    return space_for(registry.get(model_id), settings)


def load_encoder(settings: Settings, registry: ModelRegistry, space: str) -> Encoder:
    """A fresh, verified ONNX Runtime encoder writing vector space `space` (worker side)."""
    from service.runtime import EncoderRuntime  # onnxruntime only where it is needed

    model_id, variant = split_vector_space(space)
    return EncoderRuntime.load(registry, model_id, settings, variant)


def encoder_for(settings: Settings, registry: ModelRegistry, space: str, encoder: Encoder | None) -> Encoder:
    """`encoder` (a loaded session to reuse), or a fresh one, to write vectors of `space`. One
    that writes another space (another model, or another variant of it) is refused: its vectors
    would sit in this space's index beside vectors they cannot be compared with."""
    if encoder is None:
        return load_encoder(settings, registry, space)
    if encoder.space != space:
        raise ValueError(f"this encoder writes vector space {encoder.space!r}, not {space!r}")
    return encoder


def reembed_owner() -> str:
    """Who runs a re-embedding: host, process and a nonce, so two threads never share a claim."""
    return f"{socket.gethostname()}:{os.getpid()}:{uuid.uuid4().hex[:8]}"


def reembed_all(
    settings: Settings,
    registry: ModelRegistry,
    space: str,
    *,
    encoder: Encoder | None = None,
    batch_size: int = 64,
    should_stop: Callable[[], bool] | threading.Event | None = None,
    lease_s: float = REEMBED_LEASE_S,
) -> int:
    """Embed every item lacking a vector in `space` (a `vector_space` key: the bare id is the
    fp32 one; see `space_of`), flag the space complete, snapshot its index.

    Runs once per activation whichever processes ask (the API's thread, the worker's task):
    the first claims the job in the store and renews the claim each batch; another asker
    returns at once while the claim is live, and takes over one that lapsed (its runner was
    killed), resuming where it stopped since only items still lacking a vector are embedded.
    Returns how many vectors were written; returns early (not complete) when `should_stop`."""
    stop = should_stop.is_set if isinstance(should_stop, threading.Event) else (should_stop or (lambda: False))
    store, blobs = open_store(settings)
    owner = reembed_owner()
    try:
        if store.state(space).complete or not store.claim_reembed(space, owner, lease_s):
            return 0
        try:
            written = _reembed(settings, registry, store, blobs, space, encoder, batch_size, stop, owner)
        except Exception as exc:
            store.report_reembed(space, owner, "failed", f"{type(exc).__name__}: {exc}")
            raise
        store.report_reembed(space, owner, "running" if stop() else "succeeded")
        return written
    finally:
        store.close()


def _reembed(
    settings: Settings,
    registry: ModelRegistry,
    store: SqlItemStore,
    blobs: BlobStore,
    space: str,
    encoder: Encoder | None,
    batch_size: int,
    stop: Callable[[], bool],
    owner: str,
) -> int:
    encoder = encoder_for(settings, registry, space, encoder)
    dim = encoder.card.embedding_dim
    written, failed = 0, []
    while True:
        after = 0
        while batch := store.missing(space, batch_size, after):
            if stop() or not store.report_reembed(space, owner):
                return written
            after = batch[-1][0]
            pks, images = [], []
            for pk, sha in batch:  # one original decoded at a time, straight to [S, S, 3]
                try:
                    images.append(encoder.policy.decode(blobs.get(sha), max_pixels=settings.max_image_pixels))
                    pks.append(pk)
                except (OSError, ImageDecodeError) as exc:
                    failed.append(pk)
                    log.error("item %d: original %s unusable: %s", pk, sha, exc)
            if pks:
                vecs = encoder.embed(np.stack(images))  # [n, S, S, 3] -> [n, D]
                written += store.put_vectors(space, pks, vecs)
        if failed:
            raise ReembedError(f"{len(failed)} item(s) have unreadable originals (pks {failed[:10]}...)")
        if store.mark_complete(space, dim):
            break  # else items were added without this space's vector: one more pass
    follower, _ = load_or_build_index(settings, store, space, dim)
    write_snapshot(settings, follower)
    return written
