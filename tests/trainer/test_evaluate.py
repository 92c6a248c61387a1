"""trainer.evaluate: kNN and linear probe against float64 references, embedding as ONNX does."""

from __future__ import annotations

import math
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image

from service.contract.encoder_io import PIXEL_MEAN, PIXEL_STD
from trainer.data import DatasetError, load_split
from trainer.evaluate import (
    embed_images,
    evaluate_encoder,
    fit_linear_probe,
    images_to_input,
    knn_top1,
    linear_probe_top1,
    raw_pixel_baseline,
    raw_pixel_features,
    variance_spectrum,
)
from trainer.models import Encoder


def _knn_reference(
    train: np.ndarray, train_y: np.ndarray, test: np.ndarray, test_y: np.ndarray, k: int, t: float
) -> float:
    """Plain float64 loop: per test image, sort cosine similarities, sum exp(sim/T) per class."""
    train = train.astype(np.float64) / np.linalg.norm(train.astype(np.float64), axis=1, keepdims=True)
    test = test.astype(np.float64) / np.linalg.norm(test.astype(np.float64), axis=1, keepdims=True)
    correct = 0
    for q, label in zip(test, test_y):
        sims = [float(np.dot(q, row)) for row in train]
        nearest = sorted(range(len(train)), key=lambda j: -sims[j])[:k]
        votes: dict[int, float] = {}
        for j in nearest:
            votes[int(train_y[j])] = votes.get(int(train_y[j]), 0.0) + math.exp(sims[j] / t)
        best = max(sorted(votes), key=lambda c: votes[c])  # ties: lowest class id, as argmax
        correct += best == label
    return correct / len(test)


@pytest.mark.parametrize(
    ("n", "d", "classes", "k", "t"), [(120, 16, 4, 10, 0.1), (60, 5, 3, 200, 0.5), (200, 32, 10, 1, 0.07)]
)
def test_knn_matches_float64_loop_on_random_data(n: int, d: int, classes: int, k: int, t: float) -> None:
    rng = np.random.default_rng(n)
    centres = rng.normal(size=(classes, d))
    train_y, test_y = rng.integers(0, classes, n), rng.integers(0, classes, 50)
    train = (centres[train_y] + rng.normal(scale=1.5, size=(n, d))).astype(np.float32)
    test = (centres[test_y] + rng.normal(scale=1.5, size=(50, d))).astype(np.float32)
    ours = knn_top1(train, train_y, test, test_y, k=k, temperature=t)
    assert ours == _knn_reference(train, train_y, test, test_y, k, t)
    assert 0.0 < ours < 1.0  # a case that exercises both right and wrong votes


def test_knn_matches_float64_loop_on_real_digits(digits_path: Path) -> None:
    x_train, y_train = load_split(digits_path, "train", 8)
    x_test, y_test = load_split(digits_path, "test", 8)
    train, test = raw_pixel_features(x_train), raw_pixel_features(x_test[:120])
    centre = train.mean(0)
    train, test = train - centre, test - centre
    ours = knn_top1(train, y_train, test, y_test[:120], k=200, temperature=0.1)
    assert ours == _knn_reference(train, y_train, test, y_test[:120], 200, 0.1)
    assert ours > 0.8


def _blobs(n: int, d: int, classes: int, seed: int) -> tuple[np.ndarray, np.ndarray]:
    rng = np.random.default_rng(seed)
    y = np.arange(n) % classes
    x = rng.normal(size=(classes, d))[y] * 6 + rng.normal(size=(n, d))
    return x.astype(np.float32), y


