"""Evaluation of a frozen representation h, the protocol of the SimCLR paper (Sec. 4, B.6).

* kNN (Wu et al. 2018, InstDisc; as solo-learn and lightly monitor training): cosine
  similarity of L2-normalised h, the k nearest training images vote for their class with
  weight exp(sim / T); k = 200, T = 0.1.
* Linear probe: multinomial logistic regression on frozen, standardised h, full-batch
  L-BFGS in float64 with a small L2 penalty; deterministic for given inputs.

Accuracies are fractions in [0, 1]. Images reach the encoder exactly as the exported ONNX
graph feeds it (uint8 NHWC -> /255 -> NCHW -> (x - PIXEL_MEAN) / PIXEL_STD), so the numbers
describe the served model.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F
from torch import nn

from trainer.data import DatasetError, ImageDataset, labeled_arrays, open_labeled
from trainer.models import normalize_pixels

ArrayLike = np.ndarray | torch.Tensor


def images_to_input(images: torch.Tensor) -> torch.Tensor:
    """uint8 [N, S, S, 3] -> normalised float32 [N, 3, S, S], as the ONNX graph does."""
    return normalize_pixels(images.float().div(255.0).permute(0, 3, 1, 2))  # [N, 3, S, S]


def embed_images(
    encoder: nn.Module, images: np.ndarray, batch_size: int = 256, device: str | torch.device | None = None
) -> np.ndarray:
    """uint8 [N, S, S, 3] -> L2-normalised h, float32 [N, D], with the encoder in eval mode."""
    device = torch.device(device) if device is not None else next(encoder.parameters()).device
    was_training = encoder.training
    encoder.eval()
    out = []
    try:
        with torch.inference_mode():
            for start in range(0, len(images), batch_size):
                chunk = torch.from_numpy(np.ascontiguousarray(images[start : start + batch_size])).to(device)
                h = encoder(images_to_input(chunk))  # [B, D]
                out.append(F.normalize(h.float(), dim=1).cpu())
    finally:
        encoder.train(was_training)
    return torch.cat(out).numpy()


def _as_tensor(a: ArrayLike, dtype: torch.dtype) -> torch.Tensor:
    return torch.as_tensor(np.asarray(a) if not isinstance(a, torch.Tensor) else a).to(dtype)


def knn_predict(
    train_feats: ArrayLike,
    train_labels: ArrayLike,
    test_feats: ArrayLike,
    k: int = 200,
    temperature: float = 0.1,
    num_classes: int | None = None,
    chunk: int = 512,
) -> torch.Tensor:
    """Weighted kNN class predictions [M] for test features [M, D] against train [N, D]."""
    train = F.normalize(_as_tensor(train_feats, torch.float32), dim=1)  # [N, D]
    test = F.normalize(_as_tensor(test_feats, torch.float32), dim=1)  # [M, D]
    labels = _as_tensor(train_labels, torch.long)  # [N]
    num_classes = num_classes or int(labels.max()) + 1
    k = min(k, len(train))
    preds = []
    for start in range(0, len(test), chunk):
        sim = test[start : start + chunk] @ train.T  # [B, N]
        top_sim, top_idx = sim.topk(k, dim=1)  # [B, k]
        weights = (top_sim / temperature).exp()
        votes = torch.zeros(len(sim), num_classes).scatter_add_(1, labels[top_idx], weights)  # [B, C]
        preds.append(votes.argmax(dim=1))
    return torch.cat(preds)


def knn_top1(
    train_feats: ArrayLike,
    train_labels: ArrayLike,
    test_feats: ArrayLike,
    test_labels: ArrayLike,
    k: int = 200,
    temperature: float = 0.1,
) -> float:
    """Top-1 accuracy of the cosine kNN classifier with exp(sim / T) weighted votes."""
    test_y = _as_tensor(test_labels, torch.long)
    num_classes = int(max(_as_tensor(train_labels, torch.long).max(), test_y.max())) + 1
    preds = knn_predict(train_feats, train_labels, test_feats, k, temperature, num_classes)
    return float((preds == test_y).double().mean())


@dataclass(frozen=True)
class LinearProbe:
    """A fitted probe: logits = ((x - mean) / std) @ weight + bias."""

    mean: torch.Tensor  # [D]
    std: torch.Tensor  # [D]
    weight: torch.Tensor  # [D, C]
    bias: torch.Tensor  # [C]

    def predict(self, feats: ArrayLike) -> torch.Tensor:
        x = (_as_tensor(feats, torch.float64) - self.mean) / self.std
        return (x @ self.weight + self.bias).argmax(1)


def fit_linear_probe(
    feats: ArrayLike, labels: ArrayLike, num_classes: int, weight_decay: float = 1e-4, max_iter: int = 100
) -> LinearProbe:
    """Multinomial logistic regression on standardised features, float64, full-batch L-BFGS.

    Minimises mean cross-entropy + weight_decay/2 * ||W||^2 (bias not penalised); the
    objective is strictly convex in W, so the result depends only on the data (and on
    `max_iter`: nearly separable features converge slowly, and 100 L-BFGS iterations settle
    the accuracy long before the weights stop growing).
    """
    x = _as_tensor(feats, torch.float64)  # [N, D]
    y = _as_tensor(labels, torch.long)
    mean, std = x.mean(0), x.std(0).clamp_min(1e-8)
    x = (x - mean) / std
    weight = torch.zeros(x.shape[1], num_classes, dtype=torch.float64, requires_grad=True)
    bias = torch.zeros(num_classes, dtype=torch.float64, requires_grad=True)
    opt = torch.optim.LBFGS(
        [weight, bias],
        lr=1.0,
        max_iter=max_iter,
        history_size=20,
        tolerance_grad=1e-7,
        tolerance_change=1e-12,
        line_search_fn="strong_wolfe",
    )

    def closure() -> torch.Tensor:
        opt.zero_grad()
        loss = F.cross_entropy(x @ weight + bias, y) + 0.5 * weight_decay * weight.pow(2).sum()
        loss.backward()
        return loss

    with torch.enable_grad():
        opt.step(closure)
    return LinearProbe(mean, std, weight.detach(), bias.detach())


def linear_probe_top1(
    train_feats: ArrayLike,
    train_labels: ArrayLike,
    test_feats: ArrayLike,
    test_labels: ArrayLike,
    weight_decay: float = 1e-4,
) -> float:
    """Top-1 accuracy on the test split of a linear probe fitted on the train split."""
    y, yt = _as_tensor(train_labels, torch.long), _as_tensor(test_labels, torch.long)
    num_classes = int(max(y.max(), yt.max())) + 1
    probe = fit_linear_probe(train_feats, y, num_classes, weight_decay)
    return float((probe.predict(test_feats) == yt).double().mean())


def variance_spectrum(features: ArrayLike) -> tuple[float, float]:
    """(share of the variance on the first principal direction, effective rank) of [N, D] features.

    Effective rank is exp of the entropy of the covariance's normalised eigenvalues (Roy &
    Vetterli 2007): D for isotropic features, 1 when one direction holds all the variance. A
    first direction that takes most of the variance is the dimensional collapse that a falling
    loss does not show, and that a cosine kNN suffers from most.
    """
    x = _as_tensor(features, torch.float64)
    x = x - x.mean(dim=0)  # [N, D]
    eigenvalues = torch.linalg.svdvals(x) ** 2  # [min(N, D)], descending: (N - 1) x the covariance's
    share = eigenvalues / eigenvalues.sum()
    share = share[share > 0]
    return float(share[0]), float(torch.exp(-(share * share.log()).sum()))


def raw_pixel_features(images: np.ndarray) -> np.ndarray:
    """uint8 [N, S, S, 3] -> float32 [N, S*S*3] in [0, 1]: the no-learning baseline's features."""
    return images.reshape(len(images), -1).astype(np.float32) / 255.0


