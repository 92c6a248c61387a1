"""The follower's per-field metadata indexes against a brute force: `LogFollower.matching`
equals `filters.predicate` evaluated on every item the store holds, for random metadata
(ints, floats, booleans, strings, ints a float64 cannot hold, missing fields, lists and
objects) and random filters of selectivity 0.1% to 100%, while random adds, replaces,
metadata updates and deletes reach the follower through the store's change log (a real
SQLite file, a real PostgreSQL database)."""

from __future__ import annotations

import json
from typing import Any

import numpy as np
import pytest

from service.items import field_index
from service.items.filters import parse_filter, predicate
from service.items.follower import LogFollower, LogPosition
from service.items.index import VectorIndex
from service.items.sqlstore import SqlItemStore
from service.items.store import NewItem

D = 4
BIG = 2**53
SHOPS = [f"shop-{i}" for i in range(50)]
# values compared across types: 1, 1.0, True and "1" are four different things (and 1 == 1.0)
SCALARS: list[Any] = [0, 1, 1.0, 1.5, -2, True, False, "1", "a", BIG, BIG + 1, float(BIG), 2**70, -(2**70)]


def value(rng: np.random.Generator, *, finite: bool) -> Any:
    """A field's value: mostly scalars, some the JSON types no condition matches."""
    kind = rng.integers(12)
    if kind < 6:
        return SCALARS[int(rng.integers(len(SCALARS)))]
    if kind == 6:
        return int(rng.integers(-5, 6))
    if kind == 7:
        return BIG + int(rng.integers(-3, 4))  # around 2**53: some not held exactly by a float64
    if kind == 8:
        return [1, "a"] if rng.integers(2) else {"x": 1}
    if kind == 9:
        return None
    if kind == 10 and not finite:  # NaN and infinities: SQLite's JSON text holds them, jsonb does not
        return [float("nan"), float("inf"), float("-inf")][int(rng.integers(3))]
    return float(rng.integers(-5, 6)) / 2


def metadata(rng: np.random.Generator, *, finite: bool) -> dict[str, Any] | None:
    if rng.random() < 0.03:
        return None
    meta: dict[str, Any] = {"u": float(rng.random()), "shop": SHOPS[int(rng.integers(len(SHOPS)))]}
    if rng.random() < 0.1:
        meta["u"] = value(rng, finite=finite)  # not always a number
    for name in ("v", "w"):
        if rng.random() < 0.8:
            meta[name] = value(rng, finite=finite)
    if rng.random() < 0.5:
        meta["flag"] = bool(rng.integers(2))
    return meta


def random_filter(rng: np.random.Generator) -> dict[str, Any]:
    """1-3 conditions: ranges on `u` from 0.1% to 100% wide, equality and `in` across types,
    bounds on both sides of 2**53 and beyond float64's range."""
    flt: dict[str, Any] = {}
    for _ in range(int(rng.integers(1, 4))):
        kind = int(rng.integers(6))
        if kind == 0:
            width = float(10 ** rng.uniform(-3, 0))
            low = float(rng.uniform(0, 1 - width))
            flt["u"] = {"gte": low, "lt": low + width} if rng.integers(2) else {"lt": width}
        elif kind == 1:
            flt["shop"] = {"in": list(rng.choice(SHOPS, size=int(rng.integers(1, 30)), replace=False))}
        elif kind == 2:
            flt[str(rng.choice(["v", "w", "flag"]))] = SCALARS[int(rng.integers(len(SCALARS)))]
        elif kind == 3:
            picks = rng.choice(len(SCALARS), size=int(rng.integers(1, 6)))
            flt[str(rng.choice(["v", "w"]))] = {"in": [SCALARS[i] for i in picks]}
        elif kind == 4:
            op = str(rng.choice(["gte", "gt", "lte", "lt"]))
            bound = [BIG, BIG + 1, BIG - 1, float(BIG), 2**70, -(2**1100), 2**1100, 0, 0.5, -1][int(rng.integers(10))]
            flt[str(rng.choice(["v", "w"]))] = {op: bound}
        else:
            flt["shop"] = SHOPS[int(rng.integers(len(SHOPS)))]
    return flt


def brute_force(store: SqlItemStore, flt: dict[str, Any]) -> list[int]:
    """pks of the store's items whose metadata meets the filter, by `predicate` on each."""
    meets = predicate(parse_filter(flt))
    return [it.pk for it in store.items_after(0, 1_000_000) if meets(it.metadata)]


def check(follower: LogFollower, store: SqlItemStore, rng: np.random.Generator, filters: int) -> None:
    for _ in range(filters):
        flt = random_filter(rng)
        got = follower.matching(parse_filter(flt))
        assert got.dtype == np.int64
        assert got.tolist() == brute_force(store, flt), flt


@pytest.mark.parametrize("merge_min", [1024, 8])  # 8: the sorted numbers are rebuilt many times over
def test_matching_equals_a_brute_force_through_random_writes(
    store: SqlItemStore, store_url: str | None, merge_min: int, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setattr(field_index, "MERGE_MIN", merge_min)
    finite = store_url is not None
    rng = np.random.default_rng(merge_min)
    follower = LogFollower(store, "s", VectorIndex(D), LogPosition(0))
    serial = 0

    def add(n: int, *, replace_ids: list[str] | None = None) -> None:
        nonlocal serial
        ids = replace_ids or [f"it-{serial + i}" for i in range(n)]
        serial += n
        items = [NewItem(i, f"sha-{i}-{serial}", "image/png", metadata(rng, finite=finite)) for i in ids]
        store.add(items, {"s": rng.standard_normal((len(ids), D)).astype(np.float32)}, replace=replace_ids is not None)

    for _ in range(6):
        add(500)
    follower.poll()
    check(follower, store, rng, 40)  # builds the indexes of every field the filters name
    for _ in range(8):
        live = [it.id for it in store.items_after(0, 1_000_000)]
        chosen = list(rng.choice(live, size=300, replace=False))
        add(150)
        add(0, replace_ids=chosen[:60])  # new pks for the same ids
        for item_id in chosen[60:200]:
            store.update_metadata(str(item_id), metadata(rng, finite=finite), merge=bool(rng.integers(2)))
        for item_id in chosen[200:]:
            store.delete(str(item_id))
        follower.poll()
        check(follower, store, rng, 15)
    assert len(follower.matching([])) == store.count()


def test_a_field_is_indexed_from_the_records_a_snapshot_restored() -> None:
    """A host started from its snapshot: its records come from JSON (NaN and infinities
    included), the field indexes are built on the first filter and follow later records."""
    rng = np.random.default_rng(3)
    rows = [[pk, f"it-{pk}", metadata(rng, finite=False)] for pk in range(1, 3001)]
    follower = LogFollower(None, "s", VectorIndex(D), LogPosition(0))  # type: ignore[arg-type]  # no store read
    follower.restore_records(json.dumps(rows).encode())
    for _ in range(30):
        flt = random_filter(rng)
        meets = predicate(parse_filter(flt))
        want = [pk for pk, _, meta in rows if meets(meta)]
        assert follower.matching(parse_filter(flt)).tolist() == want, flt
        changed = rng.choice(len(rows), size=50, replace=False)
        for i in changed:
            rows[i][2] = metadata(rng, finite=False)
        follower.restore_records(json.dumps([rows[i] for i in changed]).encode())
    assert len(follower.matching([])) == len(rows)
