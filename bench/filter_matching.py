"""Filtered search on the metadata an API host keeps beside its index: `LogFollower.matching`
(the pks meeting a filter) and a k=10 search of a Flat index restricted to them, at N items.

The records are filled the way a host started from its snapshot fills them
(`restore_records`), with metadata `{"u": uniform [0, 1), "shop": one of 100, "half": 0 or
1}`; vectors are random (dim 128, unit norm). Per filter: the first call (which, with the
field indexes, builds the index of each field it names), the median of 5 later calls, the
median of 5 filtered searches, and the median of 5 calls each made right after 1,000
records were replaced by new metadata (the upkeep of the field indexes). Run it against any
tree's code with PYTHONPATH (the previous code: a Python pass over every record):

    PYTHONPATH=$PWD OMP_NUM_THREADS=1 .venv/bin/python bench/filter_matching.py --items 200000
"""

from __future__ import annotations

import argparse
import gc
import json
import statistics
import time
import tracemalloc
from collections.abc import Callable
from typing import Any

import faiss
import numpy as np

from service.items.filters import parse_filter
from service.items.follower import LogFollower, LogPosition
from service.items.index import VectorIndex

DIM = 128
FILTERS: dict[str, dict[str, Any]] = {
    "range 1%": {"u": {"lt": 0.01}},
    "range 50%": {"u": {"gte": 0.25, "lt": 0.75}},
    "equality 1% (string)": {"shop": "shop-007"},
    "equality 50% (number)": {"half": 1},
    "AND 1% (in 50 shops, u < 0.02)": {"shop": {"in": [f"shop-{i:03d}" for i in range(50)]}, "u": {"lt": 0.02}},
}


def ms(call: Callable[[], object]) -> float:
    start = time.perf_counter()
    call()
    return (time.perf_counter() - start) * 1e3


def meta(rng: np.random.Generator) -> dict[str, Any]:
    return {"u": float(rng.random()), "shop": f"shop-{int(rng.integers(100)):03d}", "half": int(rng.integers(2))}


def memory(raw: bytes, n: int) -> None:
    """What a first filter on each field leaves allocated (its field index, where there is one)."""
    follower = LogFollower(None, "bench", VectorIndex(DIM), LogPosition(0))  # type: ignore[arg-type]
    follower.restore_records(raw)
    tracemalloc.start()
    for field, raw_filter in (
        ("u (float)", {"u": {"lt": 0.5}}),
        ("shop (string)", {"shop": "shop-007"}),
        ("half (int)", {"half": 1}),
    ):
        before, _ = tracemalloc.get_traced_memory()
        follower.matching(parse_filter(raw_filter))
        gc.collect()
        print(
            f"memory kept after the first filter on {field}: {(tracemalloc.get_traced_memory()[0] - before) / n:.1f} B per item"
        )
    tracemalloc.stop()


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--items", type=int, default=200_000)
    ap.add_argument("--repeats", type=int, default=5)
    ap.add_argument("--seed", type=int, default=0)
    args = ap.parse_args()
    faiss.omp_set_num_threads(1)
    rng = np.random.default_rng(args.seed)
    n = args.items
    raw = json.dumps([[pk, f"item-{pk:07d}", meta(rng)] for pk in range(1, n + 1)]).encode()
    memory(raw, n)
    follower = LogFollower(None, "bench", VectorIndex(DIM), LogPosition(0))  # type: ignore[arg-type]  # no store read
    follower.restore_records(raw)
    vecs = rng.standard_normal((n, DIM)).astype(np.float32)
    follower.index.add(np.arange(1, n + 1, dtype=np.int64), vecs / np.linalg.norm(vecs, axis=1, keepdims=True))
    print(f"{n:,} items; median of {args.repeats}; ms")
    print("| filter | matching | first call | matching after 1,000 changes | filtered search k=10 |")
    print("|---|---:|---:|---:|---:|")
    for name, flt in FILTERS.items():
        where = parse_filter(flt)
        first = ms(lambda: follower.matching(where))
        share = len(follower.matching(where)) / n
        again = statistics.median(ms(lambda: follower.matching(where)) for _ in range(args.repeats))
        changed = []
        for _ in range(args.repeats):
            pks = rng.choice(n, size=1000, replace=False) + 1
            follower.restore_records(json.dumps([[int(p), f"item-{p:07d}", meta(rng)] for p in pks]).encode())
            changed.append(ms(lambda: follower.matching(where)))
        query = rng.standard_normal((1, DIM)).astype(np.float32)
        search = statistics.median(
            ms(lambda: follower.index.search(query, 10, follower.matching(where))) for _ in range(args.repeats)
        )
        print(
            f"| {name} ({share:.1%} matched) | {again:.2f} | {first:.1f} "
            f"| {statistics.median(changed):.2f} | {search:.2f} |"
        )


if __name__ == "__main__":
    main()
