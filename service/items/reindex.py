"""Building a model's index from the store, and re-embedding every item under a new model.

`reembed_all` is a plain function so it runs both in a background thread of the API process
and in a Celery worker (`index` queue). It embeds the originals of items that have no vector
for the model yet, in batches, until none is left, then flags the model complete in the
store (atomically with adds, so an item added meanwhile is never missed) and writes the
index snapshot. An API in another process notices the flag and swaps to the new index.

Vectors are keyed by vector space (service.contract.variants.vector_space: the model and the
variant that wrote them), never by bare model: `space_of` gives the space this deployment
writes a model's vectors in, so a worker and the API hosts fill the same one, and a change of
variant is a new space, re-embedded like a new model, never mixed into the old index.
"""

from __future__ import annotations

import logging
import threading
from collections.abc import Callable
from pathlib import Path
from typing import Protocol

import numpy as np

from service.contract.imaging import ImageDecodeError, ResizePolicy, decode_image
from service.contract.registry import ModelCard, ModelRegistry
from service.contract.variants import split_vector_space
from service.items.blobs import BlobStore
from service.items.index import SnapshotError, VectorIndex
from service.items.store import ItemStore
from service.settings import Settings

log = logging.getLogger(__name__)


class Encoder(Protocol):
    """What re-embedding needs of service.runtime.EncoderRuntime."""

    card: ModelCard
    policy: ResizePolicy

    def embed(self, images: np.ndarray) -> np.ndarray: ...  # uint8 [N, S, S, 3] -> float32 [N, D]


class ReembedError(RuntimeError):
    """Some originals could not be re-embedded; the model is not flagged complete."""


def open_store(settings: Settings) -> tuple[ItemStore, BlobStore]:
    return ItemStore(settings.items_dir / "items.sqlite3"), BlobStore(settings.items_dir / "blobs")


def snapshot_path(settings: Settings, model_id: str) -> Path:
    return settings.items_dir / "index" / f"{model_id}.faiss"


def load_or_build_index(settings: Settings, store: ItemStore, model_id: str, dim: int) -> tuple[VectorIndex, int, str]:
    """The index of `model_id`: its snapshot when it matches the store, else rebuilt from it.

    Returns (index, store change counter it reflects, how it was obtained)."""
    state = store.state(model_id)
    path = snapshot_path(settings, model_id)
    try:
        index, head = VectorIndex.load(
            path, min_train=settings.index_min_train_vectors, search_params=settings.index_search_params
        )
        if (head.model_id, head.dim, head.factory) != (model_id, dim, settings.index_factory):
            raise SnapshotError(f"snapshot is for {head.model_id}/{head.dim}/{head.factory}")
        if (head.changes, head.ntotal) != (state.changes, state.count):
            raise SnapshotError(
                f"snapshot is stale: changes {head.changes} vs {state.changes}, vectors {head.ntotal} vs {state.count}"
            )
        return index, head.changes, "snapshot"
    except SnapshotError as exc:
        reason = str(exc)
    pks, vecs, changes = store.vectors(model_id)
    index = VectorIndex(
        dim,
        settings.index_factory,
        min_train=settings.index_min_train_vectors,
        search_params=settings.index_search_params,
    )
    index.add(pks, vecs)
    log.info("index of %s rebuilt from the store (%d vectors): %s", model_id, len(pks), reason)
    return index, changes, f"rebuilt: {reason}"


def space_of(settings: Settings, registry: ModelRegistry, model_id: str) -> str:
    """The vector space this deployment writes `model_id`'s vectors in (service.runtime.space_for)."""
    from service.runtime import space_for  # onnxruntime only where it is needed

    return space_for(registry.get(model_id), settings)


def load_encoder(settings: Settings, registry: ModelRegistry, space: str) -> Encoder:
    """A fresh, verified ONNX Runtime encoder writing vector space `space` (worker side)."""
    from service.runtime import EncoderRuntime  # onnxruntime only where it is needed

    model_id, variant = split_vector_space(space)
    return EncoderRuntime.load(registry, model_id, settings, variant)


def reembed_all(
    settings: Settings,
    registry: ModelRegistry,
    model_id: str,
    *,
    encoder: Encoder | None = None,
    batch_size: int = 64,
    should_stop: Callable[[], bool] | threading.Event | None = None,
    on_progress: Callable[[int], None] | None = None,
) -> int:
    """Embed every item lacking a vector in space `model_id` (a `vector_space` key: the bare id
    is the fp32 one; see `space_of`), flag it complete, snapshot its index.

    Returns how many vectors were written; returns early (not complete) when `should_stop`."""
    encoder = encoder or load_encoder(settings, registry, model_id)
    stop = should_stop.is_set if isinstance(should_stop, threading.Event) else (should_stop or (lambda: False))
    dim = encoder.card.embedding_dim
    store, blobs = open_store(settings)
    written, failed = 0, []
    try:
        while True:
            after = 0
            while batch := store.missing(model_id, batch_size, after):
                if stop():
                    return written
                after = batch[-1][0]
                pks, images = [], []
                for pk, sha in batch:
                    try:
                        images.append(decode_image(blobs.get(sha), max_pixels=settings.max_image_pixels))
                        pks.append(pk)
                    except (OSError, ImageDecodeError) as exc:
                        failed.append(pk)
                        log.error("item %d: original %s unusable: %s", pk, sha, exc)
                if pks:
                    vecs = encoder.embed(encoder.policy.batch(images))  # [n, D]
                    written += store.put_vectors(model_id, pks, vecs)
                    if on_progress:
                        on_progress(written)
            if failed:
                raise ReembedError(f"{len(failed)} item(s) have unreadable originals (pks {failed[:10]}...)")
            if store.mark_complete(model_id, dim):
                break  # else items were added without this model's vector: one more pass
        index, changes, _ = load_or_build_index(settings, store, model_id, dim)
        index.save(snapshot_path(settings, model_id), model_id=model_id, changes=changes)
        return written
    finally:
        store.close()
