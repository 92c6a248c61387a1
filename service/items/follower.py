"""LogFollower: keeps a VectorIndex equal to a vector space's rows in the store by applying the
space's change log after a position.

The served index of the API, the snapshot writer and start-up (snapshot plus the log after
it) all use it, so an item written by any process (this one, a worker's bulk job or
re-embedding) reaches the index the same way: within one poll (`index_follow_s`).

Position: every seq <= `position` is applied. Rows read above a hole are applied at once and
remembered (`above`); the position moves over a hole when it fills. A backend whose
sequence numbers are taken before commit (a free-running PostgreSQL sequence) can show a
hole that fills later; a hole that stays open for `gap_grace_s` is a rolled-back write and
is passed. The SQLite store's numbers come from the space's counter row, updated in the
write's transaction, so they appear without holes and `above` stays empty there.

Beside the index the follower keeps what a hit shows of each item (`records`: pk -> id and
metadata, `HitRecord`, and id -> pk), filled from the store when the index is built
(`load_records`) or from the snapshot it was read from (`records_json` is written into the
snapshot, `restore_records` reads it back), and kept by the same log rows (a metadata
update is a log row too), so searches, filtered ones and searches by item id included,
answer from memory, also while the store is unreachable (and on a host started meanwhile
from its snapshot). A filter's matching pks are looked up in per-field indexes of these
records (field_index.py), built for a field the first time a filter names it and changed
with every record kept or dropped, under the same lock.

pks are never reused and each is added at most once and removed at most once per space, so
within one batch additions are applied before removals. A removal whose addition was read
after its vector was already gone (`gone`) has nothing to remove and is skipped, so an HNSW
index never holds a tombstone for an id it never had.
"""

from __future__ import annotations

import json
import logging
import threading
import time
from collections.abc import Iterable, Sequence
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np

from service.items.backend import ChangeBatch, HitRecord, ItemBackend
from service.items.field_index import FieldIndexes
from service.items.filters import Condition
from service.items.index import FrozenIndex, VectorIndex

log = logging.getLogger(__name__)


@dataclass
class LogPosition:
    """Where a follower stands (recorded in snapshots): seqs <= position applied, plus the
    seqs applied above a hole and the pks whose addition was passed without a vector."""

    position: int
    above: set[int] = field(default_factory=set)
    gone: set[int] = field(default_factory=set)

    def to_json(self) -> dict[str, object]:
        return {"position": self.position, "above": sorted(self.above), "gone": sorted(self.gone)}

    @classmethod
    def from_json(cls, raw: dict[str, object], position: int) -> LogPosition:
        return cls(position, set(raw.get("above", [])), set(raw.get("gone", [])))  # type: ignore[call-overload]


def _records_json(kept: Sequence[tuple[int, HitRecord]]) -> bytes:
    return json.dumps([[pk, r.id, r.metadata] for pk, r in kept], separators=(",", ":")).encode()


@dataclass(frozen=True)
class FollowerCapture:
    """A follower's state at one instant (`LogFollower.capture`), written by `save`."""

    space: str
    index: FrozenIndex
    at: LogPosition
    records: list[tuple[int, HitRecord]]

    def save(self, path: Path) -> None:
        self.index.save(
            path,
            model_id=self.space,
            changes=self.at.position,
            log=self.at.to_json(),
            extra=_records_json(self.records),
        )


