"""Representation quality of a short CPU SimCLR run, against the two baselines it must beat.

For each labeled `.npz` of the ../shared/data layout (x_train, y_train, x_test, y_test):
pretrain SimCLR on x_train (labels unused) with trainer.engine.train, then report kNN top-1
(cosine, k=200, T=0.1) and linear-probe top-1 of the frozen, L2-normalised h on x_test for

    raw pixels      no learning at all (centred pixel vectors)
    random init     the same encoder before training (same seed)
    SimCLR          the encoder after training

plus the loss of the first and the last logged window, all in one run. The settings come
from the data (`recipe_for`, service/contract/recipes.py: small grayscale images vs natural
colour ones); any flag given overrides them. With `--against-lightly`, lightly's SimCLR (bench/lightly_simclr.py) is
pretrained at the same data, settings, epochs and batch, and scored the same way.

    .venv/bin/python bench/knn_quality.py                        # digits.npz, cifar10-5k.npz
    .venv/bin/python bench/knn_quality.py --against-lightly      # and lightly's SimCLR beside ours
    .venv/bin/python bench/knn_quality.py --data my.npz --epochs 20 --image-size 64
"""

from __future__ import annotations

import argparse
import json
import sys
import tempfile
import time
from pathlib import Path

import numpy as np
import torch
from torch import nn

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))
sys.path.insert(0, str(REPO / "bench"))

from service.contract.recipes import Recipe, recipe_for_images
from service.contract.train_config import TrainConfig
from trainer.checkpoint import load_encoder, read_metrics
from trainer.engine import train
from trainer.evaluate import (
    embed_images,
    knn_top1,
    labeled_splits,
    linear_probe_top1,
    raw_pixel_baseline,
    variance_spectrum,
)
from trainer.models import Encoder

SHARED = REPO.parent / "shared" / "data"
DEFAULT_DATA = [SHARED / "digits.npz", SHARED / "cifar10-5k.npz"]


def recipe_for(path: Path) -> Recipe:
    """The recipe (service/contract/recipes.py) for the images of an `.npz`: small grayscale
    images (side < 16: digits' 8x8 strokes) or natural colour ones."""
    with np.load(path) as npz:
        x = npz["x_train"]  # [N, H, W, C]
    grayscale = x.shape[3] == 1 or bool((x[..., 0] == x[..., 1]).all() and (x[..., 1] == x[..., 2]).all())
    return recipe_for_images(max(x.shape[1:3]), grayscale)


def given_flags(args: argparse.Namespace, *flags: str) -> dict[str, object]:
    """{flag: value} of the `flags` given on the command line (the others are None: the recipe's)."""
    return {flag: getattr(args, flag) for flag in flags if getattr(args, flag) is not None}


def quality_config(args: argparse.Namespace, recipe: Recipe, num_images: int) -> TrainConfig:
    """A CPU-sized SimCLR run on `num_images` images: `recipe`, overridden by any flag given, the
    rest decided as the engine decides it for the run (service/contract/defaults.py)."""
    return recipe.config(
        small_stem=args.small_stem, optimizer=args.optimizer, weight_decay=args.weight_decay,
        temperature=args.temperature, seed=args.seed, **given_flags(args, "image_size", "epochs", "batch_size", "base_lr"),
        augment=given_flags(args, "color_strength", "crop_min_scale", "hflip_prob", "grayscale_prob"),
    ).resolved(num_images=num_images)  # fmt: skip


def probe(
    encoder: nn.Module, x_train: np.ndarray, y_train: np.ndarray, x_test: np.ndarray, y_test: np.ndarray, k: int = 200
) -> dict[str, float]:
    """kNN and linear-probe top-1 of the encoder's frozen, L2-normalised h on the test split, and
    the shape of h on the train split (`variance_spectrum`)."""
    train_h, test_h = embed_images(encoder, x_train), embed_images(encoder, x_test)  # [N, D], [M, D]
    first_share, effective_rank = variance_spectrum(train_h)
    return {
        "knn_top1": knn_top1(train_h, y_train, test_h, y_test, k=k),
        "linear_top1": linear_probe_top1(train_h, y_train, test_h, y_test),
        "first_direction_share": round(first_share, 4),
        "effective_rank": round(effective_rank, 1),
    }