def test_linear_probe_separates_separable_data_and_not_random_labels() -> None:
    x, y = _blobs(300, 20, 3, seed=0)
    assert linear_probe_top1(x[:200], y[:200], x[200:], y[200:]) == 1.0
    rng = np.random.default_rng(1)
    noise = rng.normal(size=(600, 20)).astype(np.float32)
    labels = rng.integers(0, 4, 600)
    acc = linear_probe_top1(noise[:400], labels[:400], noise[400:], labels[400:])
    assert abs(acc - 0.25) <= 5 * math.sqrt(0.25 * 0.75 / 200)  # chance, within 5 sigma
    again = linear_probe_top1(noise[:400], labels[:400], noise[400:], labels[400:])
    assert acc == again


def test_linear_probe_reaches_the_regularised_optimum() -> None:
    """At the optimum the float64 gradient of mean CE + wd/2 ||W||^2, written in numpy, vanishes."""
    rng = np.random.default_rng(2)
    x = rng.normal(size=(150, 8))
    y = rng.integers(0, 3, 150)
    wd = 1e-2
    probe = fit_linear_probe(x, y, 3, weight_decay=wd)
    z = (x - x.mean(0)) / x.std(0, ddof=1)
    np.testing.assert_allclose(probe.mean.numpy(), x.mean(0), rtol=1e-12)
    w, b = probe.weight.numpy(), probe.bias.numpy()
    logits = z @ w + b
    p = np.exp(logits - logits.max(1, keepdims=True))
    p /= p.sum(1, keepdims=True)
    p[np.arange(150), y] -= 1.0
    grad_w = z.T @ p / 150 + wd * w
    grad_b = p.sum(0) / 150
    assert np.abs(grad_w).max() < 1e-6 and np.abs(grad_b).max() < 1e-6
    assert np.abs(w).max() > 0.1  # not the trivial zero solution


def _tiny_encoder() -> Encoder:
    torch.manual_seed(0)
    return Encoder("resnet18", small_stem=True)


def test_images_to_input_is_the_onnx_preprocessing() -> None:
    images = np.random.default_rng(3).integers(0, 256, (2, 5, 5, 3), dtype=np.uint8)
    expected = (images.astype(np.float64) / 255 - np.array(PIXEL_MEAN)) / np.array(PIXEL_STD)  # NHWC
    got = images_to_input(torch.from_numpy(images)).numpy()
    np.testing.assert_allclose(got, expected.transpose(0, 3, 1, 2), atol=1e-6)


def test_embed_images_unit_norm_batch_invariant_and_restores_mode() -> None:
    encoder = _tiny_encoder()
    images = np.random.default_rng(4).integers(0, 256, (10, 16, 16, 3), dtype=np.uint8)
    encoder.train()
    h = embed_images(encoder, images, batch_size=3)
    assert encoder.training  # left as it was
    assert h.shape == (10, 512) and h.dtype == np.float32
    np.testing.assert_allclose(np.linalg.norm(h, axis=1), 1.0, atol=1e-5)
    np.testing.assert_allclose(h, embed_images(encoder, images, batch_size=256), atol=1e-5)
    with torch.no_grad():
        raw = encoder.eval()(images_to_input(torch.from_numpy(images))).double()
    np.testing.assert_allclose(h, (raw / raw.norm(dim=1, keepdim=True)).numpy(), atol=1e-5)


def _colour_split(root: Path, only_in: dict[str, str] | None = None) -> None:
    """train/ and test/ with classes 'dark' and 'light', plus classes present in one split only."""
    rng = np.random.default_rng(5)
    only_in = only_in or {}
    classes = {"dark": 40, "light": 200} | dict.fromkeys(only_in, 120)
    for split, n in (("train", 6), ("test", 3)):
        for name, level in classes.items():
            if only_in.get(name, split) != split:
                continue
            for i in range(n):
                arr = np.clip(level + rng.normal(scale=10, size=(12, 12, 3)), 0, 255).astype(np.uint8)
                path = root / split / name / f"{i}.png"
                path.parent.mkdir(parents=True, exist_ok=True)
                Image.fromarray(arr).save(path)