def raw_pixel_baseline(
    train_images: np.ndarray,
    train_labels: np.ndarray,
    test_images: np.ndarray,
    test_labels: np.ndarray,
    k: int = 200,
    temperature: float = 0.1,
    linear: bool = True,
) -> dict[str, float]:
    """kNN (and, with `linear`, the linear probe) on raw pixels, centred by the training mean
    so that cosine compares deviations from the average image: what any learned h must beat."""
    train, test = raw_pixel_features(train_images), raw_pixel_features(test_images)
    centre = train.mean(axis=0, keepdims=True)
    train, test = train - centre, test - centre
    result = {"knn_top1": knn_top1(train, train_labels, test, test_labels, k, temperature)}
    if linear:
        result["linear_top1"] = linear_probe_top1(train, train_labels, test, test_labels)
    return result


Splits = tuple[np.ndarray, np.ndarray, np.ndarray, np.ndarray]  # x_train, y_train, x_test, y_test


def open_labeled_splits(data_path: str | Path, image_size: int) -> tuple[ImageDataset, ImageDataset]:
    """The train and test splits of a labeled dataset, opened (DatasetError when unlabeled)."""
    return open_labeled(data_path, "train", image_size), open_labeled(data_path, "test", image_size)


def split_arrays(train: ImageDataset, test: ImageDataset, data_path: str | Path) -> Splits:
    """(x_train, y_train, x_test, y_test) of the opened splits of `data_path`, test labels indexed as train's."""
    (x_train, y_train), (x_test, y_test) = labeled_arrays(train), labeled_arrays(test)
    if train.classes != test.classes:
        # Folders: a class missing from one split shifts indices; align test labels by name.
        unknown = sorted(set(test.classes) - set(train.classes))
        if unknown:
            raise DatasetError("class_mismatch", f"{data_path}: test classes {unknown[:5]} are absent from train")
        y_test = np.array([train.classes.index(c) for c in test.classes], dtype=np.int64)[y_test]
    return x_train, y_train, x_test, y_test


