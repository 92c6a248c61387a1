"""Synthetic embeddings for the index benches: isotropic unit vectors, or vectors drawn with the
mean and covariance of real embeddings (an .npz with `vectors` [N, D], e.g. what
bench/bulk_index_kill.py --save-embeddings writes) and normalised, which are as hard for ANN
indexes as the real ones (bench/ann_recall.py compares the two) and unlike a well-separated
mixture, whose neighbours IVF finds in one list."""

from __future__ import annotations

from collections.abc import Callable
from pathlib import Path

import numpy as np

Draw = Callable[[np.random.Generator, int], np.ndarray]  # (rng, n) -> float32 [n, D], unit rows


def unit_rows(x: np.ndarray) -> np.ndarray:
    return (x / np.linalg.norm(x, axis=1, keepdims=True)).astype(np.float32)


def isotropic(dim: int) -> Draw:
    return lambda rng, n: unit_rows(rng.standard_normal((n, dim), dtype=np.float32))


def gaussian_like(real: np.ndarray) -> Draw:
    """Draws from N(mean, cov) of `real` [N, D] (a singular covariance is fine: the factor
    comes from its eigen-decomposition), normalised as the service's vectors are."""
    real = real.astype(np.float64)
    mean = real.mean(axis=0)
    values, vecs = np.linalg.eigh(np.cov(real, rowvar=False))
    factor = (vecs * np.sqrt(np.clip(values, 0.0, None))).T.astype(np.float32)  # [D, D]: z @ factor ~ N(0, cov)
    mean32 = mean.astype(np.float32)
    return lambda rng, n: unit_rows(mean32 + rng.standard_normal((n, len(mean)), dtype=np.float32) @ factor)


def load_real(path: Path) -> np.ndarray:
    with np.load(path) as data:
        return unit_rows(data["vectors"].astype(np.float32))


def source(like: Path | None, dim: int) -> tuple[Draw, int, str]:
    """(draw, dimension, description) for --like FILE or isotropic vectors of `dim`."""
    if like is None:
        return isotropic(dim), dim, f"isotropic unit vectors, dim {dim}"
    real = load_real(like)
    return gaussian_like(real), real.shape[1], f"N(mean, cov) of the {len(real):,} embeddings in {like.name}"
