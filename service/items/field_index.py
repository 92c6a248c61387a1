"""Per-field indexes of the metadata a follower keeps beside its vectors, so that a filtered
search costs about what its matching subset costs instead of a Python pass over every item.

A field is indexed the first time a filter names it (one pass over the kept records), then
kept up to date by every change to the records (`FieldIndexes.keep` and `.drop`, called by
the follower under its records lock). Per field:

* numbers held exactly by a float64 (every float, and ints up to 2**53 in magnitude): a
  base of (value, pk) pairs sorted by value then pk, plus the changes since it was built
  (`pending` additions, `dropped` pks of the base), merged into a new base once they pass
  1/32 of it (so a change costs O(1) plus its share of an O(N log N) merge);
* the rare ints a float64 cannot hold exactly (and those beyond its range): pk -> value,
  tested one by one;
* strings and booleans: `equality_key` -> set of pks, each with its sorted array cached
  until the set changes.

The answers are exactly `filters.predicate`'s: equality of numbers is numeric (3 == 3.0),
while a string or boolean only equals a value of its own type (`true` is not 1, "3" is not
3); NaN and non-scalar values match nothing. A range bound b is compared through
f = float(b): rounding is monotone, so a value below (above) f is below (above) b, and the
values equal to f all compare with b as f itself does (one exact Python comparison).
"""

from __future__ import annotations

import math
from collections.abc import Callable, Iterable, Mapping, Sequence
from dataclasses import dataclass
from typing import Any

import numpy as np

from service.items.backend import HitRecord
from service.items.filters import COMPARE, RANGE_OPS, Condition, is_number, predicate

Key = tuple[Any, Any]  # equality_key's
MISSING = object()
NUMBER = "number"
MERGE_MIN = 1024  # changes kept beside a field's sorted numbers before a merge, at least


def equality_key(value: Any) -> Key | None:
    """The class of `value` under `filters._equal`: two scalars are equal exactly when their
    keys are (numbers by value, as Python compares an int with a float, so 3 and 3.0 share a
    key; a string or boolean with its type, so True and 1 do not). None: equal to no scalar
    (NaN, lists, objects, null)."""
    if is_number(value):
        return (NUMBER, value)
    if isinstance(value, str | bool):
        return (type(value), value)
    return None


def _as_float(value: int | float) -> float:
    """The float64 nearest a number (an int beyond its range: +-inf, still order-preserving)."""
    try:
        return float(value)
    except OverflowError:
        return math.inf if value > 0 else -math.inf


def _empty() -> np.ndarray:
    return np.empty(0, dtype=np.int64)


def _pks(values: Iterable[int], count: int) -> np.ndarray:
    return np.sort(np.fromiter(values, dtype=np.int64, count=count))