def labeled_splits(data_path: str | Path, image_size: int) -> Splits:
    """(x_train, y_train, x_test, y_test) of a labeled dataset, test labels indexed as train's.

    `data_path`: an `.npz` with x_train/x_test/y_train/y_test, or a folder with train/ and
    test/ each holding one subfolder per class. Raises DatasetError when it has no labels.
    """
    return split_arrays(*open_labeled_splits(data_path, image_size), data_path)


def evaluate_encoder(
    encoder: nn.Module,
    data_path: str | Path,
    image_size: int,
    *,
    batch_size: int = 256,
    device: str | torch.device | None = None,
    k: int = 200,
    temperature: float = 0.1,
) -> dict[str, float | int]:
    """kNN and linear-probe top-1 of frozen h on a labeled train/test split (see labeled_splits)."""
    x_train, y_train, x_test, y_test = labeled_splits(data_path, image_size)
    train_h = embed_images(encoder, x_train, batch_size, device)
    test_h = embed_images(encoder, x_test, batch_size, device)
    return {
        "knn_top1": knn_top1(train_h, y_train, test_h, y_test, k, temperature),
        "linear_top1": linear_probe_top1(train_h, y_train, test_h, y_test),
        "n_train": len(x_train),
        "n_test": len(x_test),
    }


class KnnMonitor:
    """kNN top-1 of h while a run trains: the labeled train split is the memory bank, the test
    split the queries (the monitor of InstDisc, solo-learn and lightly).

    Construction opens both splits (an `.npz` is read then; a folder's files are only listed)
    and checks their labels, so a run asked to monitor unlabeled data fails before its first
    step; the opened splits are decoded to arrays once, on the first call.
    """

    def __init__(self, data_path: str | Path, image_size: int, k: int = 200, temperature: float = 0.1) -> None:
        self.data_path, self.image_size, self.k, self.temperature = str(data_path), image_size, k, temperature
        self._opened: tuple[ImageDataset, ImageDataset] | None = open_labeled_splits(data_path, image_size)
        self._splits: Splits | None = None

    def __getstate__(self) -> dict[str, object]:
        # Spawned ranks reopen the data themselves, and only rank 0 does: nothing large travels.
        return {**self.__dict__, "_opened": None, "_splits": None}

    def __call__(self, encoder: nn.Module, device: str | torch.device | None = None) -> float:
        if self._splits is None:
            opened = self._opened or open_labeled_splits(self.data_path, self.image_size)
            self._splits = split_arrays(*opened, self.data_path)
            self._opened = None
        x_train, y_train, x_test, y_test = self._splits
        train_h, test_h = embed_images(encoder, x_train, device=device), embed_images(encoder, x_test, device=device)
        return knn_top1(train_h, y_train, test_h, y_test, self.k, self.temperature)
