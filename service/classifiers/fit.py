"""Classifiers on frozen embeddings, in numpy (the API image has no scikit-learn).

* Multinomial logistic regression with an L2 penalty on unit-norm embeddings, its strength
  chosen by stratified k-fold cross-validation over log-spaced values: the linear transfer
  protocol of SimCLR (Chen et al. 2020, appendix B.8, after Kornblith et al. 2019). The
  objective is scikit-learn's parameterisation, so the two are comparable:

      minimise  0.5 * ||W||_F^2 + C * sum_i -log softmax(x_i W + b)[y_i]

  with W float64 [D, K] and the intercept b [K] unpenalised. It is strictly convex in W, so
  L-BFGS (Nocedal & Wright, algorithm 7.4) with an Armijo line search finds the unique optimum.
  We minimise the same objective divided by C*n (mean loss + ||W||^2 / (2 C n)), whose gradient
  scale does not depend on n or C, so one tolerance serves every fit.
* kNN: cosine similarity to the labeled vectors, the k nearest vote with weights exp(s / T)
  (Wu et al. 2018, the monitor the trainer uses too); probabilities are the normalised votes.

Shapes: x float [N, D] (rows L2-normalised here), y int [N] in 0..K-1.
"""

from __future__ import annotations

from dataclasses import dataclass, field

import numpy as np

# The paper's grid spans 1e-6..1e5 in 45 steps; on unit-norm embeddings every C below 1e-2 (or,
# here, a penalty that flattens W to ~0) answers the class prior, so we keep its resolution
# (4 values a decade) over the range where the choice matters.
C_GRID = tuple(float(c) for c in np.logspace(-2, 5, 29))
KNN_K, KNN_TEMPERATURE = 20, 0.07
MAX_FOLDS = 5


def unit_rows(x: np.ndarray) -> np.ndarray:
    """float64 [N, D] with every non-zero row scaled to length 1."""
    x = np.asarray(x, dtype=np.float64)
    norms = np.linalg.norm(x, axis=1, keepdims=True)
    return x / np.where(norms > 0, norms, 1.0)


def softmax(z: np.ndarray) -> np.ndarray:
    z = z - z.max(axis=1, keepdims=True)
    e = np.exp(z)
    return e / e.sum(axis=1, keepdims=True)


# -- logistic regression ------------------------------------------------------------------


@dataclass(frozen=True)
class LogReg:
    """A fitted multinomial logistic regression: probabilities = softmax(x W + b)."""

    weights: np.ndarray  # float64 [D, K]
    bias: np.ndarray  # float64 [K]
    C: float
    iterations: int

    def predict_proba(self, x: np.ndarray) -> np.ndarray:
        """float [M, D] -> float64 [M, K] (rows normalised first)."""
        return softmax(unit_rows(x) @ self.weights + self.bias)


def _objective(theta: np.ndarray, x: np.ndarray, onehot: np.ndarray, lam: float) -> tuple[float, np.ndarray]:
    """Mean cross-entropy + lam/2 ||W||^2 and its gradient; theta = [W.ravel(), b]."""
    n, d = x.shape
    k = onehot.shape[1]
    w, b = theta[: d * k].reshape(d, k), theta[d * k :]
    z = x @ w + b  # [N, K]
    z_max = z.max(axis=1, keepdims=True)
    log_norm = z_max[:, 0] + np.log(np.exp(z - z_max).sum(axis=1))  # [N]
    loss = float(np.mean(log_norm - (z * onehot).sum(axis=1)) + 0.5 * lam * np.sum(w * w))
    residual = (np.exp(z - log_norm[:, None]) - onehot) / n  # [N, K]
    grad = np.concatenate([(x.T @ residual + lam * w).ravel(), residual.sum(axis=0)])
    return loss, grad


