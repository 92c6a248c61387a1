"""Real images that installed packages ship, for the suite's fixtures (tests/conftest.py).

A user's fresh clone has no ../shared, so the suite's data comes from scikit-learn (a
dependency of the training extra): its bundled handwritten digits, laid out exactly as
../shared/data/digits.npz was made (tests/test_fixtures.py checks the equality where
../shared is present), and 32x32 patches cut from its two sample colour photographs. Only
benchmarks at CIFAR-10 scale read ../shared/data (bench/).
"""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest

SHARED_DATA = Path(__file__).resolve().parents[2] / "shared" / "data"  # ../shared/data beside the repo
PATCH = 32  # photo patch side, the CIFAR-10 size the tests were written for
PHOTO_TRAIN = 384  # patches in photos.npz's train split; the rest are its test split


def shared_npz(name: str) -> Path:
    """Path of a file in ../shared/data, or skip: a user's fresh clone has no ../shared (CI has it)."""
    path = SHARED_DATA / name
    if not path.is_file():
        pytest.skip(f"{path} not present: ../shared/data ships only with the project's CI and dev machines")
    return path


def bundled_digits() -> dict[str, np.ndarray]:
    """scikit-learn's 1,797 digits as ../shared/data/digits.npz holds them (its README): pixels
    0..16 times 16, clipped to 0..255, uint8 [N, 8, 8, 1]; stratified 80/20 split with seed 0."""
    from sklearn.datasets import load_digits
    from sklearn.model_selection import train_test_split

    digits = load_digits()
    images = np.clip(digits.images * 16, 0, 255).astype(np.uint8)[..., None]  # [1797, 8, 8, 1]
    labels = digits.target.astype(np.int64)
    x_train, x_test, y_train, y_test = train_test_split(images, labels, test_size=0.2, stratify=labels, random_state=0)
    classes = np.array([str(i) for i in range(10)])
    return {"x_train": x_train, "y_train": y_train, "x_test": x_test, "y_test": y_test, "classes": classes}


def photo_patches() -> tuple[np.ndarray, np.ndarray]:
    """Real colour photos: scikit-learn's two 427x640 sample photographs (china.jpg, flower.jpg)
    cut into non-overlapping 32x32 patches, near-flat ones (pixel std <= 10, e.g. clear sky)
    dropped, in a fixed shuffled order. Returns (uint8 [456, 32, 32, 3], source photo int64 [456])."""
    from sklearn.datasets import load_sample_images

    patches, sources = [], []
    for source, photo in enumerate(load_sample_images().images):  # [427, 640, 3] each
        rows, cols = photo.shape[0] // PATCH, photo.shape[1] // PATCH
        grid = photo[: rows * PATCH, : cols * PATCH].reshape(rows, PATCH, cols, PATCH, 3).swapaxes(1, 2)
        tiles = grid.reshape(-1, PATCH, PATCH, 3)  # [rows * cols, 32, 32, 3]
        keep = tiles.reshape(len(tiles), -1).std(axis=1) > 10
        patches.append(tiles[keep])
        sources.append(np.full(int(keep.sum()), source, np.int64))
    images, labels = np.concatenate(patches), np.concatenate(sources)
    order = np.random.default_rng(0).permutation(len(images))
    return np.ascontiguousarray(images[order]), labels[order]
