"""The item store's backend interface: what the item layer needs of a durable store.

One implementation, `service.items.sqlstore.SqlItemStore`, over two engines: SQLite
(`service.items.store.ItemStore`, the default) and PostgreSQL (`service.items.postgres`),
chosen by `SIMCLR_EMBED_STORE_URL` (`service.items.reindex.open_backend`). The contract, per
vector space (a `vector_space(model, variant)` string, opaque here):

* Counters are kept in the write's own transaction: `state()` and `count()` read a row, never
  scan, so a write's cost does not grow with the collection.
* Every vector added or removed, and every metadata update of an item with a vector in the
  space, appends one row to the space's change log, in the same
  transaction, with a per-space sequence number taken from the space's counter row. Because
  that row is updated (and, in PostgreSQL, row-locked) by every writer until it commits, the
  numbers become visible in commit order and without holes; a rolled-back write gives its
  numbers back (PostgreSQL's writers are also serialised by an advisory lock; postgres.py
  says how gaps are handled). A replace logs a removal of the old item's pk and an addition
  of the new pk (pks are never reused). `LogFollower` still checks for holes, so a backend
  that takes numbers from a free-running sequence (assigned before commit) is followed
  correctly too.
* The log is compacted by `compact_log`: rows at or below a position every reader is known
  to have passed (this host's snapshot) and older than the retention age. A reader whose
  position is below the oldest retained row cannot replay and rebuilds from the store.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any, Protocol

import numpy as np


@dataclass(frozen=True)
class NewItem:
    id: str
    sha256: str
    content_type: str
    metadata: dict[str, Any] | None = None


@dataclass(frozen=True)
class Item:
    pk: int
    id: str
    metadata: dict[str, Any] | None
    sha256: str
    content_type: str
    created: float
    models: list[str] = field(default_factory=list)


@dataclass(frozen=True)
class ModelState:
    """A vector space's counters: `changes` is the last sequence number of its change log."""

    model_id: str
    changes: int
    count: int
    complete: bool


@dataclass(frozen=True)
class HitRecord:
    """What a search hit shows of an item, kept beside the served index: its id and metadata."""

    id: str
    metadata: dict[str, Any] | None


@dataclass(frozen=True)
class ChangeBatch:
    """Change-log rows of one space after a position, in sequence order.

    Per row: `seqs` int64 [M], `pks` int64 [M], `added` bool [M] (else removed) and
    `present` bool [M] (an addition whose vector still exists) and `updated` bool [M] (a
    metadata update: neither added nor removed); `vectors` float32 [P, D] holds the vectors of
    the present additions, in row order; `records` maps the pk of each added or updated item
    that still exists to its current id and metadata. An addition that is not present was
    deleted since: its removal row follows, here or in a later batch."""

    seqs: np.ndarray
    pks: np.ndarray
    added: np.ndarray
    present: np.ndarray
    vectors: np.ndarray
    updated: np.ndarray | None = None  # None: no metadata updates in this batch
    records: dict[int, HitRecord] = field(default_factory=dict)


@dataclass(frozen=True)
class ReembedProgress:
    """The re-embedding job of a space: one per activation, whichever process runs it."""

    space: str
    state: str  # running | succeeded | failed | cancelled
    done: int
    total: int
    owner: str
    started: float
    updated: float
    error: str | None = None


class ItemBackend(Protocol):
    """The durable store of items, metadata, per-space vectors, counters and the change log."""

    def close(self) -> None: ...

    # writes: each is one transaction, counters and log rows included
    def add(
        self,
        items: list[NewItem],
        vectors: dict[str, np.ndarray],
        *,
        replace: bool = False,
        present: Callable[[str], bool] | None = None,
    ) -> tuple[list[int], list[int], list[str]]: ...
    def delete(self, item_id: str) -> tuple[int, list[str]] | None: ...
    def update_metadata(self, item_id: str, metadata: dict[str, Any] | None, *, merge: bool) -> Item | None: ...
    def update_metadata_many(
        self, changes: list[tuple[str, dict[str, Any] | None]], *, merge: bool
    ) -> list[Item | None]: ...
    def put_vectors(self, space: str, pks: list[int], vecs: np.ndarray) -> int: ...
    def mark_complete(self, space: str, dim: int) -> bool: ...
    def clear_complete(self, space: str) -> None: ...

    # reads
    def get(self, item_id: str) -> Item | None: ...
    def by_pks(self, pks: list[int]) -> dict[int, Item]: ...
    def shas(self, ids: list[str]) -> dict[str, str]: ...
    def page(self, offset: int, limit: int) -> tuple[list[Item], int]: ...
    def items_after(self, after: int, limit: int) -> list[Item]: ...
    def count(self) -> int: ...
    def missing(self, space: str, limit: int, after: int = 0) -> list[tuple[int, str]]: ...
    def vector(self, item_id: str, space: str) -> np.ndarray | None: ...
    def vectors(self, space: str) -> tuple[np.ndarray, np.ndarray, int]: ...
    def vectors_of(self, space: str, pks: list[int]) -> tuple[np.ndarray, np.ndarray]: ...
    def state(self, space: str) -> ModelState: ...
    def completed_models(self) -> list[str]: ...

    # the change log
    def changes_since(self, space: str, after: int, limit: int) -> ChangeBatch: ...
    def first_seq(self, space: str) -> int | None: ...
    def compact_log(self, space: str, upto: int, older_than_s: float) -> int: ...

    # originals no row refers to (the deferred collection, sqlstore.py)
    def claim_orphans(self, grace_s: float, limit: int = 1000) -> list[str]: ...
    def finish_orphans(self, shas: list[str]) -> None: ...

    # the re-embedding job
    def claim_reembed(self, space: str, owner: str, lease_s: float) -> bool: ...
    def report_reembed(self, space: str, owner: str, state: str = "running", error: str | None = None) -> bool: ...
    def reembed_progress(self, space: str) -> ReembedProgress | None: ...
