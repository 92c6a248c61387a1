"""Search latency and recall@10: the ANN index factories against exact FAISS search, and exact
FAISS against a numpy brute force (matrix product + argpartition), all in one run.

Data: a gaussian mixture on the unit sphere (clusters make ANN recall meaningful; uniform
random vectors in high dimension have no near neighbours). Indexes go through
service.items.index.VectorIndex, the class the server uses.

    .venv/bin/python bench/search_ann.py --sizes 100000 --dim 512
    .venv/bin/python bench/search_ann.py --sizes 1000000 --dim 128
"""

from __future__ import annotations

import argparse
import time

import faiss
import numpy as np

from service.items.index import VectorIndex

K = 10


def mixture(rng: np.random.Generator, n: int, d: int, centers: np.ndarray, spread: float) -> np.ndarray:
    """n unit vectors around random centres: float32 [n, d]."""
    out = np.empty((n, d), dtype=np.float32)
    for start in range(0, n, 100_000):
        m = min(100_000, n - start)
        x = centers[rng.integers(0, len(centers), m)] + spread * rng.standard_normal((m, d), dtype=np.float32)
        out[start : start + m] = x / np.linalg.norm(x, axis=1, keepdims=True)
    return out


def numpy_topk(base: np.ndarray, queries: np.ndarray, k: int) -> np.ndarray:
    scores = queries @ base.T  # [Q, N]
    part = np.argpartition(-scores, k, axis=1)[:, :k]
    order = np.argsort(-np.take_along_axis(scores, part, axis=1), axis=1)
    return np.take_along_axis(part, order, axis=1)


def timed_single(search, queries: np.ndarray) -> np.ndarray:
    """Per-query latencies in ms, one query per call (the API's case)."""
    out = np.empty(len(queries))
    for i in range(len(queries)):
        t = time.perf_counter()
        search(queries[i : i + 1])
        out[i] = (time.perf_counter() - t) * 1000
    return out


def recall(found: np.ndarray, truth: np.ndarray) -> float:
    return float(np.mean([len(set(f) & set(t)) / K for f, t in zip(found, truth)]))


def run(n: int, d: int, nq: int, factories: list[str], nprobes: list[int], seed: int) -> list[tuple]:
    rng = np.random.default_rng(seed)
    centers = rng.standard_normal((1000, d), dtype=np.float32)
    base, queries = mixture(rng, n, d, centers, 0.5), mixture(rng, nq, d, centers, 0.5)
    ids = np.arange(n, dtype=np.int64)
    rows = []

    t = time.perf_counter()
    exact = VectorIndex(d)
    exact.add(ids, base)
    build = time.perf_counter() - t
    lat = timed_single(lambda q: exact.search(q, K), queries)
    t = time.perf_counter()
    truth = exact.search(queries, K)[1]
    batch = time.perf_counter() - t
    rows.append(("exact FAISS (IDMap2,Flat)", build, lat, batch, 1.0))

    lat = timed_single(lambda q: numpy_topk(base, q, K), queries[: max(20, nq // 10)])
    t = time.perf_counter()
    found = numpy_topk(base, queries, K)
    batch = time.perf_counter() - t
    rows.append(("numpy brute force", 0.0, lat, batch, recall(found, truth)))

    for factory in factories:
        t = time.perf_counter()
        index = VectorIndex(d, factory, min_train=1, search_params="efSearch=128")
        index.add(ids, base)
        build = time.perf_counter() - t
        ivf = faiss.try_extract_index_ivf(index._index)
        for nprobe in nprobes if ivf is not None else [None]:
            if ivf is not None:
                ivf.nprobe = nprobe
            lat = timed_single(lambda q: index.search(q, K), queries)
            t = time.perf_counter()
            found = index.search(queries, K)[1]
            batch = time.perf_counter() - t
            name = factory + (f" nprobe={nprobe}" if nprobe else " efSearch=128")
            rows.append((name, build, lat, batch, recall(found, truth)))
    return rows


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--sizes", type=lambda s: [int(x) for x in s.split(",")], default=[100_000])
    ap.add_argument("--dim", type=int, default=512)
    ap.add_argument("--queries", type=int, default=200)
    ap.add_argument("--factories", default="HNSW32;IVF1024,Flat;IVF1024,PQ32")
    ap.add_argument("--nprobe", default="8,32,128")
    ap.add_argument("--threads", type=int, default=0, help="FAISS OpenMP threads (0 = all)")
    ap.add_argument("--seed", type=int, default=0)
    args = ap.parse_args()
    if args.threads:
        faiss.omp_set_num_threads(args.threads)
    for n in args.sizes:
        rows = run(
            n, args.dim, args.queries, args.factories.split(";"), [int(x) for x in args.nprobe.split(",")], args.seed
        )
        print(
            f"\n### {n:,} vectors, d={args.dim}, {args.queries} queries, k={K}, {faiss.omp_get_max_threads()} threads\n"
        )
        print("| index | build s | p50 ms/query | p99 ms/query | batch ms/query | recall@10 vs exact |")
        print("|---|---:|---:|---:|---:|---:|")
        for name, build, lat, batch, rec in rows:
            print(
                f"| {name} | {build:.1f} | {np.percentile(lat, 50):.3f} | {np.percentile(lat, 99):.3f} | "
                f"{batch * 1000 / args.queries:.3f} | {rec:.3f} |"
            )


if __name__ == "__main__":
    main()