def test_evaluate_encoder_on_a_folder_split(tmp_path: Path) -> None:
    _colour_split(tmp_path)
    result = evaluate_encoder(_tiny_encoder(), tmp_path, 16, k=3)
    assert result["n_train"] == 12 and result["n_test"] == 6
    assert result["knn_top1"] == 1.0 and result["linear_top1"] == 1.0  # dark vs light: trivial
    baseline = raw_pixel_baseline(*load_split(tmp_path, "train", 16), *load_split(tmp_path, "test", 16), k=3)
    assert baseline == {"knn_top1": 1.0, "linear_top1": 1.0}
    # A class only in train ("aaa" sorts first): test labels are realigned by name.
    _colour_split(tmp_path / "more", only_in={"aaa": "train"})
    result = evaluate_encoder(_tiny_encoder(), tmp_path / "more", 16, k=3)
    assert (result["n_train"], result["knn_top1"], result["linear_top1"]) == (18, 1.0, 1.0)
    _colour_split(tmp_path / "odd", only_in={"mid": "test"})
    with pytest.raises(DatasetError) as err:
        evaluate_encoder(_tiny_encoder(), tmp_path / "odd", 16)
    assert err.value.code == "class_mismatch"
    with pytest.raises(DatasetError) as err:
        evaluate_encoder(_tiny_encoder(), tmp_path / "train" / "dark", 16)
    assert err.value.code == "unlabeled_dataset"


def _spectrum_by_loops(x: np.ndarray) -> tuple[float, float]:
    """float64 reference: the covariance summed pair by pair, its eigenvalues, the entropy by a loop."""
    n, d = x.shape
    mean = [sum(x[i, j] for i in range(n)) / n for j in range(d)]
    cov = np.zeros((d, d))
    for i in range(n):
        for a in range(d):
            for b in range(d):
                cov[a, b] += (x[i, a] - mean[a]) * (x[i, b] - mean[b]) / (n - 1)
    eigenvalues = sorted(np.linalg.eigvalsh(cov), reverse=True)
    total = sum(eigenvalues)
    entropy = -sum(e / total * math.log(e / total) for e in eigenvalues if e / total > 1e-15)
    return eigenvalues[0] / total, math.exp(entropy)


@pytest.mark.parametrize("seed", [0, 1])
def test_variance_spectrum_matches_a_loop_on_random_features(seed: int) -> None:
    rng = np.random.default_rng(seed)
    x = rng.normal(size=(40, 6)) * np.array([3.0, 2.0, 1.0, 0.5, 0.2, 0.1]) + rng.normal(size=6)
    first, rank = variance_spectrum(x.astype(np.float32))
    ref_first, ref_rank = _spectrum_by_loops(x.astype(np.float32).astype(np.float64))
    assert first == pytest.approx(ref_first, rel=1e-9)
    assert rank == pytest.approx(ref_rank, rel=1e-9)
    assert 1.0 < rank < 6.0


def test_variance_spectrum_of_real_embeddings_and_of_the_two_extremes(digits_path: Path) -> None:
    x, _ = load_split(digits_path, "test", 16)
    torch.manual_seed(0)
    h = np.asarray(embed_images(Encoder("resnet18"), x[:60]))  # [60, 512], rank <= 59 after centring
    first, rank = variance_spectrum(h)
    ref_first, ref_rank = _spectrum_by_loops(h[:, :24].astype(np.float64))  # the loop is O(N D^2)
    assert variance_spectrum(h[:, :24]) == pytest.approx((ref_first, ref_rank), rel=1e-6)
    assert 0.0 < first < 1.0 and 1.0 < rank < 59.0
    line = np.outer(np.arange(10.0), [1.0, -2.0, 0.5])  # every point on one direction
    assert variance_spectrum(line) == pytest.approx((1.0, 1.0))
    iso = np.concatenate([np.eye(4), -np.eye(4)])  # equal variance on 4 orthogonal directions
    assert variance_spectrum(iso) == pytest.approx((0.25, 4.0))
