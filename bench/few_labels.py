"""Label a few, classify all: SimCLR's semi-supervised claim on CIFAR-10, on a CPU budget.

Pretrain SimCLR (the data's recipe, service/contract/recipes.py) on the 5,000 unlabeled train
images of cifar10-5k.npz, then for 1% and 10% of those images' labels (class-balanced subsets,
three seeds) score on the 10,000 test JPEGs of cifar10-jpeg.tar.gz (unpacked to
/tmp/cifar10-jpeg):

    logreg, pretrained   service.classifiers.fit: multinomial L2 logistic regression on the frozen
                         unit-norm h, C by stratified CV (what POST /classifiers fits)
    kNN, pretrained      the same module's cosine kNN (k = 20, T = 0.07)
    fine-tuned           trainer.finetune: SimCLR v2's protocol from the run's checkpoint (f and
                         g's first layer, class-balanced batches, crop + flip, no weight decay,
                         Nesterov SGD, epochs scaled to the labels)
    from scratch         the same network, randomly initialised, trained by the same loop with
                         the same augmentation, sampling and number of optimiser steps
    logreg, random init  the logistic regression on h of the untrained encoder (same seed)
    logreg, raw pixels   the logistic regression on centred pixel vectors

    .venv/bin/python bench/few_labels.py --threads 1 --json /tmp/few_labels.json
    .venv/bin/python bench/few_labels.py --pretrain-epochs 2 --seeds 0 1 2 --fractions 0.01 0.1
"""

from __future__ import annotations

import argparse
import json
import sys
import tarfile
import tempfile
import time
from pathlib import Path

import numpy as np
import torch

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))

from service.classifiers.fit import cross_validate_logreg, fit_knn, fit_logreg, unit_rows
from service.contract.recipes import recipe_for_images
from trainer.checkpoint import load_encoder
from trainer.data import labeled_arrays, open_labeled
from trainer.engine import train
from trainer.evaluate import embed_images, raw_pixel_features
from trainer.finetune import build_classifier, finetune, predict_proba
from trainer.models import Encoder

SHARED = REPO.parent / "shared" / "data"
JPEG_ROOT = Path("/tmp/cifar10-jpeg")

METHODS = (
    ("logreg_pretrained", "logreg on SimCLR h"),
    ("knn_pretrained", "kNN on SimCLR h"),
    ("finetuned", "fine-tuned SimCLR (v2 protocol)"),
    ("scratch", "same network from scratch, same steps"),
    ("logreg_random", "logreg on random-init h"),
    ("logreg_pixels", "logreg on raw pixels"),
)


def jpeg_test_split(classes: list[str]) -> tuple[np.ndarray, np.ndarray]:
    """The 10,000 test JPEGs (unpacked once to /tmp/cifar10-jpeg), labels indexed as `classes`."""
    if not (JPEG_ROOT / "test").is_dir():
        with tarfile.open(SHARED / "cifar10-jpeg.tar.gz") as tar:
            tar.extractall(JPEG_ROOT.parent, filter="data")
        if not (JPEG_ROOT / "test").is_dir():
            raise SystemExit(f"expected {JPEG_ROOT}/test after unpacking cifar10-jpeg.tar.gz")
    data = open_labeled(JPEG_ROOT, "test", 32)
    images, labels = labeled_arrays(data)
    return images, np.array([classes.index(c) for c in data.classes], dtype=np.int64)[labels]


def balanced_subset(labels: np.ndarray, fraction: float, seed: int) -> np.ndarray:
    """Indices of `fraction` of the examples, the same number from every class."""
    rng = np.random.default_rng(seed)
    classes = np.unique(labels)
    per_class = max(2, round(fraction * len(labels) / len(classes)))
    return np.concatenate([rng.choice(np.flatnonzero(labels == c), per_class, replace=False) for c in classes])


