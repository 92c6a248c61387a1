"""ANN recall@10 against exact search on real embeddings, beside synthetic sets, one run.

Data (`--embeddings`: an .npz with `vectors` [N, D], e.g. the 50,000 CIFAR-10 train JPEGs
embedded by a trained model, what bench/bulk_index_kill.py --save-embeddings writes):

* real: the embeddings in a random order, the last `--queries` of them held out as queries;
* gaussian: as many vectors drawn with the real ones' mean and covariance (bench/synthetic.py,
  what bench/million_items.py --like draws at 1M), queries drawn alike;
* mixture: search_ann.py's 1,000-centre gaussian mixture, for contrast: its neighbours sit in
  tight clusters that IVF finds in one list.

How hard each set is comes first: the mean score of the 1st and 10th exact neighbour, of the
11th, and of a random pair. Each index grows as the service's does: batches of 1,000 through
`VectorIndex.add` (an IVF index trains once `index_min_train_vectors` exist), and when
`upkeep_due` asks (an IVF index grown 4-fold since its training) it is rebuilt from all the
vectors so far, as `build_from_store` does. Then recall@10 against exact FAISS search at the
service's search parameters (`nprobe=32,efSearch=128`, marked *) and a sweep of them, and the
p50 of one query per call.

    OMP_NUM_THREADS=1 .venv/bin/python bench/ann_recall.py --embeddings /tmp/c10-train-emb.npz --threads 1
"""

from __future__ import annotations

import argparse
import time
from pathlib import Path

import faiss
import numpy as np
from search_ann import K, mixture, recall, timed_single
from synthetic import gaussian_like, load_real

from service.items.index import VectorIndex
from service.settings import DEFAULT_INDEX_SEARCH_PARAMS

BATCH = 1000


def grown(dim: int, factory: str, base: np.ndarray) -> tuple[VectorIndex, float, list[str]]:
    """An index grown to `base` as the service grows one, its build seconds, and where it was
    rebuilt and what it ended as."""
    ids = np.arange(len(base), dtype=np.int64)
    started, kinds = time.perf_counter(), []
    index = VectorIndex(dim, factory)
    for start in range(0, len(base), BATCH):
        index.add(ids[start : start + BATCH], base[start : start + BATCH])
        if index.upkeep_due():
            index = VectorIndex(dim, factory)
            index.add(ids[: start + BATCH], base[: start + BATCH])
            kinds.append(f"rebuilt at {start + BATCH:,}")
    kinds.append(index.kind)
    return index, time.perf_counter() - started, kinds


def sweep(index: VectorIndex) -> list[str]:
    """The search parameters to try on `index` (the service's default first)."""
    if faiss.try_extract_index_ivf(index._index) is not None:
        return [f"nprobe={p}" for p in (32, 8, 16, 64, 128)]
    if "HNSW" in index.factory:
        return [f"efSearch={e}" for e in (128, 32, 64, 256)]
    return [DEFAULT_INDEX_SEARCH_PARAMS]


def hardness(base: np.ndarray, queries: np.ndarray, truth_scores: np.ndarray, rng: np.random.Generator) -> str:
    pairs = np.einsum("ij,ij->i", queries, base[rng.integers(0, len(base), len(queries))])
    return (
        f"mean score of neighbour 1: {truth_scores[:, 0].mean():.3f}, 10: {truth_scores[:, K - 1].mean():.3f}, "
        f"11: {truth_scores[:, K].mean():.3f}; of a random pair: {pairs.mean():.3f}"
    )


def run(name: str, base: np.ndarray, queries: np.ndarray, factories: list[str], rng: np.random.Generator) -> None:
    dim = base.shape[1]
    exact = VectorIndex(dim)
    exact.add(np.arange(len(base), dtype=np.int64), base)
    truth_scores, truth = exact.search(queries, K + 1)
    print(f"\n### {name}: {len(base):,} vectors, d={dim}, {len(queries):,} queries, k={K}\n")
    print(hardness(base, queries, truth_scores, rng) + "\n")
    print("| index (as grown) | build s | search params | recall@10 vs exact | p50 ms/query |")
    print("|---|---:|---|---:|---:|")
    exact_lat = timed_single(lambda q: exact.search(q, K), queries[:200])
    print(f"| exact (IDMap2,Flat) | - | - | 1.000 | {np.percentile(exact_lat, 50):.3f} |")
    for factory in factories:
        index, build_s, kinds = grown(dim, factory, base)
        for params in sweep(index):
            space = faiss.ParameterSpace()
            for item in params.split(","):
                key, value = item.split("=")
                try:
                    space.set_index_parameter(index._index, key, int(value))
                except RuntimeError:
                    continue  # the parameter does not apply to this index type
            found = index.search(queries, K)[1]
            lat = timed_single(lambda q: index.search(q, K), queries[:200])
            mark = " *" if params in DEFAULT_INDEX_SEARCH_PARAMS.split(",") else ""
            print(
                f"| {' -> '.join(kinds)} | {build_s:.1f} | {params}{mark} | "
                f"{recall(found, truth[:, :K]):.3f} | {np.percentile(lat, 50):.3f} |",
                flush=True,
            )


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--embeddings", type=Path, required=True, help=".npz with vectors [N, D]")
    ap.add_argument("--queries", type=int, default=1000)
    ap.add_argument("--factories", default="HNSW32;IVFauto,Flat")
    ap.add_argument("--sets", default="real,gaussian,mixture")
    ap.add_argument("--threads", type=int, default=0, help="FAISS OpenMP threads (0 = all)")
    ap.add_argument("--seed", type=int, default=0)
    args = ap.parse_args()
    if args.threads:
        faiss.omp_set_num_threads(args.threads)
    rng = np.random.default_rng(args.seed)
    real = load_real(args.embeddings)
    real = real[rng.permutation(len(real))]  # a folder's embeddings come class by class
    n, dim = len(real) - args.queries, real.shape[1]
    factories = args.factories.split(";")
    for name in args.sets.split(","):
        if name == "real":
            base, queries = real[:n], real[n:]
        elif name == "gaussian":
            draw = gaussian_like(real)
            base, queries = draw(rng, n), draw(rng, args.queries)
        else:
            centers = rng.standard_normal((1000, dim), dtype=np.float32)
            base, queries = mixture(rng, n, dim, centers, 0.5), mixture(rng, args.queries, dim, centers, 0.5)
        run(name, base, queries, factories, rng)


if __name__ == "__main__":
    main()
