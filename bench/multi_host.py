"""Several API hosts on one item store: SQLite vs PostgreSQL, one host and two.

Each configuration starts `simclr-embed serve` processes (uvicorn, loopback, ONNX Runtime on
one thread, the tests' tiny encoder) over one fresh data folder, each host with its own
`SIMCLR_EMBED_LOCAL_DIR`, on the SQLite default (two hosts share the file, as the replicas of
deploy/compose.replicas.yml do) or on a database created for the run on the local
PostgreSQL (dropped after it). Three phases:

1. adds/s: `--clients` threads add `--adds` single-image items, spread over the hosts;
2. visibility lag (two hosts): `--lag-adds` sequential adds on host A; after each 2xx, host B
   is asked `POST /search {"item_id": id, "k": 1}` every `--poll-ms` until its top hit is the
   item (B's index has it): the time from A's 2xx to that answer. Then `--lag-deletes`
   deletes on A, each timed until B's index size (/readyz) has dropped by one, and
   `--lag-replaces` replaces on A (`?replace=true`, a new image and metadata `{"rev": i}`),
   each timed until B's search by that id shows the new metadata. A random
   pause of up to `--jitter-ms` (one follow period) precedes each add and delete, so that
   they do not fall in step with B's follower (each would start just after B's last poll
   and wait a whole period);
3. search: `--clients` threads send `--searches` image searches (k=10) spread over the hosts.

    .venv/bin/python bench/multi_host.py --adds 400 --lag-adds 1000 --searches 400
"""

from __future__ import annotations

import argparse
import json
import re
import sys
import tempfile
import threading
import time
from collections.abc import Callable, Iterator
from concurrent.futures import ThreadPoolExecutor
from contextlib import ExitStack, contextmanager
from pathlib import Path

import httpx
import numpy as np

REPO = Path(__file__).resolve().parents[1]
sys.path[:0] = [str(REPO), str(REPO / "tests"), str(REPO / "bench")]

from _procs import PostgresDatabases
from load_test import build_data_dir, noise_images

from tests.service.conftest import live_server


def percentile_ms(values: list[float], q: float) -> float:
    return float(np.percentile(np.asarray(values) * 1000, q))


def add(http: httpx.Client, base: str, item_id: str, image: bytes) -> None:
    r = http.post(base + "/items", files=[("files", ("i.png", image, "image/png"))], data={"ids": [item_id]})
    if r.status_code != 201:
        raise RuntimeError(f"add {item_id} on {base}: {r.status_code} {r.text}")


def replace(http: httpx.Client, base: str, item_id: str, image: bytes, rev: int) -> None:
    r = http.post(
        base + "/items?replace=true",
        files=[("files", ("i.png", image, "image/png"))],
        data={"ids": [item_id], "metadata": [json.dumps({"rev": rev})]},
    )
    if r.status_code != 201:
        raise RuntimeError(f"replace {item_id} on {base}: {r.status_code} {r.text}")


def top_hit(http: httpx.Client, base: str, item_id: str) -> dict | None:
    """The top hit of a search by `item_id` (id, score, metadata), None while the host lacks it."""
    r = http.post(base + "/search", json={"item_id": item_id, "k": 1})
    results = r.json().get("results") if r.status_code == 200 else None
    return results[0] if results else None


def index_size(http: httpx.Client, base: str) -> int:
    check = http.get(base + "/readyz").json()["checks"]["index"]
    match = re.search(r", (\d+) vectors", check)
    if not match:
        raise RuntimeError(f"{base}: no index: {check}")
    return int(match.group(1))


def spread(
    hosts: list[str], work: list[Callable[[httpx.Client, str], None]], clients: int
) -> tuple[float, list[float]]:
    """Run each job of `work` on a host (round robin) from `clients` threads: (wall s, per-job s)."""
    local = threading.local()
    times: list[float] = []

    def run(i: int) -> None:
        if not hasattr(local, "http"):
            local.http = httpx.Client(timeout=60)
        t0 = time.perf_counter()
        work[i](local.http, hosts[i % len(hosts)])
        times.append(time.perf_counter() - t0)

    start = time.perf_counter()
    with ThreadPoolExecutor(clients) as pool:
        list(pool.map(run, range(len(work))))
    return time.perf_counter() - start, times


def wait_for(check: Callable[[], bool], poll_s: float, limit_s: float = 30.0) -> float:
    start = time.perf_counter()
    while not check():
        if time.perf_counter() - start > limit_s:
            raise RuntimeError("not visible within 30 s")
        time.sleep(poll_s)
    return time.perf_counter() - start


@contextmanager
def store_url(backend: str) -> Iterator[str | None]:
    if backend == "sqlite":
        yield None
        return
    with PostgresDatabases.local().database() as url:
        yield url


