"""LogFollower against a log whose sequence numbers are taken before commit (as a PostgreSQL
BIGSERIAL would be): rows become visible out of order, and a rolled-back write leaves a hole
for good. The SQLite store never shows either (its numbers come from a row updated in the
write's transaction), so this log is a small in-memory one that can."""

from __future__ import annotations

import time

import numpy as np

from service.items.backend import ChangeBatch
from service.items.follower import LogFollower, LogPosition
from service.items.index import VectorIndex

D = 4


class CommitOrderLog:
    """Rows (seq, pk, added) that commit in any order; vectors by pk."""

    def __init__(self) -> None:
        self.rows: list[tuple[int, int, bool]] = []
        self.vectors: dict[int, np.ndarray] = {}

    def commit(self, seq: int, pk: int, added: bool = True) -> None:
        if added:
            self.vectors[pk] = np.eye(D, dtype=np.float32)[pk % D] * (1 + pk)
        else:
            self.vectors.pop(pk, None)
        self.rows.append((seq, pk, added))

    def changes_since(self, space: str, after: int, limit: int) -> ChangeBatch:
        rows = sorted(r for r in self.rows if r[0] > after)[:limit]
        present = [added and pk in self.vectors for _, pk, added in rows]
        vecs = [self.vectors[pk] for (_, pk, _), p in zip(rows, present, strict=True) if p]
        return ChangeBatch(
            seqs=np.asarray([r[0] for r in rows], dtype=np.int64),
            pks=np.asarray([r[1] for r in rows], dtype=np.int64),
            added=np.asarray([r[2] for r in rows], dtype=bool),
            present=np.asarray(present, dtype=bool),
            vectors=np.asarray(vecs, dtype=np.float32).reshape(len(vecs), D),
        )


def ids_in(index: VectorIndex) -> set[int]:
    return set(index.search(np.ones((1, D), np.float32), 100)[1][0].tolist())


def test_a_late_commit_below_a_higher_seq_is_not_skipped() -> None:
    log = CommitOrderLog()
    follower = LogFollower(log, "s", VectorIndex(D), LogPosition(0), batch=2, gap_grace_s=60)  # type: ignore[arg-type]
    log.commit(1, 10)
    log.commit(3, 30)  # seq 2 was taken first but commits later
    log.commit(4, 40)
    follower.poll()
    assert ids_in(follower.index) == {10, 30, 40}
    assert follower.position == 1 and follower.at.above == {3, 4}
    log.commit(2, 20)
    log.commit(5, 30, added=False)
    follower.poll()
    assert ids_in(follower.index) == {10, 20, 40}  # 20 arrived below the highest seq read; 30 removed once
    assert follower.position == 5 and not follower.at.above
    assert follower.index.ntotal == 3


def test_a_hole_that_never_fills_is_passed_after_the_grace_period() -> None:
    log = CommitOrderLog()
    follower = LogFollower(log, "s", VectorIndex(D), LogPosition(0), gap_grace_s=0.2)  # type: ignore[arg-type]
    log.commit(1, 1)
    log.commit(3, 3)  # seq 2 belonged to a rolled-back write
    follower.poll()
    assert follower.position == 1
    time.sleep(0.3)
    follower.poll()
    assert follower.position == 3 and not follower.at.above
    log.commit(4, 4)
    follower.poll()
    assert ids_in(follower.index) == {1, 3, 4} and follower.position == 4
