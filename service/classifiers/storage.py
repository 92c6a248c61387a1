"""Durable classifier storage: tables of the item store, on whichever backend it runs.

The classifiers live beside the items, in the item store's schema (SQLite's items.sqlite3 or
the PostgreSQL database of `SIMCLR_EMBED_STORE_URL`; migration 4 of store.py, 3 of
postgres.py), so every API host, fit job and write-back job of a deployment sees the same
ones. `ClassifierStore` is one implementation for both engines: it runs its SQL through the
item store's own transactions (`SqlItemStore.transaction()` and `snapshot()`), with `?`
placeholders and rows read by position, as sqlstore.py does. It shares the item store's
connections and durability: every change is one transaction, committed (fsynced on SQLite,
WAL-flushed on PostgreSQL) before the caller acknowledges it, so an acknowledged classifier
survives `kill -9` and a half-written one never appears; writes are serialised with the
item writes (they are short: fits happen before them). A database that cannot be reached
raises the item layer's StoreUnavailableError (503 at the API, as for item writes).

Tables: `classifiers` (what the caller asked for: name, unique; method; the labeled
examples; the metadata field they came from, if any) and `classifier_fits` (one fit per
classifier and model: classes, counts, cross-validation, and the parameters as an .npz
blob; deleted with their classifier). A refit for a newly served model adds a row; the old
model's fit stays until the classifier is deleted, so answers never stop while a model is
being replaced.

Before schema 4, classifiers had a SQLite file of their own, `<items_dir>/classifiers.sqlite3`.
`open_classifiers` imports it once: when the file exists and the tables are empty, its rows
are copied in one transaction and the file is renamed `classifiers.sqlite3.imported` (kept,
not deleted: delete it once the classifiers are checked). A file whose classifiers are all
present already (a crash after the import's commit, or another process's import) is renamed
the same way; one that differs from non-empty tables is left where it is, with a warning.
"""

from __future__ import annotations

import contextlib
import io
import json
import logging
import sqlite3
import time
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np

from service.items.errors import StoreUnavailableError
from service.items.sqlstore import Db, SqlItemStore
from service.settings import Settings

log = logging.getLogger(__name__)

Label = str | int
LEGACY_FILE = "classifiers.sqlite3"  # the classifiers' own file before schema 4, in items_dir
CLASSIFIER_COLUMNS = "id, name, method, label_key, examples, created"
FIT_COLUMNS = "classifier_id, model_id, fit_id, fitted_at, classes, counts, cv, params"


class DuplicateNameError(Exception):
    """A classifier with this name exists."""


@dataclass(frozen=True)
class Fit:
    """One classifier fitted on one model's vectors."""

    fit_id: str
    model_id: str
    fitted_at: float
    classes: list[Label]
    counts: list[int]  # examples per class, in `classes` order
    cv: dict[str, Any]  # accuracy, std, fold_accuracies, confusion, n_folds, C, grid
    params: dict[str, np.ndarray]  # logreg: weights, bias; knn: vectors, labels


@dataclass(frozen=True)
class ClassifierRecord:
    id: str
    name: str
    method: str
    label_key: str | None
    examples: list[tuple[str, Label]]  # (item id, label)
    created: float
    fits: list[Fit]  # newest first


def _pack(params: dict[str, np.ndarray]) -> bytes:
    buf = io.BytesIO()
    arrays: dict[str, Any] = dict(params)  # numpy's stubs type **kwds like its allow_pickle flag
    np.savez(buf, allow_pickle=False, **arrays)
    return buf.getvalue()


def _unpack(blob: bytes) -> dict[str, np.ndarray]:
    with np.load(io.BytesIO(blob), allow_pickle=False) as data:
        return {key: data[key] for key in data.files}


def _fit(row: Sequence[Any]) -> Fit:
    """A `FIT_COLUMNS` row."""
    _, model_id, fit_id, fitted_at, classes, counts, cv, params = row
    return Fit(
        fit_id, model_id, fitted_at, json.loads(classes), json.loads(counts), json.loads(cv), _unpack(bytes(params))
    )


def _marks(n: int) -> str:
    return ",".join("?" * n)