class LogFollower:
    def __init__(
        self,
        store: ItemBackend,
        space: str,
        index: VectorIndex,
        at: LogPosition,
        *,
        batch: int = 10_000,
        gap_grace_s: float = 5.0,
    ) -> None:
        self.store, self.space, self.index = store, space, index
        self.at = at
        self.batch = batch
        self.gap_grace_s = gap_grace_s
        self.applied = 0  # rows applied by this follower (the snapshot writer's trigger)
        self._hole_since: dict[int, float] = {}
        self._lock = threading.Lock()
        self._records: dict[int, HitRecord] = {}
        self._pk_of: dict[str, int] = {}  # item id -> pk, of the kept records
        self._fields = FieldIndexes()  # the metadata fields filters used, indexed; follows _records
        self._records_lock = threading.Lock()  # apart from _lock: a search never waits on a store read

    def load_records(self, page: int = 10_000) -> None:
        """Read every item's id and metadata from the store (before following on from here:
        log rows applied later only ever bring them up to date)."""
        after = 0
        while items := self.store.items_after(after, page):
            self._keep((it.pk, HitRecord(it.id, it.metadata)) for it in items)
            after = items[-1].pk

    def records_json(self) -> bytes:
        """The kept records as JSON, for the snapshot (`[[pk, id, metadata], ...]`)."""
        with self._records_lock:
            kept = list(self._records.items())
        return _records_json(kept)

    def capture(self) -> FollowerCapture:
        """The index, the position and the kept records at one instant, for a snapshot of a
        follower that keeps following (the served one): no log row is applied while the index
        is copied in memory (about a second for 1M x 512 floats); the records are copied by
        reference (a record is replaced, never changed) and serialised by the caller."""
        with self._lock:
            frozen = self.index.frozen()
            with self._records_lock:
                kept = list(self._records.items())
            at = LogPosition(self.at.position, set(self.at.above), set(self.at.gone))
        return FollowerCapture(self.space, frozen, at, kept)

    def restore_records(self, raw: bytes) -> None:
        """Keep the records `records_json` wrote (a snapshot's, at the position it reflects)."""
        self._keep((int(pk), HitRecord(item_id, metadata)) for pk, item_id, metadata in json.loads(raw))

    def _keep(self, records: Iterable[tuple[int, HitRecord]]) -> None:
        with self._records_lock:
            for pk, record in records:
                if self._fields.fields:
                    self._fields.keep(pk, self._records.get(pk), record)
                self._records[pk] = record
                self._pk_of[record.id] = pk

    def _drop(self, pks: Iterable[int]) -> None:
        with self._records_lock:
            for pk in pks:
                record = self._records.pop(pk, None)
                if record is None:
                    continue
                self._fields.drop(pk, record)
                if self._pk_of.get(record.id) == pk:  # not the id's replacement
                    del self._pk_of[record.id]

    def pks_of(self, item_ids: Sequence[str]) -> list[int | None]:
        """The pk kept for each item id (None: no such item seen here)."""
        with self._records_lock:
            return [self._pk_of.get(i) for i in item_ids]

    def records(self, pks: Iterable[int]) -> dict[int, HitRecord]:
        """The kept id and metadata of each of `pks` that has them."""
        with self._records_lock:
            return {p: r for p in pks if (r := self._records.get(p)) is not None}

    def matching(self, where: Sequence[Condition]) -> np.ndarray:
        """pks (int64, ascending) of the kept items whose metadata meets every condition
        (`filters.predicate`'s answer), looked up in the indexes of the fields they test: a
        field is indexed the first time a filter names it, then kept with the records."""
        with self._records_lock:
            return self._fields.matching(where, self._records)

    @property
    def position(self) -> int:
        return self.at.position

    def poll(self) -> int:
        """Apply every committed row after the position; returns how many rows were applied."""
        total = 0
        with self._lock:
            if self.at.above:  # holes are open: read their window again, a late commit may fill one
                window = max(self.at.above) - self.at.position
                total += self._apply(self.store.changes_since(self.space, self.at.position, window))
            while True:
                after = max(self.at.above, default=self.at.position)  # the highest seq applied
                batch = self.store.changes_since(self.space, after, self.batch)
                total += self._apply(batch)
                self._advance()
                if len(batch.seqs) < self.batch:
                    break
        self.applied += total
        return total

    def _apply(self, batch: ChangeBatch) -> int:
        fresh = ~np.isin(batch.seqs, np.fromiter(self.at.above, dtype=np.int64, count=len(self.at.above)))
        vec_row = np.cumsum(batch.present) - 1  # row -> index into batch.vectors
        updated = batch.updated if batch.updated is not None else np.zeros(len(batch.seqs), dtype=bool)
        self._keep(batch.records.items())  # before the index: a searchable pk always has its record
        # (current ids and metadata: idempotent, so replayed rows too)
        adds = fresh & batch.added & batch.present
        if adds.any():
            self.index.add(batch.pks[adds], batch.vectors[vec_row[adds]])
        self.at.gone.update(int(p) for p in batch.pks[fresh & batch.added & ~batch.present])
        removes = [int(p) for p in batch.pks[fresh & ~batch.added & ~updated]]
        live = [p for p in removes if p not in self.at.gone]
        self.at.gone.difference_update(removes)
        if live:
            self.index.remove(np.asarray(live, dtype=np.int64))
        self._drop(removes)
        self.at.above.update(int(s) for s in batch.seqs[fresh])
        return int(fresh.sum())

    def _advance(self) -> None:
        """Move the position over applied seqs, and over holes older than the grace period."""
        above, position = self.at.above, self.at.position
        while above:
            if position + 1 in above:
                position += 1
                above.discard(position)
                self._hole_since.pop(position, None)
                continue
            hole = position + 1
            since = self._hole_since.setdefault(hole, time.monotonic())
            if time.monotonic() - since < self.gap_grace_s:
                break
            log.warning("change log of %s: seq %d never committed; passing it", self.space, hole)
            del self._hole_since[hole]
            position = hole
        self.at.position = position