def fit_logreg(
    x: np.ndarray,
    y: np.ndarray,
    n_classes: int,
    C: float,
    *,
    tol: float = 1e-6,
    max_iter: int = 1000,
    memory: int = 10,
    init: LogReg | None = None,
) -> LogReg:
    """L-BFGS on the objective above; stops when the largest gradient entry is below `tol`.

    `init` warm-starts from another fit (the CV grid walks C upwards from one solution to the next)."""
    x = unit_rows(x)
    n, d = x.shape
    onehot = np.zeros((n, n_classes))
    onehot[np.arange(n), y] = 1.0
    lam = 1.0 / (C * n)
    theta = (
        np.concatenate([init.weights.ravel(), init.bias]) if init is not None else np.zeros(d * n_classes + n_classes)
    )
    loss, grad = _objective(theta, x, onehot, lam)
    steps: list[np.ndarray] = []
    changes: list[np.ndarray] = []
    iteration = 0
    for iteration in range(1, max_iter + 1):  # noqa: B007 (the count is reported)
        if np.max(np.abs(grad)) < tol:
            break
        # Two-loop recursion: direction = -H grad with H the L-BFGS inverse Hessian estimate.
        q = grad.copy()
        alphas = []
        for s, yv in zip(reversed(steps), reversed(changes), strict=True):
            a = (s @ q) / (yv @ s)
            alphas.append(a)
            q -= a * yv
        if steps:
            q *= (steps[-1] @ changes[-1]) / (changes[-1] @ changes[-1])
        else:
            q /= max(1.0, float(np.linalg.norm(q)))
        for s, yv, a in zip(steps, changes, reversed(alphas), strict=True):
            q += s * (a - (yv @ q) / (yv @ s))
        direction = -q
        slope = float(grad @ direction)
        if slope >= 0:  # not a descent direction (rounding): restart from steepest descent
            steps.clear()
            changes.clear()
            direction, slope = -grad, -float(grad @ grad)
        step = 1.0
        while True:  # Armijo backtracking
            candidate = theta + step * direction
            new_loss, new_grad = _objective(candidate, x, onehot, lam)
            if new_loss <= loss + 1e-4 * step * slope or step < 1e-12:
                break
            step *= 0.5
        s, yv = candidate - theta, new_grad - grad
        if s @ yv > 1e-12 * (yv @ yv):  # keep the estimate positive definite
            steps.append(s)
            changes.append(yv)
            if len(steps) > memory:
                steps.pop(0)
                changes.pop(0)
        converged = abs(loss - new_loss) <= 1e-15 * max(1.0, abs(loss))
        theta, loss, grad = candidate, new_loss, new_grad
        if converged:
            break
    w = theta[: d * n_classes].reshape(d, n_classes)
    return LogReg(weights=w.copy(), bias=theta[d * n_classes :].copy(), C=C, iterations=iteration)


# -- kNN ----------------------------------------------------------------------------------


@dataclass(frozen=True)
class Knn:
    """Cosine kNN over the labeled vectors with exp(s / T) weighted votes."""

    vectors: np.ndarray  # float32 [N, D], unit rows
    labels: np.ndarray  # int64 [N]
    n_classes: int
    k: int = KNN_K
    temperature: float = KNN_TEMPERATURE

    def predict_proba(self, x: np.ndarray) -> np.ndarray:
        """float [M, D] -> float64 [M, K]: each row the normalised weighted votes of the k nearest."""
        sims = unit_rows(x) @ self.vectors.astype(np.float64).T  # [M, N]
        k = min(self.k, sims.shape[1])
        nearest = np.argpartition(-sims, k - 1, axis=1)[:, :k]  # [M, k]
        top = np.take_along_axis(sims, nearest, axis=1)
        weights = np.exp((top - top.max(axis=1, keepdims=True)) / self.temperature)  # [M, k], stable
        votes = np.zeros((len(sims), self.n_classes))
        np.add.at(votes, (np.arange(len(sims))[:, None], self.labels[nearest]), weights)
        return votes / votes.sum(axis=1, keepdims=True)


def fit_knn(x: np.ndarray, y: np.ndarray, n_classes: int) -> Knn:
    return Knn(unit_rows(x).astype(np.float32), np.asarray(y, dtype=np.int64), n_classes)


# -- cross-validation ---------------------------------------------------------------------


