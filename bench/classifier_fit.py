"""POST /classifiers' fit (numpy L-BFGS, C by stratified 5-fold CV over 29 values) against the
users' alternative, scikit-learn's LogisticRegressionCV on the same folds and the same C grid,
side by side in one run: wall time and the chosen C and CV accuracy of each.

Data: K Gaussian clusters on the unit sphere (D dims, spread so that accuracy is neither chance
nor perfect), the shape of frozen embeddings; N examples balanced over K classes.

    .venv/bin/python bench/classifier_fit.py --threads 1 --sizes 300 1000 5000
"""

from __future__ import annotations

import argparse
import os
import sys
import time
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--sizes", type=int, nargs="+", default=[300, 1000, 5000])
    parser.add_argument("--dim", type=int, default=512)
    parser.add_argument("--classes", type=int, default=10)
    parser.add_argument("--threads", type=int, default=1)
    args = parser.parse_args()
    for var in ("OMP_NUM_THREADS", "OPENBLAS_NUM_THREADS", "MKL_NUM_THREADS"):
        os.environ[var] = str(args.threads)  # before numpy loads its BLAS

    import numpy as np
    from sklearn.linear_model import LogisticRegressionCV
    from sklearn.model_selection import PredefinedSplit

    from service.classifiers.fit import C_GRID, n_folds_for, stratified_folds, unit_rows
    from service.classifiers.service import fit_examples

    print("| N | ours: s | ours: C, CV acc | scikit-learn: s | scikit-learn: C, CV acc | ratio |")
    print("|---:|---:|---|---:|---|---:|")
    for n in args.sizes:
        rng = np.random.default_rng(n)
        y = rng.permutation(np.arange(n) % args.classes)
        x = unit_rows(
            rng.normal(size=(args.classes, args.dim))[y] * 0.08
            + rng.normal(size=(n, args.dim)) / np.sqrt(args.dim) * 1.0
        )
        t0 = time.perf_counter()
        ours = fit_examples("logreg", x, y.tolist(), "bench").cv  # CV over the grid, then the final fit
        ours_s = time.perf_counter() - t0
        folds = stratified_folds(y, n_folds_for(y))  # the same folds for both
        t0 = time.perf_counter()
        ref = LogisticRegressionCV(
            Cs=list(C_GRID),
            cv=PredefinedSplit(folds),
            tol=1e-5,
            max_iter=1000,
            scoring="accuracy",
            use_legacy_attributes=True,
        ).fit(x, y)
        ref_s = time.perf_counter() - t0
        ref_acc = float(ref.scores_[0].mean(axis=0).max()) if isinstance(ref.scores_, dict) else float("nan")
        print(
            f"| {n} | {ours_s:.1f} | {ours['C']:.3g}, {ours['accuracy']:.3f} | {ref_s:.1f} | "
            f"{float(np.atleast_1d(ref.C_)[0]):.3g}, {ref_acc:.3f} | {ref_s / ours_s:.2f} |",
            flush=True,
        )


if __name__ == "__main__":
    main()