def logreg_accuracy(
    train_x: np.ndarray, train_y: np.ndarray, test_x: np.ndarray, test_y: np.ndarray
) -> tuple[float, float]:
    """(test accuracy, chosen C) of the CV-tuned logistic regression, as POST /classifiers fits it."""
    cv = cross_validate_logreg(train_x, train_y, 10)
    assert cv.C is not None
    model = fit_logreg(train_x, train_y, 10, cv.C, tol=1e-9, max_iter=5000)
    return float(np.mean(model.predict_proba(test_x).argmax(1) == test_y)), cv.C


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--data", type=Path, default=SHARED / "cifar10-5k.npz")
    parser.add_argument("--pretrain-epochs", type=int, default=None, help="default: the recipe's")
    parser.add_argument("--fractions", type=float, nargs="+", default=[0.01, 0.1])
    parser.add_argument("--seeds", type=int, nargs="+", default=[0, 1, 2])
    parser.add_argument("--threads", type=int, default=1)
    parser.add_argument(
        "--test-limit", type=int, default=None, help="score on the first N test images only (smoke runs)"
    )
    parser.add_argument("--finetune-epochs", type=int, default=None, help="default: scaled to the labels (epochs_for)")
    parser.add_argument("--json", type=Path)
    args = parser.parse_args()
    torch.set_num_threads(args.threads)
    started = time.perf_counter()

    with np.load(args.data) as npz:
        x_train, y_train = npz["x_train"], npz["y_train"]
        classes = [str(c) for c in npz["classes"].tolist()]
    x_test, y_test = jpeg_test_split(classes)
    if args.test_limit:
        pick = np.random.default_rng(0).permutation(len(x_test))[: args.test_limit]
        x_test, y_test = x_test[pick], y_test[pick]
    log = lambda *a: print(f"[{time.perf_counter() - started:6.0f} s]", *a, file=sys.stderr, flush=True)
    log(f"train {x_train.shape}, test {x_test.shape}")

    recipe = recipe_for_images(32, False)
    cfg = recipe.config(**({"epochs": args.pretrain_epochs} if args.pretrain_epochs else {})).resolved()
    out: dict[str, object] = {"config": cfg.model_dump(mode="json"), "n_test": len(x_test), "runs": []}
    with tempfile.TemporaryDirectory() as work:
        run_dir = Path(work) / "pretrain"
        result = train(cfg, args.data, run_dir, resume=False)
        out["pretrain"] = {"steps": result.step, "wall_s": round(result.wall_s, 1)}
        log("pretrained", out["pretrain"])
        encoder, _, _ = load_encoder(run_dir)
        h_train, h_test = embed_images(encoder, x_train), embed_images(encoder, x_test)  # [N, D] unit rows
        torch.manual_seed(cfg.seed)
        random_encoder = Encoder(cfg.backbone, bool(cfg.small_stem))
        r_train, r_test = embed_images(random_encoder, x_train), embed_images(random_encoder, x_test)
        pixels_train, pixels_test = raw_pixel_features(x_train), raw_pixel_features(x_test)
        centre = pixels_train.mean(axis=0, keepdims=True)
        pixels_train, pixels_test = pixels_train - centre, pixels_test - centre
        for fraction in args.fractions:
            for seed in args.seeds:
                idx = balanced_subset(y_train, fraction, seed)
                y = y_train[idx]
                run: dict[str, object] = {"fraction": fraction, "seed": seed, "labels": len(idx)}
                run["logreg_pretrained"], run["C_pretrained"] = logreg_accuracy(h_train[idx], y, h_test, y_test)
                knn = fit_knn(h_train[idx], y, 10)
                run["knn_pretrained"] = float(np.mean(knn.predict_proba(h_test).argmax(1) == y_test))
                run["logreg_random"], _ = logreg_accuracy(r_train[idx], y, r_test, y_test)
                run["logreg_pixels"], _ = logreg_accuracy(
                    unit_rows(pixels_train[idx]), y, unit_rows(pixels_test), y_test
                )
                for key, pretrained in (("finetuned", True), ("scratch", False)):
                    model, _ = build_classifier(run_dir, 10, pretrained=pretrained)
                    t0 = time.perf_counter()
                    done = finetune(model, x_train[idx], y, cfg.image_size, epochs=args.finetune_epochs, seed=seed)
                    run[key] = float(np.mean(predict_proba(done.model, x_test).argmax(1) == y_test))
                    run[f"{key}_train"] = {
                        "steps": done.steps,
                        "epochs": done.epochs,
                        "batch": done.batch_size,
                        "lr": done.lr,
                        "wall_s": round(time.perf_counter() - t0, 1),
                        "loss_first": done.losses[0],
                        "loss_last": float(np.mean(done.losses[-5:])),
                    }
                log(json.dumps(run))
                out["runs"].append(run)  # type: ignore[attr-defined]
                if args.json:  # after every run: a long bench stopped early keeps what it measured
                    args.json.write_text(json.dumps(out, indent=2))
    out["wall_s"] = round(time.perf_counter() - started, 1)
    print(table(out))
    if args.json:
        args.json.write_text(json.dumps(out, indent=2))


def table(out: dict[str, object]) -> str:
    runs: list[dict[str, object]] = out["runs"]  # type: ignore[assignment]
    fractions = sorted({float(r["fraction"]) for r in runs})  # type: ignore[arg-type]
    head = "| method | " + " | ".join(f"{100 * f:g}% labels" for f in fractions) + " |"
    rows = [head, "|---|" + "---:|" * len(fractions)]
    for key, label in METHODS:
        cells = []
        for f in fractions:
            accs = np.array([float(r[key]) for r in runs if r["fraction"] == f])  # type: ignore[arg-type]
            cells.append(f"{100 * accs.mean():.1f} ± {100 * accs.std():.1f}")
        rows.append(f"| {label} | " + " | ".join(cells) + " |")
    return "\n".join(rows)


if __name__ == "__main__":
    main()