def stratified_folds(y: np.ndarray, n_folds: int, seed: int = 0) -> np.ndarray:
    """Fold index int [N] per example: each class dealt round-robin over the folds after a shuffle."""
    rng = np.random.default_rng(seed)
    folds = np.empty(len(y), dtype=np.int64)
    offset = 0
    for c in np.unique(y):
        members = rng.permutation(np.flatnonzero(y == c))
        folds[members] = (np.arange(len(members)) + offset) % n_folds
        offset += len(members)  # the next class starts where this one ended: folds stay balanced in size
    return folds


@dataclass
class CrossValidation:
    """Out-of-fold accuracy at the chosen setting (mean and spread over folds)."""

    accuracy: float
    std: float
    fold_accuracies: list[float]
    confusion: list[list[int]]  # [true class][predicted class], out-of-fold predictions
    n_folds: int
    C: float | None = None  # logreg: the chosen strength
    grid: list[tuple[float, float]] = field(default_factory=list)  # logreg: (C, mean accuracy)


def n_folds_for(y: np.ndarray) -> int:
    """As many folds as the rarest class allows (each fold holds out one of its examples), at most 5."""
    return int(min(MAX_FOLDS, np.bincount(y).min()))


def _summary(
    y: np.ndarray, folds: np.ndarray, predicted: np.ndarray, n_classes: int
) -> tuple[float, float, list[float], list[list[int]]]:
    accs = [float(np.mean(predicted[folds == f] == y[folds == f])) for f in range(int(folds.max()) + 1)]
    confusion = np.zeros((n_classes, n_classes), dtype=np.int64)
    np.add.at(confusion, (y, predicted), 1)
    return float(np.mean(accs)), float(np.std(accs)), accs, confusion.tolist()


def cross_validate_logreg(
    x: np.ndarray, y: np.ndarray, n_classes: int, grid: tuple[float, ...] = C_GRID, *, tol: float = 1e-5
) -> CrossValidation:
    """Stratified k-fold over `grid`; the C with the best mean accuracy.

    Ties (common with few labels: accuracy moves in steps of one example) go to the C with the
    lowest out-of-fold log-loss, so that the served probabilities are the best calibrated of the
    equally accurate fits, not the flattest (the most regularised)."""
    x = unit_rows(x)
    n_folds = n_folds_for(y)
    folds = stratified_folds(y, n_folds)
    predicted = np.zeros((len(grid), len(y)), dtype=np.int64)  # [G, N] out-of-fold predictions
    log_loss = np.zeros(len(grid))  # [G] out-of-fold mean -log p(true class)
    for f in range(n_folds):
        train, test = folds != f, folds == f
        previous: LogReg | None = None
        for g, C in enumerate(grid):  # ascending C: each fit warm-starts from the more regularised one
            previous = fit_logreg(x[train], y[train], n_classes, C, tol=tol, init=previous)
            proba = previous.predict_proba(x[test])  # [n_test, K]
            predicted[g, test] = proba.argmax(axis=1)
            log_loss[g] -= np.log(np.maximum(proba[np.arange(len(proba)), y[test]], 1e-300)).sum() / len(y)
    means = [float(np.mean([np.mean(p[folds == f] == y[folds == f]) for f in range(n_folds)])) for p in predicted]
    best = min(range(len(grid)), key=lambda g: (-means[g], log_loss[g]))
    accuracy, std, accs, confusion = _summary(y, folds, predicted[best], n_classes)
    return CrossValidation(
        accuracy, std, accs, confusion, n_folds, C=grid[best], grid=list(zip(grid, means, strict=True))
    )


def cross_validate_knn(x: np.ndarray, y: np.ndarray, n_classes: int) -> CrossValidation:
    x = unit_rows(x)
    n_folds = n_folds_for(y)
    folds = stratified_folds(y, n_folds)
    predicted = np.zeros(len(y), dtype=np.int64)
    for f in range(n_folds):
        train, test = folds != f, folds == f
        predicted[test] = fit_knn(x[train], y[train], n_classes).predict_proba(x[test]).argmax(axis=1)
    accuracy, std, accs, confusion = _summary(y, folds, predicted, n_classes)
    return CrossValidation(accuracy, std, accs, confusion, n_folds)
