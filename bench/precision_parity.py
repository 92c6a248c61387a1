"""Quality parity of bf16 and fp32 training: the same short SimCLR run in both, several seeds.

For each seed, pretrain the CIFAR recipe (service/contract/recipes.py) on cifar10-5k.npz's
5,000 train images for `--epochs` with `precision: fp32`, then with `precision: bf16`
(autocast, channels-last; on a CPU without native bf16 oneDNN emulates it: the same
arithmetic, much slower). Score each encoder's L2-normalised h (embedded in fp32) by kNN
top-1 (cosine, k = 200, T = 0.1): memory = the 5,000 labeled train images, queries = the
10,000 test images of the CIFAR-10 JPEG tree. Seeds run in pairs (fp32 then bf16), so an
interrupted run still leaves complete pairs; `--json` is rewritten after every run and the
run directories are kept under `--runs` (bench/int8_quality.py scores one of them).

    mkdir -p /tmp/cifar10-jpeg && tar xzf ../shared/data/cifar10-jpeg.tar.gz -C /tmp/cifar10-jpeg
    .venv/bin/python bench/precision_parity.py --seeds 0 1 2 --threads 1 --json /tmp/parity.json
"""

from __future__ import annotations

import argparse
import json
import sys
import time
from pathlib import Path
from statistics import mean
from typing import Any

import torch

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))

from service.contract.recipes import recipe_for_images
from trainer.checkpoint import load_encoder, read_metrics
from trainer.data import labeled_arrays, open_labeled
from trainer.engine import train
from trainer.evaluate import embed_images, knn_top1

SHARED = REPO.parent / "shared" / "data"
PRECISIONS = ("fp32", "bf16")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--data", type=Path, default=SHARED / "cifar10-5k.npz", help="training images (x_train)")
    parser.add_argument("--test-folder", type=Path, default=Path("/tmp/cifar10-jpeg"), help="holds test/<class>/")
    parser.add_argument("--epochs", type=int, default=3)
    parser.add_argument("--seeds", type=int, nargs="+", default=[0, 1, 2])
    parser.add_argument("--precisions", nargs="+", default=list(PRECISIONS), choices=PRECISIONS)
    parser.add_argument("--threads", type=int, default=1)
    parser.add_argument("--runs", type=Path, default=Path("/tmp/precision-parity"), help="run directories kept here")
    parser.add_argument("--json", type=Path, default=None, help="results, rewritten after every run")
    args = parser.parse_args()
    torch.set_num_threads(args.threads)
    x_train, y_train = labeled_arrays(open_labeled(args.data, "train", 32))  # uint8 [5000, 32, 32, 3]
    x_test, y_test = labeled_arrays(open_labeled(args.test_folder, "test", 32))  # uint8 [10000, 32, 32, 3]
    print(f"memory {len(x_train)} images, queries {len(x_test)} images", file=sys.stderr, flush=True)
    results: list[dict[str, Any]] = []
    for seed in args.seeds:
        for precision in args.precisions:
            cfg = recipe_for_images(32, grayscale=False).config(epochs=args.epochs, seed=seed, precision=precision)
            run_dir = args.runs / f"{precision}-seed{seed}"
            result = train(cfg, args.data, run_dir, resume=False)
            started = time.perf_counter()
            encoder, _, _ = load_encoder(run_dir)
            top1 = knn_top1(embed_images(encoder, x_train), y_train, embed_images(encoder, x_test), y_test)
            losses = [r["loss"] for r in read_metrics(run_dir) if "loss" in r]
            results.append(
                {
                    "seed": seed,
                    "precision": precision,
                    "run_dir": str(run_dir),
                    "steps": result.step,
                    "train_s": round(result.wall_s, 1),
                    "images_per_s": round(result.images_per_s, 1),
                    "loss_last_window": round(losses[-1], 4),
                    "knn_top1": top1,
                    "eval_s": round(time.perf_counter() - started, 1),
                }
            )
            print(json.dumps(results[-1]), flush=True)
            if args.json:
                args.json.write_text(json.dumps(results, indent=2))
    print("| seed | precision | steps | train s | images/s | last loss | kNN top-1 (10,000 test JPEGs) |")
    print("|---:|---|---:|---:|---:|---:|---:|")
    for r in results:
        print(
            f"| {r['seed']} | {r['precision']} | {r['steps']} | {r['train_s']:.0f} | {r['images_per_s']:.1f} | "
            f"{r['loss_last_window']:.3f} | {100 * r['knn_top1']:.2f}% |"
        )
    for precision in PRECISIONS:
        scores = [r["knn_top1"] for r in results if r["precision"] == precision]
        if scores:
            print(f"{precision}: mean kNN top-1 {100 * mean(scores):.2f}% over {len(scores)} seed(s)")


if __name__ == "__main__":
    main()
