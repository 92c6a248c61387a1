"""The numpy fits against independent references: scikit-learn's LogisticRegression (same
objective, same C), a naive loop for kNN, and what cross-validation must say on separable and
on shuffled labels. Random vectors and real ones (the digits' pixels)."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest
from sklearn.linear_model import LogisticRegression

from service.classifiers.fit import (
    cross_validate_knn,
    cross_validate_logreg,
    fit_knn,
    fit_logreg,
    stratified_folds,
    unit_rows,
)


def blobs(seed: int, n: int, d: int, k: int, spread: float) -> tuple[np.ndarray, np.ndarray]:
    """k Gaussian clusters on the sphere: unit float64 [n, d], labels int [n]."""
    rng = np.random.default_rng(seed)
    y = rng.permutation(np.arange(n) % k)
    centres = rng.normal(size=(k, d))
    return unit_rows(centres[y] + spread * rng.normal(size=(n, d))), y


@pytest.fixture(scope="module")
def digits(digits_path: Path) -> tuple[np.ndarray, np.ndarray]:
    """300 real digit scans as 64-d pixel vectors (unit rows) and their labels."""
    with np.load(digits_path) as data:
        x, y = data["x_train"][:300], data["y_train"][:300]
    return unit_rows(x.reshape(len(x), -1).astype(np.float64)), y.astype(np.int64)


def assert_matches_sklearn(x: np.ndarray, y: np.ndarray, C: float) -> None:
    k = int(y.max()) + 1
    ours = fit_logreg(x, y, k, C, tol=1e-10, max_iter=20000)
    ref = LogisticRegression(C=C, tol=1e-12, max_iter=100000).fit(x, y)
    scale = max(1.0, np.abs(ref.coef_).max())
    np.testing.assert_allclose(ours.weights.T, ref.coef_, atol=2e-5 * scale, rtol=0)
    # The intercept is defined up to a shift common to all classes (softmax): compare centred.
    np.testing.assert_allclose(ours.bias - ours.bias.mean(), ref.intercept_ - ref.intercept_.mean(), atol=2e-5 * scale)
    np.testing.assert_allclose(ours.predict_proba(x), ref.predict_proba(x), atol=1e-6, rtol=0)


@pytest.mark.parametrize("C", [0.05, 1.0, 30.0])
def test_logreg_matches_sklearn_on_random_vectors(C: float) -> None:
    x, y = blobs(0, 240, 16, 4, spread=1.5)
    assert_matches_sklearn(x, y, C)


@pytest.mark.parametrize("C", [0.3, 10.0])
def test_logreg_matches_sklearn_on_digits(digits: tuple[np.ndarray, np.ndarray], C: float) -> None:
    assert_matches_sklearn(*digits, C)


def test_warm_start_reaches_the_same_optimum() -> None:
    x, y = blobs(1, 200, 12, 3, spread=1.0)
    cold = fit_logreg(x, y, 3, 5.0, tol=1e-10)
    warm = fit_logreg(x, y, 3, 5.0, tol=1e-10, init=fit_logreg(x, y, 3, 0.1, tol=1e-10))
    np.testing.assert_allclose(warm.weights, cold.weights, atol=1e-6)


def test_knn_matches_a_naive_loop() -> None:
    x, y = blobs(2, 120, 8, 3, spread=2.0)
    queries = unit_rows(np.random.default_rng(3).normal(size=(15, 8)))
    knn = fit_knn(x, y, 3)
    expected = np.zeros((len(queries), 3))
    for i, q in enumerate(queries):
        sims = [float(q @ v) for v in x]
        nearest = sorted(range(len(x)), key=lambda j: -sims[j])[: knn.k]
        for j in nearest:
            expected[i, y[j]] += np.exp(sims[j] / knn.temperature)
        expected[i] /= expected[i].sum()
    np.testing.assert_allclose(knn.predict_proba(queries), expected, atol=1e-6)


def test_folds_are_stratified_and_balanced() -> None:
    y = np.repeat(np.arange(3), [10, 7, 13])
    folds = stratified_folds(y, 5)
    for c in range(3):  # each class spread as evenly as it can be
        per_fold = np.bincount(folds[y == c], minlength=5)
        assert per_fold.max() - per_fold.min() <= 1
    sizes = np.bincount(folds)
    assert sizes.max() - sizes.min() <= 1


@pytest.mark.parametrize("method", ["logreg", "knn"])
def test_cv_is_perfect_on_separable_data_and_chance_on_shuffled_labels(method: str) -> None:
    cv = cross_validate_logreg if method == "logreg" else cross_validate_knn
    x, y = blobs(4, 200, 32, 4, spread=0.05)
    separable = cv(x, y, 4)
    assert separable.accuracy == 1.0 and separable.std == 0.0
    assert np.trace(separable.confusion) == len(y)
    shuffled = cv(x, np.random.default_rng(5).permutation(y), 4)
    # Chance is 0.25; 200 out-of-fold guesses have a standard error of ~0.03.
    assert abs(shuffled.accuracy - 0.25) < 0.12, shuffled.accuracy
    assert np.sum(shuffled.confusion) == len(y)


def test_cv_on_digits_is_well_above_chance(digits: tuple[np.ndarray, np.ndarray]) -> None:
    """Real data: raw 8x8 pixels are linearly separable enough for ~0.9 (chance 0.1)."""
    cv = cross_validate_logreg(*digits, 10)
    assert cv.accuracy > 0.85 and cv.n_folds == 5 and cv.C is not None
    assert len(cv.fold_accuracies) == 5 and cv.std == pytest.approx(np.std(cv.fold_accuracies))
