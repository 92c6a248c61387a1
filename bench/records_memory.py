"""Memory of the ids and metadata each API host keeps beside its index (`LogFollower` records:
pk -> HitRecord(id, metadata), and id -> pk), per item, and their size in the snapshot.

The records are filled the way a host started from its snapshot fills them
(`restore_records` on the snapshot's JSON section). Two measures, on two followers: the
growth of the process's resident set (/proc/self/statm) across filling the first, which
also counts the allocator's slack and the parsed JSON that was freed but not given back to
the system; and tracemalloc's net allocation for the second once the input is freed (the
Python objects kept: dicts, strings, numbers).

    .venv/bin/python bench/records_memory.py --items 100000
"""

from __future__ import annotations

import argparse
import gc
import json
import os
import tracemalloc

from service.items.follower import LogFollower, LogPosition
from service.items.index import VectorIndex

LABELS = ["cat", "dog", "car", "tree", "boat", "house", "bird", "road", "sky", "face"]


def rss_bytes() -> int:
    with open("/proc/self/statm") as f:
        return int(f.read().split()[1]) * os.sysconf("SC_PAGE_SIZE")


def fresh_follower() -> LogFollower:
    return LogFollower(None, "bench", VectorIndex(8), LogPosition(0))  # type: ignore[arg-type]  # no store read


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--items", type=int, default=100_000)
    args = ap.parse_args()
    n = args.items
    # a small metadata dict per item: a label, an int and a float; ids like the API's
    rows = [[pk, f"item-{pk:07d}", {"label": LABELS[pk % 10], "n": pk, "u": pk / n}] for pk in range(1, n + 1)]
    raw = json.dumps(rows, separators=(",", ":")).encode()
    del rows
    gc.collect()
    before_rss = rss_bytes()
    follower = fresh_follower()  # untraced: tracemalloc's own bookkeeping would swell the RSS
    follower.restore_records(raw)
    gc.collect()
    grown = rss_bytes() - before_rss
    section = len(follower.records_json())
    tracemalloc.start()
    traced = fresh_follower()
    traced.restore_records(raw)
    del raw
    gc.collect()
    kept, _ = tracemalloc.get_traced_memory()
    tracemalloc.stop()
    print(f"{n:,} items, metadata like {json.dumps({'label': 'cat', 'n': 1, 'u': 0.5})}")
    print(f"tracemalloc, net kept: {kept / 2**20:.1f} MiB = {kept / n:.0f} B per item")
    print(f"RSS growth: {grown / 2**20:.1f} MiB = {grown / n:.0f} B per item")
    print(f"snapshot section (JSON): {section / 2**20:.1f} MiB = {section / n:.0f} B per item")


if __name__ == "__main__":
    main()