class _Numbers:
    """Exactly held numeric values of one field: sorted base plus changes since its build."""

    def __init__(self) -> None:
        self.vals = np.empty(0, dtype=np.float64)
        self.pks = _empty()
        self.pending: dict[int, float] = {}
        self.dropped: set[int] = set()
        self._dropped_arr: np.ndarray | None = None

    def add(self, pk: int, value: float, *, merge: bool = True) -> None:
        self.pending[pk] = value
        if merge:
            self._maybe_merge()

    def remove(self, pk: int) -> None:
        if self.pending.pop(pk, None) is None:  # it is in the base
            self.dropped.add(pk)
            self._dropped_arr = None
        self._maybe_merge()

    def _maybe_merge(self) -> None:
        if len(self.pending) + len(self.dropped) > max(MERGE_MIN, len(self.vals) // 32):
            self.merge()

    def merge(self) -> None:
        """Fold the changes into a new sorted base."""
        keep = ~np.isin(self.pks, self._dropped()) if self.dropped else slice(None)
        vals = np.concatenate([self.vals[keep], np.fromiter(self.pending.values(), np.float64, len(self.pending))])
        pks = np.concatenate([self.pks[keep], np.fromiter(self.pending.keys(), np.int64, len(self.pending))])
        order = np.lexsort((pks, vals))
        self.vals, self.pks = vals[order], pks[order]
        self.pending, self.dropped, self._dropped_arr = {}, set(), None

    def _dropped(self) -> np.ndarray:
        if self._dropped_arr is None:
            self._dropped_arr = _pks(self.dropped, len(self.dropped))
        return self._dropped_arr

    def span(self, tests: Sequence[tuple[str, Any]]) -> tuple[int, int]:
        """The base positions [start, end) whose values pass every (op, bound) test."""
        start, end = 0, len(self.vals)
        for op, bound in tests:
            f = _as_float(bound)
            ties = COMPARE[op](f, bound)  # how the values equal to f compare with the bound
            if op in ("gte", "gt", "eq"):
                start = max(start, int(np.searchsorted(self.vals, f, "left" if ties else "right")))
            if op in ("lte", "lt", "eq"):
                end = min(end, int(np.searchsorted(self.vals, f, "right" if ties else "left")))
        return start, max(start, end)

    def select(self, tests: Sequence[tuple[str, Any]], span: tuple[int, int]) -> np.ndarray:
        """pks (ascending) of the values passing every test; `span` is `span(tests)`."""
        start, end = span
        base = self.pks[start:end]
        if self.dropped and len(base):
            base = base[~np.isin(base, self._dropped())]
        if len(base) and self.vals[start] != self.vals[end - 1]:  # several values: pk order lost
            base = np.sort(base)
        extra = [p for p, v in self.pending.items() if all(COMPARE[op](v, b) for op, b in tests)]
        if not extra:
            return base
        return np.sort(np.concatenate([base, np.asarray(extra, dtype=np.int64)]))


class FieldIndex:
    """One metadata field's values -> pks (see the module's docstring)."""

    def __init__(self, values: Iterable[tuple[int, Any]]) -> None:
        self.odd: dict[int, int] = {}  # ints a float64 does not hold exactly
        self.keys: dict[Key, set[int]] = {}
        self._sorted: dict[Key, np.ndarray] = {}
        self.numbers = _Numbers()
        for pk, value in values:
            self.add(pk, value, merge=False)
        self.numbers.merge()

    def add(self, pk: int, value: Any, *, merge: bool = True) -> None:
        if is_number(value):
            f = _as_float(value)
            if f == value:
                self.numbers.add(pk, f, merge=merge)
            else:
                self.odd[pk] = value
        elif (key := equality_key(value)) is not None:
            self.keys.setdefault(key, set()).add(pk)
            self._sorted.pop(key, None)

    def remove(self, pk: int, value: Any) -> None:
        """Forget pk's `value` (the one it was added with)."""
        if is_number(value):
            if self.odd.pop(pk, None) is None:
                self.numbers.remove(pk)
        elif (key := equality_key(value)) is not None:
            pks = self.keys.get(key)
            if pks is not None:
                pks.discard(pk)
                self._sorted.pop(key, None)
                if not pks:
                    del self.keys[key]

    def _keyed(self, key: Key) -> np.ndarray:
        found = self._sorted.get(key)
        if found is None:
            pks = self.keys.get(key, set())
            found = self._sorted[key] = _pks(pks, len(pks))
        return found

    def numeric(self, tests: Sequence[tuple[str, Any]]) -> tuple[int, Callable[[], np.ndarray]]:
        """(at most how many, pks) of the numbers passing every (op, bound) test."""
        span = self.numbers.span(tests)

        def select() -> np.ndarray:
            found = self.numbers.select(tests, span)
            odd = [p for p, v in self.odd.items() if all(COMPARE[op](v, b) for op, b in tests)]
            return np.sort(np.concatenate([found, np.asarray(odd, dtype=np.int64)])) if odd else found

        return span[1] - span[0] + len(self.numbers.pending) + len(self.odd), select

    def equal_any(self, values: Sequence[Any]) -> tuple[int, Callable[[], np.ndarray]]:
        """(at most how many, pks) of the values equal to one of `values`."""
        distinct = {equality_key(v): v for v in values}  # one value per pk: their pks are disjoint
        parts = [
            self.numeric([("eq", v)]) if key[0] == NUMBER else (len(self.keys.get(key, ())), self._lookup(key))
            for key, v in distinct.items()
            if key is not None
        ]
        if len(parts) == 1:
            return parts[0]
        return sum(n for n, _ in parts), lambda: np.sort(np.concatenate([_empty(), *(get() for _, get in parts)]))

    def _lookup(self, key: Key) -> Callable[[], np.ndarray]:
        return lambda: self._keyed(key)


@dataclass
class _Unit:
    """Conditions answered by one index lookup: an upper bound on the matches, the lookup,
    and a test of one item's metadata (for a few candidates, instead of the lookup)."""

    estimate: int
    select: Callable[[], np.ndarray]
    meets: Callable[[dict[str, Any] | None], bool]


def _equal_any(field: str, values: Sequence[Any]) -> Callable[[dict[str, Any] | None], bool]:
    """The test of an eq or in condition: one set lookup, however many values."""
    keys = {equality_key(v) for v in values} - {None}
    return lambda meta: isinstance(meta, dict) and equality_key(meta.get(field, MISSING)) in keys


class FieldIndexes:
    """The indexed fields of a follower's records; every call is made under its records lock."""

    def __init__(self) -> None:
        self.fields: dict[str, FieldIndex] = {}

    def keep(self, pk: int, old: HitRecord | None, new: HitRecord) -> None:
        """pk's record becomes `new` (it was `old`, or none)."""
        old_meta = old.metadata if old is not None and isinstance(old.metadata, dict) else {}
        new_meta = new.metadata if isinstance(new.metadata, dict) else {}
        for name, index in self.fields.items():
            was, now = old_meta.get(name, MISSING), new_meta.get(name, MISSING)
            if type(was) is type(now) and (was is now or was == now):
                continue
            if was is not MISSING:
                index.remove(pk, was)
            if now is not MISSING:
                index.add(pk, now)

    def drop(self, pk: int, old: HitRecord) -> None:
        if isinstance(old.metadata, dict):
            for name, index in self.fields.items():
                if name in old.metadata:
                    index.remove(pk, old.metadata[name])

    def _field(self, name: str, records: Mapping[int, HitRecord]) -> FieldIndex:
        index = self.fields.get(name)
        if index is None:
            index = self.fields[name] = FieldIndex(
                (pk, r.metadata[name])
                for pk, r in records.items()
                if isinstance(r.metadata, dict) and name in r.metadata
            )
        return index

    def matching(self, where: Sequence[Condition], records: Mapping[int, HitRecord]) -> np.ndarray:
        """pks (int64, ascending) of `records` meeting every condition: the most selective
        lookup first, then each other one intersected, or tested on the few candidates left."""
        if not where:
            return _pks(records.keys(), len(records))
        units: list[_Unit] = []
        ranges: dict[str, list[Condition]] = {}
        for cond in where:
            if cond.op in RANGE_OPS:
                ranges.setdefault(cond.field, []).append(cond)
            else:
                values = (cond.value,) if cond.op == "eq" else cond.value
                index = self._field(cond.field, records)
                units.append(_Unit(*index.equal_any(values), _equal_any(cond.field, values)))
        for name, conds in ranges.items():
            units.append(_Unit(*self._field(name, records).numeric([(c.op, c.value) for c in conds]), predicate(conds)))
        units.sort(key=lambda u: u.estimate)
        found = units[0].select()
        for unit in units[1:]:
            if not len(found):
                break
            if len(found) * 16 < unit.estimate:  # cheaper to test the candidates than to look up
                meets = unit.meets
                found = found[np.fromiter((meets(records[int(p)].metadata) for p in found), bool, len(found))]
            else:
                found = np.intersect1d(found, unit.select(), assume_unique=True)
        return found.astype(np.int64, copy=False)
