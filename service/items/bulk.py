"""Bulk indexing: every image of a dataset (a folder tree, or an .npz) into the item store,
batched, idempotent and resumable; `simclr-embed index DATASET` runs it from a shell.

* Ids: a folder image's path relative to the dataset (posix; `ids="stem"`: its file name
  without the suffix, which must then be unique in the tree); an .npz image's
  `<file stem>-<index>` (`<stem>-<split>-<index>` for a split other than train); `id_prefix`
  goes before either, so several datasets share one store without clashing.
* Metadata: with `folders_as=FIELD`, the first sub-folder's name; from a sidecar keyed by
  `path` (the relative path, or the id for .npz): JSON Lines (types kept) or CSV (values that
  parse as numbers become numbers); an .npz's `y_<split>` labels as `label`.
* Idempotent: an id already stored with the same bytes (sha256) is skipped, one with other
  bytes is replaced, a new one is added; each batch is one store transaction, so a killed
  run resumes by running again (a run stopped by `should_stop` returns between batches).
  The ids a run indexed are kept in a manifest; ids of the previous run whose files vanished
  are reported, and deleted only when asked.

The served index of any API on the same store picks the new items up from the change log.
"""

from __future__ import annotations

import csv
import functools
import hashlib
import io
import itertools
import json
import logging
import time
from collections import Counter
from collections.abc import Callable, Iterator
from concurrent.futures import Future, ThreadPoolExecutor
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Literal

import numpy as np
from PIL import Image

from service.contract.imaging import ImageDecodeError, decode_image
from service.contract.registry import ModelRegistry
from service.items.backend import NewItem
from service.items.blobs import BlobStore
from service.items.errors import OriginalInCollectionError
from service.items.reindex import Encoder, encoder_for, open_store, space_of
from service.items.sqlstore import SqlItemStore
from service.settings import Settings

log = logging.getLogger(__name__)
IMAGE_SUFFIXES = {".jpg", ".jpeg", ".png", ".webp", ".bmp", ".gif", ".tif", ".tiff"}
CONTENT_TYPES = {".jpg": "image/jpeg", ".jpeg": "image/jpeg", ".png": "image/png", ".webp": "image/webp"}
CONTENT_TYPES |= {".bmp": "image/bmp", ".gif": "image/gif", ".tif": "image/tiff", ".tiff": "image/tiff"}
IdScheme = Literal["path", "stem"]  # how a folder image's id is made (see the module doc)


class BulkIndexError(ValueError):
    """The dataset or its sidecar cannot be read."""


@dataclass(frozen=True)
class Source:
    id: str
    read: Callable[[], bytes]
    content_type: str
    metadata: dict[str, Any] | None


@dataclass
class IndexReport:
    space: str = ""  # the vector space written (service.contract.variants.vector_space)
    total: int = 0  # images in the dataset
    added: int = 0
    replaced: int = 0
    skipped: int = 0
    failed: list[str] = field(default_factory=list)
    vanished: list[str] = field(default_factory=list)  # ids of the previous run whose files are gone
    deleted: int = 0
    stopped: bool = False  # `should_stop` ended the run early; running it again resumes it

    @property
    def processed(self) -> int:
        return self.added + self.replaced + self.skipped + len(self.failed)


Sources = tuple[int, Iterator[Source]]  # (how many, the images in id order)


def _number(text: str) -> Any:
    for kind in (int, float):
        try:
            return kind(text)
        except ValueError:
            continue
    return text


def read_sidecar(path: Path) -> dict[str, dict[str, Any]]:
    """`path` -> metadata by relative path, from .jsonl (types kept) or .csv (numbers parsed)."""
    rows: list[dict[str, Any]]
    try:
        if path.suffix.lower() == ".csv":
            with path.open(newline="") as f:
                rows = [{k: _number(v) for k, v in row.items()} for row in csv.DictReader(f)]
                for row in rows:
                    row["path"] = str(row.get("path", ""))  # a path is text even when it looks numeric
        else:
            rows = [json.loads(line) for line in path.read_text().splitlines() if line.strip()]
    except (OSError, ValueError) as exc:
        raise BulkIndexError(f"{path}: unreadable sidecar ({exc})") from exc
    out = {}
    for n, row in enumerate(rows, 1):
        if not isinstance(row, dict) or not isinstance(row.get("path"), str):
            raise BulkIndexError(f"{path}: row {n} has no `path` string")
        key = row.pop("path")
        out[key] = row
    return out


