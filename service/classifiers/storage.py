"""Durable classifier storage: a SQLite file beside the item store (`<items_dir>/classifiers.sqlite3`).

A sibling file rather than tables inside items.sqlite3: the item store owns its schema (and
may move to PostgreSQL), and a classifier write never waits on the item store's write lock.
The same durability as the items: WAL, `synchronous=FULL`, every change one transaction, so a
classifier the API acknowledged survives `kill -9` and a half-written one never appears.

Tables: `classifiers` (what the caller asked for: name, method, the labeled examples, and the
metadata field they came from if any) and `classifier_fits` (one fit per classifier and
model: classes, counts, cross-validation, and the parameters as an .npz blob). A refit for a
newly served model adds a row; the old model's fit stays until the classifier is deleted, so
answers never stop while a model is being replaced.
"""

from __future__ import annotations

import io
import json
import sqlite3
import time
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np

from service.items.sqlite import DurableSqlite

Label = str | int

_SCHEMA = """
CREATE TABLE IF NOT EXISTS classifiers (
    id TEXT PRIMARY KEY,
    name TEXT NOT NULL UNIQUE,
    method TEXT NOT NULL,
    label_key TEXT,
    examples TEXT NOT NULL,
    created REAL NOT NULL
);
CREATE TABLE IF NOT EXISTS classifier_fits (
    classifier_id TEXT NOT NULL REFERENCES classifiers(id) ON DELETE CASCADE,
    model_id TEXT NOT NULL,
    fit_id TEXT NOT NULL UNIQUE,
    fitted_at REAL NOT NULL,
    classes TEXT NOT NULL,
    counts TEXT NOT NULL,
    cv TEXT NOT NULL,
    params BLOB NOT NULL,
    PRIMARY KEY (classifier_id, model_id)
) WITHOUT ROWID;
"""


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


def _fit(row: sqlite3.Row) -> Fit:
    return Fit(
        row["fit_id"],
        row["model_id"],
        row["fitted_at"],
        json.loads(row["classes"]),
        json.loads(row["counts"]),
        json.loads(row["cv"]),
        _unpack(row["params"]),
    )


class ClassifierStore(DurableSqlite):
    """Thread-safe: one connection behind a lock; writes are short (fits happen before them)."""

    def __init__(self, path: str | Path) -> None:
        super().__init__(path)
        with self._lock:
            self._db.executescript(_SCHEMA)

    def _insert_fit(self, db: sqlite3.Connection, classifier_id: str, fit: Fit) -> None:
        db.execute(
            "INSERT OR REPLACE INTO classifier_fits(classifier_id, model_id, fit_id, fitted_at, classes, counts, cv, params) "
            "VALUES (?, ?, ?, ?, ?, ?, ?, ?)",
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
        with self._tx() as db:
            if db.execute("SELECT 1 FROM classifiers WHERE name = ?", (name,)).fetchone():
                raise DuplicateNameError(name)
            db.execute(
                "INSERT INTO classifiers(id, name, method, label_key, examples, created) VALUES (?, ?, ?, ?, ?, ?)",
                (classifier_id, name, method, label_key, json.dumps(examples), created),
            )
            self._insert_fit(db, classifier_id, fit)
        return ClassifierRecord(classifier_id, name, method, label_key, examples, created, [fit])

    def add_fit(self, classifier_id: str, fit: Fit) -> bool:
        """Store a refit (replacing an older fit for the same model); False when the classifier is gone."""
        with self._tx() as db:
            if db.execute("SELECT 1 FROM classifiers WHERE id = ?", (classifier_id,)).fetchone() is None:
                return False
            self._insert_fit(db, classifier_id, fit)
        return True

    def without_fit(self, model_id: str, methods: Sequence[str]) -> list[str]:
        """Ids of classifiers of `methods` that have no fit for `model_id` yet (cheap: no parameters read)."""
        marks = ",".join("?" * len(methods))
        with self._lock:
            rows = self._db.execute(
                f"SELECT id FROM classifiers c WHERE method IN ({marks}) AND NOT EXISTS "
                "(SELECT 1 FROM classifier_fits f WHERE f.classifier_id = c.id AND f.model_id = ?) ORDER BY created",
                (*methods, model_id),
            ).fetchall()
        return [r[0] for r in rows]

    def name_taken(self, name: str) -> bool:
        with self._lock:
            return self._db.execute("SELECT 1 FROM classifiers WHERE name = ?", (name,)).fetchone() is not None

    def delete(self, classifier_id: str) -> bool:
        with self._tx() as db:
            return db.execute("DELETE FROM classifiers WHERE id = ?", (classifier_id,)).rowcount > 0

    def get(self, classifier_id: str) -> ClassifierRecord | None:
        records = self._select("WHERE id = ?", (classifier_id,))
        return records[0] if records else None

    def all(self) -> list[ClassifierRecord]:
        """All classifiers, oldest first."""
        return self._select("", ())

    def _select(self, where: str, args: tuple[Any, ...]) -> list[ClassifierRecord]:
        with self._lock:
            self._db.execute("BEGIN")  # one snapshot for both tables
            try:
                rows = self._db.execute(f"SELECT * FROM classifiers {where} ORDER BY created", args).fetchall()
                fits: dict[str, list[Fit]] = {r["id"]: [] for r in rows}
                if rows:
                    marks = ",".join("?" * len(rows))
                    for f in self._db.execute(
                        f"SELECT * FROM classifier_fits WHERE classifier_id IN ({marks}) ORDER BY fitted_at DESC",
                        list(fits),
                    ):
                        fits[f["classifier_id"]].append(_fit(f))
            finally:
                self._db.execute("COMMIT")
        return [
            ClassifierRecord(
                r["id"],
                r["name"],
                r["method"],
                r["label_key"],
                [(item_id, label) for item_id, label in json.loads(r["examples"])],
                r["created"],
                fits[r["id"]],
            )
            for r in rows
        ]
