"""Bulk indexing: every image of a dataset (a folder tree, or an .npz) into the item store,
batched, idempotent and resumable; `simclr-embed index DATASET` runs it from a shell.

* Ids: a folder image's path relative to the dataset (posix); an .npz image's
  `<file stem>-<index>` (`<stem>-<split>-<index>` for a split other than train).
* Metadata: with `folders_as=FIELD`, the first sub-folder's name; from a sidecar keyed by
  `path` (the relative path, or the id for .npz): JSON Lines (types kept) or CSV (values that
  parse as numbers become numbers); an .npz's `y_<split>` labels as `label`.
* Idempotent: an id already stored with the same bytes (sha256) is skipped, one with other
  bytes is replaced, a new one is added; each batch is one store transaction, so a killed
  run resumes by running again. The ids a run indexed are kept in a manifest; ids of the
  previous run whose files vanished are reported, and deleted only when asked.

The served index of any API on the same store picks the new items up from the change log.
"""

from __future__ import annotations

import csv
import functools
import hashlib
import io
import json
import logging
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
from PIL import Image

from service.contract.imaging import ImageDecodeError, decode_image
from service.contract.registry import ModelRegistry
from service.items.backend import NewItem
from service.items.blobs import BlobStore
from service.items.reindex import Encoder, load_encoder, open_store
from service.items.sqlstore import SqlItemStore
from service.settings import Settings

log = logging.getLogger(__name__)
IMAGE_SUFFIXES = {".jpg", ".jpeg", ".png", ".webp", ".bmp", ".gif", ".tif", ".tiff"}
CONTENT_TYPES = {".jpg": "image/jpeg", ".jpeg": "image/jpeg", ".png": "image/png", ".webp": "image/webp"}
CONTENT_TYPES |= {".bmp": "image/bmp", ".gif": "image/gif", ".tif": "image/tiff", ".tiff": "image/tiff"}


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
    added: int = 0
    replaced: int = 0
    skipped: int = 0
    failed: list[str] = field(default_factory=list)
    vanished: list[str] = field(default_factory=list)
    deleted: int = 0


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


def _folder_sources(root: Path, folders_as: str | None, sidecar: dict[str, dict[str, Any]]) -> Iterator[Source]:
    for path in sorted(p for p in root.rglob("*") if p.is_file() and p.suffix.lower() in IMAGE_SUFFIXES):
        rel = path.relative_to(root).as_posix()
        folder = {folders_as: path.relative_to(root).parts[0]} if folders_as and "/" in rel else None
        yield Source(rel, path.read_bytes, CONTENT_TYPES[path.suffix.lower()], _merge(folder, sidecar.get(rel)))


def _png(array: np.ndarray) -> bytes:
    buf = io.BytesIO()
    Image.fromarray(array[..., 0] if array.shape[-1] == 1 else array).save(buf, format="PNG")
    return buf.getvalue()


def _npz_sources(path: Path, split: str, sidecar: dict[str, dict[str, Any]]) -> Iterator[Source]:
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
    prefix = path.stem if split == "train" else f"{path.stem}-{split}"
    for i in range(len(images)):
        item_id = f"{prefix}-{i}"
        label = {"label": labels[i].item()} if labels is not None else None
        image = images[i] if images.ndim == 4 else images[i][..., None]
        yield Source(item_id, functools.partial(_png, image), "image/png", _merge(label, sidecar.get(item_id)))


def _manifest(settings: Settings, dataset: Path) -> Path:
    digest = hashlib.sha256(str(dataset.resolve()).encode()).hexdigest()[:16]
    return settings.items_dir / "index-runs" / f"{digest}.ids"


def index_dataset(
    settings: Settings,
    dataset: Path,
    *,
    folders_as: str | None = None,
    sidecar: Path | None = None,
    split: str = "train",
    delete_missing: bool = False,
    batch_size: int = 64,
    encoder: Encoder | None = None,
    on_progress: Callable[[IndexReport], None] | None = None,
) -> IndexReport:
    """Index every image of `dataset` under the active model's vector space (see the module doc)."""
    registry = ModelRegistry(settings.models_dir)
    space = registry.active()
    if space is None:
        raise BulkIndexError("no active model: train or activate one first")
    encoder = encoder or load_encoder(settings, registry, space)
    meta = read_sidecar(sidecar) if sidecar else {}
    if dataset.is_dir():
        sources = _folder_sources(dataset, folders_as, meta)
    elif dataset.suffix == ".npz":
        sources = _npz_sources(dataset, split, meta)
    else:
        raise BulkIndexError(f"{dataset}: expected a folder of images or an .npz file")
    store, blobs = open_store(settings)
    report, seen = IndexReport(), []
    try:
        batch: list[Source] = []
        for source in sources:
            seen.append(source.id)
            batch.append(source)
            if len(batch) == batch_size:
                _index_batch(settings, store, blobs, space, encoder, batch, report)
                batch = []
                if on_progress:
                    on_progress(report)
        if batch:
            _index_batch(settings, store, blobs, space, encoder, batch, report)
        manifest = _manifest(settings, dataset)
        before = set(manifest.read_text().split("\n")) - {""} if manifest.is_file() else set()
        report.vanished = sorted(before - set(seen))
        if delete_missing:
            for item_id in report.vanished:
                removed = store.delete(item_id)
                if removed is not None:
                    report.deleted += 1
                    for sha in removed[1]:
                        blobs.delete(sha)
        kept = set(seen) | (set() if delete_missing else set(report.vanished))
        manifest.parent.mkdir(parents=True, exist_ok=True)
        manifest.write_text("\n".join(sorted(kept)) + "\n")
    finally:
        store.close()
    return report


def _index_batch(
    settings: Settings,
    store: SqlItemStore,
    blobs: BlobStore,
    space: str,
    encoder: Encoder,
    batch: list[Source],
    report: IndexReport,
) -> None:
    """Skip unchanged ids, embed the rest, and store them in one transaction."""
    stored = store.shas([s.id for s in batch])
    todo, datas, images = [], [], []
    for source in batch:
        try:
            data = source.read()
            if stored.get(source.id) == blobs.digest(data):
                report.skipped += 1
                continue
            images.append(decode_image(data, max_pixels=settings.max_image_pixels))
        except (OSError, ImageDecodeError) as exc:
            report.failed.append(source.id)
            log.error("%s: not indexed: %s", source.id, exc)
            continue
        todo.append(source)
        datas.append(data)
    if not todo:
        return
    vectors = encoder.embed(encoder.policy.batch(images))  # [n, D]
    new = [NewItem(s.id, blobs.put(d), s.content_type, s.metadata) for s, d in zip(todo, datas, strict=True)]
    _, old_pks, orphans = store.add(new, {space: vectors}, replace=True)
    for sha in orphans:
        blobs.delete(sha)
    report.replaced += len(old_pks)
    report.added += len(todo) - len(old_pks)
