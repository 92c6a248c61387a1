"""Representation quality of a short CPU SimCLR run, against the two baselines it must beat.

For each labeled `.npz` of the ../shared/data layout (x_train, y_train, x_test, y_test):
pretrain SimCLR on x_train (labels unused) with trainer.engine.train, then report kNN top-1
(cosine, k=200, T=0.1) and linear-probe top-1 of the frozen, L2-normalised h on x_test for

    raw pixels      no learning at all (centred pixel vectors)
    random init     the same encoder before training (same seed)
    SimCLR          the encoder after training

plus the loss of the first and the last logged window, all in one run.

    .venv/bin/python bench/knn_quality.py                        # digits.npz, cifar10-5k.npz
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

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))

from service.contract.train_config import AugmentConfig, TrainConfig  # noqa: E402
from trainer.checkpoint import load_encoder  # noqa: E402
from trainer.data import load_split  # noqa: E402
from trainer.engine import train  # noqa: E402
from trainer.evaluate import embed_images, knn_top1, linear_probe_top1, raw_pixel_baseline  # noqa: E402
from trainer.models import Encoder  # noqa: E402

SHARED = REPO.parent / "shared" / "data"
DEFAULT_DATA = [SHARED / "digits.npz", SHARED / "cifar10-5k.npz"]


def native_size(path: Path) -> int:
    """The images' own side, raised to TrainConfig's minimum of 16 (digits are 8x8)."""
    with np.load(path) as npz:
        return max(16, *npz["x_train"].shape[1:3])


def quality_config(args: argparse.Namespace, image_size: int, grayscale: bool) -> TrainConfig:
    """A CPU-sized SimCLR run. Crops keep at least `crop_min_scale` of the image; colour
    strength 0.5 as the paper uses on CIFAR (Appendix B.9); grayscale sets get no hue or
    saturation to vary, so only brightness and contrast act."""
    return TrainConfig(
        method="simclr",
        backbone="resnet18",
        small_stem=args.small_stem,
        image_size=image_size,
        epochs=args.epochs,
        batch_size=args.batch_size,
        optimizer=args.optimizer,
        base_lr=args.base_lr,
        weight_decay=args.weight_decay,
        warmup_epochs=min(1.0, args.epochs / 10),
        temperature=args.temperature,
        num_workers=0,
        seed=args.seed,
        checkpoint_every_steps=10_000,
        log_every_steps=5,
        augment=AugmentConfig(
            crop_min_scale=args.crop_min_scale,
            hflip_prob=0.0 if grayscale else 0.5,  # digits are not mirror-symmetric
            color_strength=args.color_strength,
            grayscale_prob=0.0 if grayscale else 0.2,
            blur=False,
        ),
    )


def probe(train_h, y_train, test_h, y_test, k: int) -> dict[str, float]:
    return {
        "knn_top1": knn_top1(train_h, y_train, test_h, y_test, k=k),
        "linear_top1": linear_probe_top1(train_h, y_train, test_h, y_test),
    }


def run_one(path: Path, args: argparse.Namespace, work: Path) -> dict[str, object]:
    size = args.image_size or native_size(path)
    x_train, y_train = load_split(path, "train", size)
    x_test, y_test = load_split(path, "test", size)
    grayscale = bool((x_train[..., 0] == x_train[..., 1]).all() and (x_train[..., 1] == x_train[..., 2]).all())
    cfg = quality_config(args, size, grayscale)
    out: dict[str, object] = {"data": str(path), "n_train": len(x_train), "n_test": len(x_test), "config": cfg.model_dump(mode="json")}

    started = time.perf_counter()
    out["raw_pixels"] = raw_pixel_baseline(x_train, y_train, x_test, y_test, k=args.k)
    print(f"{path.name}: raw pixels {out['raw_pixels']} ({time.perf_counter() - started:.0f} s)", file=sys.stderr, flush=True)
    torch.manual_seed(args.seed)
    random_encoder = Encoder(cfg.backbone, bool(cfg.resolved().small_stem))
    out["random_init"] = probe(embed_images(random_encoder, x_train), y_train, embed_images(random_encoder, x_test), y_test, args.k)
    out["baselines_s"] = round(time.perf_counter() - started, 1)

    run_dir = work / path.stem
    result = train(cfg, path, run_dir, resume=False)
    losses = [json.loads(line)["loss"] for line in (run_dir / "metrics.jsonl").read_text().splitlines() if '"loss"' in line]
    out["train"] = {"steps": result.step, "wall_s": round(result.wall_s, 1), "images_per_s": round(result.images_per_s, 1),
                    "loss_first_window": losses[0], "loss_last_window": losses[-1]}
    encoder, _, _ = load_encoder(run_dir)
    out["simclr"] = probe(embed_images(encoder, x_train), y_train, embed_images(encoder, x_test), y_test, args.k)
    return out


def table(results: list[dict[str, object]]) -> str:
    rows = ["| data | features | kNN top-1 | linear top-1 |", "|---|---|---:|---:|"]
    for r in results:
        name = Path(str(r["data"])).name
        for key, label in (("raw_pixels", "raw pixels"), ("random_init", "random-init ResNet-18"), ("simclr", "SimCLR ResNet-18")):
            m = r[key]
            rows.append(f"| {name} | {label} | {100 * m['knn_top1']:.1f}% | {100 * m['linear_top1']:.1f}% |")
    return "\n".join(rows)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--data", type=Path, nargs="+", default=[p for p in DEFAULT_DATA if p.is_file()])
    parser.add_argument("--image-size", type=int, default=None, help="default: the native size, at least 16")
    parser.add_argument("--small-stem", action=argparse.BooleanOptionalAction, default=False,
                        help="3x3 stride-1 stem (16x the compute of the standard stem at 32 px)")
    parser.add_argument("--epochs", type=int, default=4)
    parser.add_argument("--batch-size", type=int, default=128)
    parser.add_argument("--optimizer", default="lars", choices=["lars", "sgd", "adamw"])
    parser.add_argument("--base-lr", type=float, default=1.0)
    parser.add_argument("--weight-decay", type=float, default=1e-6)
    parser.add_argument("--temperature", type=float, default=0.2)
    parser.add_argument("--crop-min-scale", type=float, default=0.2)
    parser.add_argument("--color-strength", type=float, default=0.5)
    parser.add_argument("--k", type=int, default=200)
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--threads", type=int, default=2)
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
