"""SimCLR vs MoCo v2 vs BYOL at the same budget: loss start/end and kNN top-1 of h.

Each method pretrains through the real engine (`trainer.engine.train`) on the same data with
the same epochs, global batch, image size, backbone and optimiser; then the exported-style
encoder f is scored by `trainer.evaluate.evaluate_encoder` (kNN top-1, k = 200, T = 0.1, and
a linear probe) against a randomly initialised encoder of the same architecture.
The loss "start" is the mean over the first log window, "end" over the last.

    .venv/bin/python bench/methods_compare.py --data ../shared/data/digits.npz --image-size 32 --epochs 3
"""

from __future__ import annotations

import argparse
import json
import tempfile
import time
from pathlib import Path

import torch

from service.contract.train_config import TrainConfig
from trainer.checkpoint import load_encoder
from trainer.engine import train
from trainer.evaluate import evaluate_encoder
from trainer.models import Encoder

METHODS = ("simclr", "moco_v2", "byol")


def _losses(run_dir: Path) -> list[float]:
    with open(run_dir / "metrics.jsonl") as f:
        return [r["loss"] for r in map(json.loads, f) if "loss" in r]


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--data", default="../shared/data/digits.npz")
    p.add_argument("--image-size", type=int, default=32)
    p.add_argument("--epochs", type=int, default=3)
    p.add_argument("--max-steps", type=int, default=None, help="cap on optimiser steps, for a loaded machine")
    p.add_argument("--batch-size", type=int, default=128)
    p.add_argument("--backbone", default="resnet18")
    p.add_argument("--small-stem", action="store_true", help="CIFAR stem (16x the compute at 32 px)")
    p.add_argument("--optimizer", default="lars")
    p.add_argument("--base-lr", type=float, default=1.0)
    p.add_argument("--queue-size", type=int, default=1024)
    p.add_argument("--moco-momentum", type=float, default=0.99)
    p.add_argument("--head-dim", type=int, default=512, help="hidden width of every projector/predictor")
    p.add_argument("--threads", type=int, default=2)
    p.add_argument("--methods", nargs="+", default=list(METHODS), choices=METHODS)
    args = p.parse_args()
    torch.set_num_threads(args.threads)

    budget = dict(
        backbone=args.backbone, small_stem=args.small_stem, image_size=args.image_size, epochs=args.epochs,
        max_steps=args.max_steps,
        batch_size=args.batch_size, optimizer=args.optimizer, base_lr=args.base_lr, warmup_epochs=0.0,
        weight_decay=1e-5, num_workers=0, log_every_steps=5, proj_hidden_dim=args.head_dim,
        pred_hidden_dim=args.head_dim, augment={"crop_min_scale": 0.2},
    )
    torch.manual_seed(0)
    random_enc = Encoder(args.backbone, args.small_stem)
    rows = [("random init", None, None, evaluate_encoder(random_enc, args.data, args.image_size), 0.0)]
    print(f"random init: {rows[0][3]}", flush=True)
    for method in args.methods:
        cfg = TrainConfig(method=method, queue_size=args.queue_size, moco_momentum=args.moco_momentum, **budget)
        with tempfile.TemporaryDirectory() as tmp:
            started = time.perf_counter()
            result = train(cfg, args.data, tmp, resume=False)
            wall = time.perf_counter() - started
            losses = _losses(Path(tmp))
            encoder, _, _ = load_encoder(tmp)
            scores = evaluate_encoder(encoder, args.data, args.image_size)
        rows.append((method, losses[0], losses[-1], scores, wall))
        print(f"{method}: {result.step} steps, loss {losses[0]:.3f} -> {losses[-1]:.3f}, {scores}", flush=True)

    print(f"\n{json.dumps({k: v for k, v in vars(args).items()})}\n")
    print("| method | loss start | loss end | kNN top-1 | linear top-1 | train s |")
    print("|---|---|---|---|---|---|")
    for name, start, end, s, wall in rows:
        fmt = lambda v: "-" if v is None else f"{v:.3f}"  # noqa: E731
        print(f"| {name} | {fmt(start)} | {fmt(end)} | {s['knn_top1']:.3f} | {s['linear_top1']:.3f} | {wall:.0f} |")


if __name__ == "__main__":
    main()