class ClassifierStore:
    """The classifier tables of `backend` (see the module doc). It borrows the backend's
    connections and does not close it: whoever opened the item store closes it."""

    def __init__(self, backend: SqlItemStore) -> None:
        self._backend = backend

    @staticmethod
    def _insert_fit(db: Db, classifier_id: str, fit: Fit) -> None:
        db.execute(
            f"INSERT INTO classifier_fits({FIT_COLUMNS}) VALUES (?, ?, ?, ?, ?, ?, ?, ?) "
            "ON CONFLICT(classifier_id, model_id) DO UPDATE SET fit_id = excluded.fit_id, "
            "fitted_at = excluded.fitted_at, classes = excluded.classes, counts = excluded.counts, "
            "cv = excluded.cv, params = excluded.params",
            (
                classifier_id,
                fit.model_id,
                fit.fit_id,
                fit.fitted_at,
                json.dumps(fit.classes),
                json.dumps(fit.counts),
                json.dumps(fit.cv),
                _pack(fit.params),
            ),
        )

    def create(
        self,
        classifier_id: str,
        name: str,
        method: str,
        label_key: str | None,
        examples: list[tuple[str, Label]],
        fit: Fit,
    ) -> ClassifierRecord:
        """The classifier and its first fit, in one transaction."""
        created = time.time()
        with self._backend.transaction() as db:
            if db.execute("SELECT 1 FROM classifiers WHERE name = ?", (name,)).fetchone():
                raise DuplicateNameError(name)
            db.execute(
                f"INSERT INTO classifiers({CLASSIFIER_COLUMNS}) VALUES (?, ?, ?, ?, ?, ?)",
                (classifier_id, name, method, label_key, json.dumps(examples), created),
            )
            self._insert_fit(db, classifier_id, fit)
        return ClassifierRecord(classifier_id, name, method, label_key, examples, created, [fit])

    def add_fit(self, classifier_id: str, fit: Fit) -> bool:
        """Store a refit (replacing an older fit for the same model); False when the classifier is gone."""
        with self._backend.transaction() as db:
            if db.execute("SELECT 1 FROM classifiers WHERE id = ?", (classifier_id,)).fetchone() is None:
                return False
            self._insert_fit(db, classifier_id, fit)
        return True

    def without_fit(self, model_id: str, methods: Sequence[str]) -> list[str]:
        """Ids of classifiers of `methods` that have no fit for `model_id` yet (cheap: no parameters read)."""
        with self._backend.snapshot() as db:
            rows = db.execute(
                f"SELECT id FROM classifiers c WHERE method IN ({_marks(len(methods))}) AND NOT EXISTS "
                "(SELECT 1 FROM classifier_fits f WHERE f.classifier_id = c.id AND f.model_id = ?) ORDER BY created",
                (*methods, model_id),
            ).fetchall()
        return [r[0] for r in rows]

    def name_taken(self, name: str) -> bool:
        with self._backend.snapshot() as db:
            return db.execute("SELECT 1 FROM classifiers WHERE name = ?", (name,)).fetchone() is not None

    def delete(self, classifier_id: str) -> bool:
        """Delete the classifier and (by cascade) its fits; False when there was none."""
        with self._backend.transaction() as db:
            return int(db.execute("DELETE FROM classifiers WHERE id = ?", (classifier_id,)).rowcount) > 0

    def get(self, classifier_id: str) -> ClassifierRecord | None:
        records = self._select("WHERE id = ?", (classifier_id,))
        return records[0] if records else None

    def all(self) -> list[ClassifierRecord]:
        """All classifiers, oldest first."""
        return self._select("", ())

    def _select(self, where: str, args: tuple[Any, ...]) -> list[ClassifierRecord]:
        with self._backend.snapshot() as db:  # one snapshot for both tables
            rows = db.execute(f"SELECT {CLASSIFIER_COLUMNS} FROM classifiers {where} ORDER BY created", args).fetchall()
            fits: dict[str, list[Fit]] = {r[0]: [] for r in rows}
            if rows:
                for f in db.execute(
                    f"SELECT {FIT_COLUMNS} FROM classifier_fits WHERE classifier_id IN ({_marks(len(rows))}) "
                    "ORDER BY fitted_at DESC",
                    list(fits),
                ):
                    fits[f[0]].append(_fit(f))
        return [
            ClassifierRecord(
                classifier_id,
                name,
                method,
                label_key,
                [(item_id, label) for item_id, label in json.loads(examples)],
                created,
                fits[classifier_id],
            )
            for classifier_id, name, method, label_key, examples, created in rows
        ]

    def import_file(self, path: Path) -> int:
        """Copy a pre-schema-4 classifier file's rows in (see the module doc); returns how
        many classifiers were imported."""
        try:
            src = sqlite3.connect(f"file:{path}?mode=rw", uri=True, timeout=30.0)
        except sqlite3.OperationalError:
            return 0  # renamed by another process's import meanwhile
        try:
            classifiers = src.execute(f"SELECT {CLASSIFIER_COLUMNS} FROM classifiers").fetchall()
            fits = src.execute(f"SELECT {FIT_COLUMNS} FROM classifier_fits").fetchall()
        finally:
            src.close()  # the last connection: its WAL is checkpointed into the file and removed
        imported = len(classifiers)
        with self._backend.transaction() as db:
            if db.execute("SELECT 1 FROM classifiers LIMIT 1").fetchone() is not None:
                ids = [r[0] for r in classifiers]
                found = db.execute(f"SELECT id FROM classifiers WHERE id IN ({_marks(len(ids))})", ids) if ids else []
                if {r[0] for r in found} != set(ids):
                    log.warning(
                        "%s is not imported: the item store holds other classifiers already; "
                        "move the file away once you no longer need it",
                        path,
                    )
                    return 0
                imported = 0  # imported before: only the rename is left
            else:
                db.executemany(f"INSERT INTO classifiers({CLASSIFIER_COLUMNS}) VALUES (?, ?, ?, ?, ?, ?)", classifiers)
                db.executemany(f"INSERT INTO classifier_fits({FIT_COLUMNS}) VALUES (?, ?, ?, ?, ?, ?, ?, ?)", fits)
        for suffix in ("", "-wal", "-shm"):
            with contextlib.suppress(FileNotFoundError):  # no -wal: checkpointed at close
                path.with_name(path.name + suffix).replace(path.with_name(f"{path.name}.imported{suffix}"))
        log.info(
            "imported %d classifier(s) from %s into the item store; the file is now %s.imported",
            imported,
            path,
            path.name,
        )
        return imported


def open_classifiers(settings: Settings, backend: SqlItemStore) -> ClassifierStore:
    """The classifier store on the configured item store `backend`, with a pre-schema-4
    classifier file imported (module doc). A PostgreSQL store down at start defers the import
    to the next start."""
    store = ClassifierStore(backend)
    legacy = settings.items_dir / LEGACY_FILE
    if legacy.is_file():
        try:
            store.import_file(legacy)
        except StoreUnavailableError as exc:
            log.warning("%s is imported at the next start: %s", legacy, exc.message)
    return store
