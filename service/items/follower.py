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

pks are never reused and each is added at most once and removed at most once per space, so
within one batch additions are applied before removals. A removal whose addition was read
after its vector was already gone (`gone`) has nothing to remove and is skipped, so an HNSW
index never holds a tombstone for an id it never had.
"""

from __future__ import annotations

import logging
import threading
import time
from dataclasses import dataclass, field

import numpy as np

from service.items.backend import ChangeBatch, ItemBackend
from service.items.index import VectorIndex

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
        adds = fresh & batch.added & batch.present
        if adds.any():
            self.index.add(batch.pks[adds], batch.vectors[vec_row[adds]])
        self.at.gone.update(int(p) for p in batch.pks[fresh & batch.added & ~batch.present])
        removes = [int(p) for p in batch.pks[fresh & ~batch.added]]
        live = [p for p in removes if p not in self.at.gone]
        self.at.gone.difference_update(removes)
        if live:
            self.index.remove(np.asarray(live, dtype=np.int64))
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
