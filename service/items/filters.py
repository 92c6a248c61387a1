"""Metadata filters for search: `{"field": value, "f2": {"in": [...]}, "n": {"gte": 1, "lt": 5}}`.

Conditions on top-level metadata fields, combined with AND:

* `value` (a string, number or boolean): equality. Types are kept apart: the string "3" does
  not match the number 3, and `true` does not match 1; 3 and 3.0 are equal numbers.
* `{"eq": value}`: the same, spelled out; `{"in": [v, ...]}`: equal to any of 1-1000 values.
* `{"gte"|"gt"|"lte"|"lt": number}`: a numeric range; items whose field is not a number (or
  is missing) never match.

Items lacking the field match no condition on it. Field names are 1-64 characters of
letters, digits, `_` and `-`, starting with a letter or `_`. Anything else raises
InvalidItemRequestError naming the field.

`predicate` is the definition of these semantics: a Python test of one item's metadata.
Searches evaluate filters on the metadata kept beside the served index (follower.py), so a
filtered search needs no store round trip and keeps answering while the store is down; they
look the matching pks up in per-field indexes (field_index.py, the same answers as
`predicate` over every kept item, at a cost that follows the matching subset's size) and
use `predicate` itself only on a few candidates left.
"""

from __future__ import annotations

import operator
import re
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from typing import Any

from service.items.errors import InvalidItemRequestError

FIELD_NAME = re.compile(r"^[A-Za-z_][A-Za-z0-9_-]{0,63}$")
RANGE_OPS = ("gte", "gt", "lte", "lt")
MAX_IN_VALUES = 1000
MAX_CONDITIONS = 32

Scalar = str | int | float | bool


@dataclass(frozen=True)
class Condition:
    """One test of metadata field `field`: op is eq, in, gte, gt, lte or lt."""

    field: str
    op: str
    value: Any  # a Scalar, a tuple of Scalars (in), or a number (ranges)


def _bad(field: str, message: str) -> InvalidItemRequestError:
    return InvalidItemRequestError(f"filter.{field}: {message}", code="invalid_filter", field=f"filter.{field}")


def is_number(value: Any) -> bool:
    """A JSON number: not a boolean, not NaN."""
    return isinstance(value, int | float) and not isinstance(value, bool) and value == value  # not NaN


def _scalar(field: str, value: Any) -> Scalar:
    if isinstance(value, str | bool) or is_number(value):
        return value
    raise _bad(field, f"compare with a string, number or boolean, not {type(value).__name__}")


def parse_filter(raw: Any) -> list[Condition]:
    """A JSON filter object -> its conditions (AND). None or {} is no filter."""
    if raw is None:
        return []
    if not isinstance(raw, dict):
        raise InvalidItemRequestError(
            'filter must be a JSON object of metadata conditions, e.g. {"label": 3}',
            code="invalid_filter",
            field="filter",
        )
    conditions: list[Condition] = []
    for name, test in raw.items():
        if not isinstance(name, str) or not FIELD_NAME.match(name):
            raise _bad(str(name), "field names are 1-64 letters, digits, '_' or '-', starting with a letter or '_'")
        if not isinstance(test, dict):
            conditions.append(Condition(name, "eq", _scalar(name, test)))
            continue
        if not test:
            raise _bad(name, "an empty object tests nothing; give eq, in, gte, gt, lte or lt")
        for op, value in test.items():
            if op == "eq":
                conditions.append(Condition(name, "eq", _scalar(name, value)))
            elif op == "in":
                if not isinstance(value, list) or not 1 <= len(value) <= MAX_IN_VALUES:
                    raise _bad(name, f"'in' takes a list of 1-{MAX_IN_VALUES} values")
                conditions.append(Condition(name, "in", tuple(_scalar(name, v) for v in value)))
            elif op in RANGE_OPS:
                if not is_number(value):
                    raise _bad(name, f"'{op}' takes a number, not {type(value).__name__}")
                conditions.append(Condition(name, op, value))
            else:
                raise _bad(name, f"unknown operator {op!r}; use eq, in, gte, gt, lte or lt")
    if len(conditions) > MAX_CONDITIONS:
        raise InvalidItemRequestError(
            f"a filter takes at most {MAX_CONDITIONS} conditions", code="invalid_filter", field="filter"
        )
    return conditions


def _equal(a: Any, b: Scalar) -> bool:
    if is_number(a) and is_number(b):
        return bool(a == b)
    return type(a) is type(b) and a == b


COMPARE: dict[str, Callable[[Any, Any], bool]] = {
    "gte": operator.ge,
    "gt": operator.gt,
    "lte": operator.le,
    "lt": operator.lt,
    "eq": operator.eq,  # of two numbers (field_index.py compares through float64 with these)
}


def _test(cond: Condition) -> Callable[[Any], bool]:
    """The test of one condition on a field's value."""
    if cond.op in ("eq", "in"):
        values = (cond.value,) if cond.op == "eq" else cond.value
        return lambda v: any(_equal(v, w) for w in values)
    compare, bound = COMPARE[cond.op], cond.value
    return lambda v: is_number(v) and compare(v, bound)


def predicate(conditions: Sequence[Condition]) -> Callable[[dict[str, Any] | None], bool]:
    """Whether an item's metadata (a dict, or None) meets every condition; a missing field meets none."""
    tests = [(c.field, _test(c)) for c in conditions]

    def meets(metadata: dict[str, Any] | None) -> bool:
        if metadata is None:
            return not tests
        return all(field in metadata and test(metadata[field]) for field, test in tests)

    return meets