def run_config(backend: str, n_hosts: int, args: argparse.Namespace, root: Path) -> dict[str, object]:
    (root / f"{backend}-{n_hosts}").mkdir()
    template = build_data_dir(root / f"{backend}-{n_hosts}")
    images = noise_images(args.adds + args.lag_adds, seed=n_hosts)
    queries = noise_images(50, seed=99)
    replacements = noise_images(args.lag_replaces, seed=100 + n_hosts)
    result: dict[str, object] = {"backend": backend, "hosts": n_hosts}
    with store_url(backend) as url, ExitStack() as stack:
        env = {"SIMCLR_EMBED_STORE_URL": url} if url else {}
        hosts = [
            stack.enter_context(
                live_server(template, SIMCLR_EMBED_LOCAL_DIR=str(template / "local" / f"h{h}"), **env)
            ).url
            for h in range(n_hosts)
        ]
        http = stack.enter_context(httpx.Client(timeout=60))
        wall, times = spread(
            hosts,
            [lambda c, h, i=i: add(c, h, f"t{i}", images[i]) for i in range(args.adds)],
            args.clients,
        )
        result |= {"adds_per_s": args.adds / wall, "add_p50_ms": percentile_ms(times, 50)}
        result["add_p99_ms"] = percentile_ms(times, 99)
        if n_hosts == 2:
            a, b = hosts
            lags = []
            jitter = np.random.default_rng(0).uniform(0, args.jitter_ms / 1000, args.lag_adds)
            for i in range(args.lag_adds):
                item_id = f"l{i}"
                time.sleep(jitter[i])  # else each add starts just after B's last poll: always the worst case
                add(http, a, item_id, images[args.adds + i])
                lags.append(
                    wait_for(
                        lambda item_id=item_id: (top_hit(http, b, item_id) or {}).get("id") == item_id,
                        args.poll_ms / 1000,
                    )
                )
            result |= {"lag_p50_ms": percentile_ms(lags, 50), "lag_p99_ms": percentile_ms(lags, 99)}
            result["lag_max_ms"] = max(lags) * 1000
            deletes = []
            size = index_size(http, b)
            for i in range(args.lag_deletes):
                time.sleep(jitter[i])
                if http.delete(f"{a}/items/l{i}").status_code != 204:
                    raise RuntimeError(f"delete l{i} failed")
                size -= 1
                deletes.append(wait_for(lambda size=size: index_size(http, b) == size, args.poll_ms / 1000))
            result |= {"delete_lag_p50_ms": percentile_ms(deletes, 50), "delete_lag_p99_ms": percentile_ms(deletes, 99)}
            replaces = []
            for i in range(args.lag_replaces):
                item_id = f"l{args.lag_deletes + i}"  # still stored
                time.sleep(jitter[i])
                replace(http, a, item_id, replacements[i], i)

                def shows_rev(item_id: str = item_id, rev: int = i) -> bool:
                    hit = top_hit(http, b, item_id) or {}
                    return hit.get("id") == item_id and (hit.get("metadata") or {}).get("rev") == rev

                replaces.append(wait_for(shows_rev, args.poll_ms / 1000))
            if replaces:
                result |= {"replace_lag_p50_ms": percentile_ms(replaces, 50)}
                result["replace_lag_p99_ms"] = percentile_ms(replaces, 99)

        def search(c: httpx.Client, h: str, i: int) -> None:
            r = c.post(h + "/search", files={"file": ("q.png", queries[i % 50], "image/png")}, data={"k": "10"})
            if r.status_code != 200 or len(r.json()["results"]) != 10:
                raise RuntimeError(f"search on {h}: {r.status_code} {r.text[:200]}")

        wall, times = spread(hosts, [lambda c, h, i=i: search(c, h, i) for i in range(args.searches)], args.clients)
        result |= {"searches_per_s": args.searches / wall, "search_p50_ms": percentile_ms(times, 50)}
        result["search_p99_ms"] = percentile_ms(times, 99)
    return result


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--adds", type=int, default=400, help="items added in the throughput phase")
    ap.add_argument("--lag-adds", type=int, default=1000, help="sequential adds on A timed until B finds them")
    ap.add_argument("--lag-deletes", type=int, default=100, help="deletes on A timed until B's index drops them")
    ap.add_argument("--lag-replaces", type=int, default=100, help="replaces on A timed until B shows them")
    ap.add_argument("--searches", type=int, default=400)
    ap.add_argument("--clients", type=int, default=4)
    ap.add_argument("--poll-ms", type=float, default=10.0, help="how often B is asked during the lag phase")
    ap.add_argument(
        "--jitter-ms", type=float, default=250.0, help="a random pause before each timed add (up to one follow period)"
    )
    ap.add_argument("--configs", default="sqlite:1,sqlite:2,postgresql:1,postgresql:2")
    args = ap.parse_args()
    rows = []
    with tempfile.TemporaryDirectory(prefix="multi-host-") as tmp:
        for config in args.configs.split(","):
            backend, n = config.split(":")
            row = run_config(backend, int(n), args, Path(tmp))
            print(json.dumps(row), flush=True)
            rows.append(row)
    ok = all(
        float(r.get(key, 0.0)) < 1000  # type: ignore[arg-type]
        for r in rows
        for key in ("lag_p99_ms", "delete_lag_p99_ms", "replace_lag_p99_ms")
    )
    return 0 if ok else 1


if __name__ == "__main__":
    sys.exit(main())
