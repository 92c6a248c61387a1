"""ItemService: items, their vectors and the served FAISS index, tied to the encoder runtime.

One model's index is served at a time. Activating another model starts re-embedding (a
background thread running `reindex.reembed_all`, or a worker when `reembed_in_process` is
off); until the new model is complete, searches answer from the old index and adds are
embedded with both models. Then the new index is swapped in atomically.

Ordering that keeps store and index in agreement: images are decoded and embedded first
(slow, no lock held), then under one mutex the originals are written, the store commits,
and the in-memory indexes are updated. Swaps and snapshots take the same mutex.
"""

from __future__ import annotations

import asyncio
import io
import logging
import threading
import time
from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any, Protocol

import numpy as np
from PIL import Image

from service.api.errors import ApiError
from service.contract.registry import ModelRegistry
from service.contract.variants import split_vector_space
from service.items.index import VectorIndex
from service.items.reindex import Encoder, load_or_build_index, open_store, reembed_all, snapshot_path, space_of
from service.items.store import DuplicateItemError, Item, NewItem
from service.settings import Settings

log = logging.getLogger(__name__)

CONTENT_TYPES = {
    "JPEG": "image/jpeg",
    "MPO": "image/jpeg",
    "PNG": "image/png",
    "WEBP": "image/webp",
    "BMP": "image/bmp",
    "GIF": "image/gif",
    "TIFF": "image/tiff",
}
REFRESH_EVERY_S = 1.0


class Runtime(Protocol):
    """What the item service needs of service.runtime.RuntimeManager."""

    def get(self, model_id: str | None = None) -> Encoder: ...

    async def embed(self, images: list[Image.Image], model_id: str | None = None) -> tuple[str, np.ndarray]: ...

    def add_listener(self, callback: Any) -> None: ...


@dataclass(frozen=True)
class Hit:
    id: str
    score: float
    metadata: dict[str, Any] | None


def content_type_of(data: bytes) -> str:
    """The media type of an (already decoded once) original, from its header."""
    with Image.open(io.BytesIO(data)) as raw:
        return CONTENT_TYPES.get(raw.format or "", "application/octet-stream")