def run_one(path: Path, args: argparse.Namespace, work: Path) -> dict[str, object]:
    with np.load(path) as npz:
        num_images = len(npz["x_train"])
    cfg = quality_config(args, recipe_for(path), num_images)
    x_train, y_train, x_test, y_test = labeled_splits(path, cfg.image_size)  # uint8 [N, S, S, 3], int64 [N]
    out: dict[str, object] = {
        "data": str(path),
        "n_train": len(x_train),
        "n_test": len(x_test),
        "config": cfg.model_dump(mode="json"),
    }

    started = time.perf_counter()
    out["raw_pixels"] = raw_pixel_baseline(x_train, y_train, x_test, y_test, k=args.k)
    print(
        f"{path.name}: raw pixels {out['raw_pixels']} ({time.perf_counter() - started:.0f} s)",
        file=sys.stderr,
        flush=True,
    )
    torch.manual_seed(args.seed)
    random_encoder = Encoder(cfg.backbone, bool(cfg.small_stem))
    out["random_init"] = probe(random_encoder, x_train, y_train, x_test, y_test, args.k)
    out["baselines_s"] = round(time.perf_counter() - started, 1)

    run_dir = work / path.stem
    result = train(cfg, path, run_dir, resume=False)
    losses = [r["loss"] for r in read_metrics(run_dir) if "loss" in r]
    out["train"] = {
        "steps": result.step,
        "wall_s": round(result.wall_s, 1),
        "images_per_s": round(result.images_per_s, 1),
        "loss_first_window": losses[0],
        "loss_last_window": losses[-1],
    }
    encoder, _, _ = load_encoder(run_dir)
    out["simclr"] = probe(encoder, x_train, y_train, x_test, y_test, args.k)
    print(f"{path.name}: ours {out['train']} {out['simclr']}", file=sys.stderr, flush=True)

    if args.against_lightly:
        from lightly_simclr import train_lightly  # needs the bench extra

        lightly_encoder, out["lightly_train"] = train_lightly(cfg, x_train)
        out["lightly"] = probe(lightly_encoder, x_train, y_train, x_test, y_test, args.k)
    return out


FEATURES = (
    ("raw_pixels", "raw pixels"),
    ("random_init", "random-init ResNet-18"),
    ("simclr", "SimCLR ResNet-18"),
    ("lightly", "lightly SimCLR ResNet-18"),
)


def table(results: list[dict[str, object]]) -> str:
    """Markdown: accuracy of every feature set, then the two trainings side by side."""
    rows = ["| data | features | kNN top-1 | linear top-1 |", "|---|---|---:|---:|"]
    for r in results:
        name = Path(str(r["data"])).name
        for key, label in FEATURES:
            if key in r:
                m = r[key]
                rows.append(f"| {name} | {label} | {100 * m['knn_top1']:.1f}% | {100 * m['linear_top1']:.1f}% |")
    rows += [
        "",
        "| data | training | steps | train s | images/s | loss first -> last window |",
        "|---|---|---:|---:|---:|---|",
    ]
    for r in results:
        name = Path(str(r["data"])).name
        for key, label in (("train", "trainer.engine"), ("lightly_train", "lightly")):
            if key in r:
                t = r[key]
                rows.append(
                    f"| {name} | {label} | {t['steps']} | {t['wall_s']:.0f} | {t['images_per_s']:.1f} | "
                    f"{t['loss_first_window']:.3f} -> {t['loss_last_window']:.3f} |"
                )
    return "\n".join(rows)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--data", type=Path, nargs="+", default=[p for p in DEFAULT_DATA if p.is_file()])
    recipe = "default: from the data (see recipe_for)"
    parser.add_argument("--image-size", type=int, default=None, help=recipe)
    parser.add_argument(
        "--small-stem",
        action=argparse.BooleanOptionalAction,
        default=False,
        help="3x3 stride-1 stem (16x the compute of the standard stem at 32 px)",
    )
    parser.add_argument("--epochs", type=int, default=None, help=recipe)
    parser.add_argument("--batch-size", type=int, default=None, help=recipe)
    parser.add_argument("--optimizer", default=None, choices=["lars", "sgd", "adamw"], help="default: the run's")
    parser.add_argument("--base-lr", type=float, default=None, help=recipe)
    parser.add_argument("--weight-decay", type=float, default=None, help="default: the run's")
    parser.add_argument("--temperature", type=float, default=None, help="default: the run's")
    parser.add_argument("--crop-min-scale", type=float, default=None, help=recipe)
    parser.add_argument("--hflip-prob", type=float, default=None, help=recipe)
    parser.add_argument("--grayscale-prob", type=float, default=None, help=recipe)
    parser.add_argument("--color-strength", type=float, default=None, help="default: the run's")
    parser.add_argument("--k", type=int, default=200)
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--threads", type=int, default=1)
    parser.add_argument(
        "--against-lightly",
        action="store_true",
        help="also pretrain lightly's SimCLR at the same settings (bench/lightly_simclr.py) and score it",
    )
    parser.add_argument("--json", type=Path, help="also write the results here")
    args = parser.parse_args()
    torch.set_num_threads(args.threads)
    results = []
    with tempfile.TemporaryDirectory() as work:
        for path in args.data:
            results.append(run_one(path, args, Path(work)))
            print(json.dumps({k: v for k, v in results[-1].items() if k != "config"}), flush=True)
    print(table(results))
    if args.json:
        args.json.write_text(json.dumps(results, indent=2))


if __name__ == "__main__":
    main()