def _merge(*parts: dict[str, Any] | None) -> dict[str, Any] | None:
    merged: dict[str, Any] = {}
    for part in parts:
        merged.update(part or {})
    return merged or None


def _folder_sources(
    root: Path, folders_as: str | None, sidecar: dict[str, dict[str, Any]], ids: IdScheme, prefix: str
) -> Sources:
    paths = sorted(p for p in root.rglob("*") if p.is_file() and p.suffix.lower() in IMAGE_SUFFIXES)
    rels = [p.relative_to(root).as_posix() for p in paths]
    names = rels if ids == "path" else [p.stem for p in paths]
    clashes = sorted(name for name, n in Counter(names).items() if n > 1)
    if clashes:
        raise BulkIndexError(f"{root}: file names repeat in the tree ({', '.join(clashes[:5])}); use ids by path")

    def generate() -> Iterator[Source]:
        for path, rel, name in zip(paths, rels, names, strict=True):
            folder = {folders_as: path.relative_to(root).parts[0]} if folders_as and "/" in rel else None
            kind = CONTENT_TYPES[path.suffix.lower()]
            yield Source(prefix + name, path.read_bytes, kind, _merge(folder, sidecar.get(rel)))

    return len(paths), generate()


def _png(array: np.ndarray) -> bytes:
    buf = io.BytesIO()
    Image.fromarray(array[..., 0] if array.shape[-1] == 1 else array).save(buf, format="PNG")
    return buf.getvalue()


def _npz_sources(path: Path, split: str, sidecar: dict[str, dict[str, Any]], prefix: str) -> Sources:
    try:
        with np.load(path, allow_pickle=False) as npz:
            arrays = {k: npz[k] for k in npz.files}
    except (OSError, ValueError) as exc:
        raise BulkIndexError(f"{path} is not a readable .npz file ({exc})") from exc
    images, labels = arrays.get(f"x_{split}"), arrays.get(f"y_{split}")
    if images is None:
        candidates = [a for a in arrays.values() if a.dtype == np.uint8 and a.ndim in (3, 4)]
        if len(candidates) != 1 or split != "train":
            raise BulkIndexError(f"{path}: expected an x_{split} array or one uint8 [N, H, W, C] array")
        images = candidates[0]
    if images.dtype != np.uint8 or images.ndim not in (3, 4):
        raise BulkIndexError(
            f"{path}: images must be uint8 [N, H, W] or [N, H, W, C], not {images.dtype} {images.shape}"
        )
    stem = path.stem if split == "train" else f"{path.stem}-{split}"

    def generate() -> Iterator[Source]:
        for i in range(len(images)):
            key = f"{stem}-{i}"
            label = {"label": labels[i].item()} if labels is not None else None
            image = images[i] if images.ndim == 4 else images[i][..., None]
            read = functools.partial(_png, image)
            yield Source(prefix + key, read, "image/png", _merge(label, sidecar.get(key)))

    return len(images), generate()


def _manifest(settings: Settings, dataset: Path, ids: IdScheme, prefix: str) -> Path:
    """The ids of the last run over `dataset` with this id scheme (so vanished files are found)."""
    key = str(dataset.resolve()) if (ids, prefix) == ("path", "") else f"{dataset.resolve()}\0{ids}\0{prefix}"
    digest = hashlib.sha256(key.encode()).hexdigest()[:16]
    return settings.items_dir / "index-runs" / f"{digest}.ids"