class ItemService:
    def __init__(self, settings: Settings, runtime: Runtime, *, reembed_in_process: bool = True) -> None:
        self.settings = settings
        self.runtime = runtime
        self.registry = ModelRegistry(settings.models_dir)
        self.store, self.blobs = open_store(settings)
        self.reembed_in_process = reembed_in_process
        self.served: str | None = None
        self.pending: str | None = None
        self.index_source = ""  # how the served index was obtained: "snapshot" or "rebuilt: ..."
        self._indexes: dict[str, VectorIndex] = {}
        self._changes: dict[str, int] = {}  # store change counter each index reflects
        self._adds_since_snapshot = 0
        self._mutex = threading.RLock()
        self._job: tuple[str, threading.Thread, threading.Event] | None = None
        self._last_refresh = 0.0

    # -- lifecycle ----------------------------------------------------------------------

    def start(self) -> None:
        """Pick the served model (the active one when complete) and load its index.

        Models are held as vector spaces (model and variant, `space_of`) from here on."""
        active_id = self.registry.active()
        active = space_of(self.settings, self.registry, active_id) if active_id else None
        completed = self.store.completed_models()
        if active and (active in completed or (self.store.count() == 0 and self._mark_complete(active))):
            self._install(active)
        elif completed:
            self._install(completed[0])
        if active_id and active != self.served:
            self.on_activate(active_id)
        self.runtime.add_listener(self.on_activate)

    def close(self) -> None:
        """Stop re-embedding, snapshot the served index, close the store."""
        if self._job:
            self._job[2].set()
            self._job[1].join(timeout=30)
        with self._mutex:
            self._snapshot()
            self.store.close()

    def _dim(self, space: str) -> int:
        return self.registry.get(split_vector_space(space)[0]).embedding_dim

    def _mark_complete(self, model_id: str) -> bool:
        return self.store.mark_complete(model_id, self._dim(model_id))

    def _install(self, model_id: str) -> None:
        """Load or build `model_id`'s index and serve it (the old one is dropped)."""
        if model_id == self.served:
            return
        dim = self._dim(model_id)
        index, changes, source = load_or_build_index(self.settings, self.store, model_id, dim)
        with self._mutex:
            if self.store.state(model_id).changes != changes:  # changed while building: catch up
                index, changes, source = load_or_build_index(self.settings, self.store, model_id, dim)
            old = self.served
            self._indexes = {model_id: index}
            self._changes = {model_id: changes}
            self.served, self.index_source = model_id, source
            if self.pending == model_id:
                self.pending = None
            if old:
                self.store.clear_complete(old)
        log.info("serving the index of %s (%d vectors, %s)", model_id, index.ntotal, source)

    def on_activate(self, model_id: str) -> None:
        """RuntimeManager listener: re-embed everything with `model_id`, then swap."""
        model_id = space_of(self.settings, self.registry, model_id)  # at this deployment's variant
        with self._mutex:
            if self._job and self._job[0] != model_id:
                self._job[2].set()
                self._job = None
            if model_id == self.served:
                self.pending = None
                return
            self.pending = model_id
            if self.reembed_in_process and self._job is None:
                stop = threading.Event()
                thread = threading.Thread(
                    target=self._reembed, args=(model_id, stop), name=f"reembed-{model_id}", daemon=True
                )
                self._job = (model_id, thread, stop)
                thread.start()

    def _reembed(self, model_id: str, stop: threading.Event) -> None:
        try:
            try:
                encoder: Encoder | None = self.runtime.get(model_id)  # the manager's loaded session
            except Exception:
                encoder = None  # not loaded here: reembed_all opens its own
            reembed_all(self.settings, self.registry, model_id, encoder=encoder, should_stop=stop)
            if not stop.is_set() and self.pending == model_id:
                self._install(model_id)
        except Exception:
            log.exception("re-embedding with %s failed; still serving %s", model_id, self.served)
        finally:
            with self._mutex:
                if self._job and self._job[0] == model_id:
                    self._job = None

    def refresh(self) -> None:
        """Swap to the pending model once a worker in another process flagged it complete."""
        pending, now = self.pending, time.monotonic()
        if pending is None or self._job is not None or now - self._last_refresh < REFRESH_EVERY_S:
            return
        self._last_refresh = now
        if self.store.state(pending).complete:
            self._install(pending)

    # -- embedding ----------------------------------------------------------------------

    async def _embed(self, model_id: str, images: list[Image.Image]) -> np.ndarray:
        """RGB images -> float32 [N, D] under `model_id` (micro-batched; loads a retired model again)."""
        _, vectors = await self.runtime.embed(images, model_id=model_id)
        return vectors

    def _targets(self) -> list[str]:
        if self.served is None:
            raise ApiError(503, "index_not_ready", "no model's index is being served yet; activate a model and retry")
        return [self.served] + ([self.pending] if self.pending else [])

    # -- items --------------------------------------------------------------------------

    async def add(
        self,
        ids: Sequence[str],
        datas: Sequence[bytes],
        images: Sequence[Image.Image],
        metadata: Sequence[dict[str, Any] | None],
        *,
        replace: bool,
    ) -> list[str]:
        """Store items (original bytes `datas`, decoded `images`, metadata) with a vector per
        served/pending model, and index them. All or nothing."""
        types = await asyncio.to_thread(lambda: [content_type_of(d) for d in datas])
        images = list(images)
        vectors: dict[str, np.ndarray] = {}
        while True:
            for model_id in self._targets():
                if model_id not in vectors:
                    vectors[model_id] = await self._embed(model_id, images)
            try:
                done = await asyncio.to_thread(self._commit_add, ids, datas, types, metadata, vectors, replace)
            except DuplicateItemError as exc:
                shown = ", ".join(exc.ids[:5])
                raise ApiError(
                    409, "item_exists", f"item id(s) already exist: {shown}; use ?replace=true to overwrite"
                ) from exc
            if done:
                return list(ids)

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
                return False  # the models changed while embedding: embed with the new one first
            shas = [self.blobs.put(d) for d in datas]
            new = [NewItem(i, s, t, m) for i, s, t, m in zip(ids, shas, types, metadata, strict=True)]
            pks, old_pks, orphans = self.store.add(new, {m: vectors[m] for m in targets}, replace=replace)
            for model_id, index in self._indexes.items():
                if old_pks:
                    index.remove(np.asarray(old_pks))
                index.add(np.asarray(pks), vectors[model_id])
                self._changes[model_id] = self.store.state(model_id).changes
            for sha in orphans:
                self.blobs.delete(sha)
            self._adds_since_snapshot += len(pks)
            if self._adds_since_snapshot >= self.settings.index_snapshot_every:
                self._snapshot()
        return True

    def _snapshot(self) -> None:
        """Write the served index's snapshot (mutex held, so the change counter is exact)."""
        if self.served is None:
            return
        self._indexes[self.served].save(
            snapshot_path(self.settings, self.served), model_id=self.served, changes=self._changes[self.served]
        )
        self._adds_since_snapshot = 0

    def get(self, item_id: str) -> Item:
        item = self.store.get(item_id)
        if item is None:
            raise ApiError(404, "item_not_found", f"no item with id {item_id!r}")
        return item

    def original(self, item_id: str) -> tuple[bytes, str]:
        item = self.get(item_id)
        try:
            return self.blobs.get(item.sha256), item.content_type
        except OSError as exc:
            raise ApiError(
                404, "original_missing", f"the original of {item_id!r} is missing from the blob store"
            ) from exc

    def delete(self, item_id: str) -> None:
        with self._mutex:
            removed = self.store.delete(item_id)
            if removed is None:
                raise ApiError(404, "item_not_found", f"no item with id {item_id!r}")
            pk, orphans = removed
            for model_id, index in self._indexes.items():
                index.remove(np.asarray([pk]))
                self._changes[model_id] = self.store.state(model_id).changes
            for sha in orphans:
                self.blobs.delete(sha)

    def page(self, offset: int, limit: int) -> tuple[list[Item], int]:
        return self.store.page(offset, limit)

    # -- search -------------------------------------------------------------------------

    def _served_index(self) -> tuple[str, VectorIndex]:
        self.refresh()
        with self._mutex:
            self._targets()
            return self.served, self._indexes[self.served]  # type: ignore[return-value]

    def search_vector(
        self, vector: Sequence[float] | np.ndarray, k: int, model_id: str | None = None
    ) -> tuple[str, list[Hit]]:
        """Top-k items by inner product with the unit-normalised `vector`."""
        served, index = self._served_index()
        if model_id is not None and model_id != served:
            # the caller embedded with a model we are no longer serving
            raise ApiError(409, "model_changed", f"the served index is now {served}; retry the search")
        query = np.asarray(vector, dtype=np.float64).reshape(1, -1)
        if query.shape[1] != index.dim:
            raise ApiError(
                422, "wrong_dimension", f"the vector has {query.shape[1]} dimensions; model {served} uses {index.dim}"
            )
        norm = np.linalg.norm(query)
        if not np.isfinite(norm) or norm == 0:
            raise ApiError(422, "invalid_vector", "the vector must be finite and non-zero")
        scores, pks = index.search((query / norm).astype(np.float32), k)  # [1, k']
        items = self.store.by_pks([int(p) for p in pks[0]])
        hits = [
            Hit(items[p].id, float(s), items[p].metadata)
            for s, p in zip(scores[0], pks[0], strict=True)
            if int(p) in items
        ]
        return split_vector_space(served)[0], hits

    def search_item(self, item_id: str, k: int) -> tuple[str, list[Hit]]:
        served, _ = self._served_index()
        vector = self.store.vector(item_id, served)
        if vector is None:
            self.get(item_id)  # 404 when the item does not exist
            raise ApiError(409, "item_not_indexed", f"item {item_id!r} has no vector under model {served} yet; retry")
        return self.search_vector(vector, k, served)

    async def search_image(self, image: Image.Image, k: int) -> tuple[str, list[Hit]]:
        """Embed `image` with the served model (not necessarily the active one) and search.

        The served index can swap while the image is being embedded (a re-embedding just
        completed); the query is then embedded again with the new model, not refused."""
        for retries_left in (2, 1, 0):
            served, _ = self._served_index()
            vector = (await self._embed(served, [image]))[0]
            try:
                return await asyncio.to_thread(self.search_vector, vector, k, served)
            except ApiError as exc:
                if exc.code != "model_changed" or not retries_left:
                    raise
        raise AssertionError("the last try returns or raises")

    def stats(self) -> dict[str, Any]:
        """For /readyz and /metrics."""
        index = self._indexes.get(self.served or "")
        return {
            "served_model": self.served,
            "pending_model": self.pending,
            "items": self.store.count(),
            "index_size": index.ntotal if index else 0,
            "index_kind": index.kind if index else None,
        }


def build_item_service(settings: Settings, runtime: Runtime, *, reembed_in_process: bool = True) -> ItemService:
    """Open the store and serve the index of the active model (app lifespan; call close() at shutdown)."""
    service = ItemService(settings, runtime, reembed_in_process=reembed_in_process)
    service.start()
    return service