def index_dataset(
    settings: Settings,
    dataset: Path,
    *,
    folders_as: str | None = None,
    sidecar: Path | None = None,
    split: str = "train",
    ids: IdScheme = "path",
    id_prefix: str = "",
    delete_missing: bool = False,
    batch_size: int = 64,
    encoder: Encoder | None = None,
    on_progress: Callable[[IndexReport], None] | None = None,
    should_stop: Callable[[], bool] | None = None,
) -> IndexReport:
    """Index every image of `dataset` under the active model's vector space (see the module doc).

    `on_progress` is called after each batch; `should_stop` is asked before each one, and a
    True ends the run early with `stopped` set (vanished files are then not looked for)."""
    registry = ModelRegistry(settings.models_dir)
    model_id = registry.active()
    if model_id is None:
        raise BulkIndexError("no active model: train or activate one first")
    space = space_of(settings, registry, model_id)  # the vector space the API serves it in
    encoder = encoder_for(settings, registry, space, encoder)
    meta = read_sidecar(sidecar) if sidecar else {}
    if dataset.is_dir():
        total, sources = _folder_sources(dataset, folders_as, meta, ids, id_prefix)
    elif dataset.suffix == ".npz":
        total, sources = _npz_sources(dataset, split, meta, id_prefix)
    else:
        raise BulkIndexError(f"{dataset}: expected a folder of images or an .npz file")
    store, blobs = open_store(settings)
    report, seen = IndexReport(space=space, total=total), list[str]()
    try:
        # Three stages: a reader thread reads and decodes batch i+1 while this thread embeds
        # batch i (ONNX Runtime and Pillow's decoders release the GIL) and a writer thread stores
        # batch i-1 (originals fsynced, one transaction), so disk and decoding overlap inference.
        with (
            ThreadPoolExecutor(1, thread_name_prefix="bulk-read") as reader,
            ThreadPoolExecutor(1, thread_name_prefix="bulk-write") as writer,
        ):

            def read_next() -> Future[ReadBatch] | None:
                batch = tuple(itertools.islice(sources, batch_size))
                return reader.submit(_read_batch, settings, store, blobs, batch) if batch else None

            reading, writing = read_next(), None
            while reading is not None:
                if should_stop and should_stop():
                    report.stopped = True  # the batch read ahead is dropped: a re-run reads it again
                    break
                got = reading.result()
                reading = read_next()
                seen.extend(got.ids)
                report.skipped += got.skipped
                report.failed.extend(got.failed)
                vectors = encoder.embed(encoder.policy.batch(got.images)) if got.todo else None  # [n, D]
                if writing is not None:  # batch i-1 is committed
                    writing.result()
                    writing = None
                    if on_progress:
                        on_progress(report)
                if vectors is not None:
                    writing = writer.submit(_store_batch, store, blobs, space, got.todo, got.datas, vectors, report)
                elif on_progress:
                    on_progress(report)
            if writing is not None:
                writing.result()
                if on_progress:
                    on_progress(report)
        if report.stopped:
            return report
        manifest = _manifest(settings, dataset, ids, id_prefix)
        before = set(manifest.read_text().split("\n")) - {""} if manifest.is_file() else set()
        report.vanished = sorted(before - set(seen))
        if delete_missing:
            for item_id in report.vanished:
                removed = store.delete(item_id)
                if removed is not None:  # its original, if now unreferenced, is left to the sweep
                    report.deleted += 1
        kept = set(seen) | (set() if delete_missing else set(report.vanished))
        manifest.parent.mkdir(parents=True, exist_ok=True)
        manifest.write_text("\n".join(sorted(kept)) + "\n")
    finally:
        store.close()
    return report


@dataclass
class ReadBatch:
    """One batch of sources as read: the ones to (re)index with their bytes and decoded images,
    and what the report gains (unchanged ids skipped, unreadable ones failed)."""

    ids: list[str]
    todo: list[Source] = field(default_factory=list)
    datas: list[bytes] = field(default_factory=list)
    images: list[Image.Image] = field(default_factory=list)
    skipped: int = 0
    failed: list[str] = field(default_factory=list)


def _read_batch(settings: Settings, store: SqlItemStore, blobs: BlobStore, batch: tuple[Source, ...]) -> ReadBatch:
    stored = store.shas([s.id for s in batch])
    out = ReadBatch([s.id for s in batch])
    for source in batch:
        try:
            data = source.read()
            if stored.get(source.id) == blobs.digest(data):
                out.skipped += 1
                continue
            out.images.append(decode_image(data, max_pixels=settings.max_image_pixels))
        except (OSError, ImageDecodeError) as exc:
            out.failed.append(source.id)
            log.error("%s: not indexed: %s", source.id, exc)
            continue
        out.todo.append(source)
        out.datas.append(data)
    return out


def _store_batch(
    store: SqlItemStore,
    blobs: BlobStore,
    space: str,
    todo: list[Source],
    datas: list[bytes],
    vectors: np.ndarray,
    report: IndexReport,
) -> None:
    """Originals first (durable), then the items and their vectors [n, D] in one transaction
    (again, originals included, while a sweep is deleting one of the same bytes)."""
    while True:
        new = [NewItem(s.id, blobs.put(d), s.content_type, s.metadata) for s, d in zip(todo, datas, strict=True)]
        try:
            _, old_pks, _ = store.add(new, {space: vectors}, replace=True, present=blobs.exists)
            break
        except OriginalInCollectionError:
            time.sleep(OriginalInCollectionError.retry_after_s)
    report.replaced += len(old_pks)
    report.added += len(todo) - len(old_pks)
