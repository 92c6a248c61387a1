"""SimCLR vs MoCo v2 vs BYOL at the same budget: loss start/end and kNN top-1 of h.

Each method pretrains through the real engine (`trainer.engine.train`) on the same data with
the same epochs, global batch, image size, backbone, optimiser, head width and crop/flip/colour
settings (by default the data's recipe from bench/knn_quality.py: SimCLR's CIFAR values,
Appendix B.9, on colour images; larger crops and no flip on small grey digits); each method keeps what is its own (MoCo's
queue and key encoder, BYOL's predictor, target network and solarisation on one view). Then
the encoder f is scored by bench/knn_quality.py's `probe` (kNN top-1, k = 200, T = 0.1,
and a linear probe) beside raw pixels and a randomly initialised encoder of the same
architecture (same seed as the runs' initial weights). "loss start" is the mean over the
first log window, "end" over the last.

Short runs need faster momentum networks than the papers' (m = 0.999, tau = 0.996 are set for
hundreds of thousands of steps): a key or target network averages the last ~1 / (1 - m)
steps, so at m = 0.999 it stays the random initial network for a run of 78 steps. Defaults
here: MoCo m = 0.9, BYOL tau_base = 0.99.

    .venv/bin/python bench/methods_compare.py --data ../shared/data/cifar10-5k.npz --epochs 2 --threads 1
    .venv/bin/python bench/methods_compare.py --data ../shared/data/digits.npz --threads 1 --knn-every-epochs 5
"""

from __future__ import annotations

import argparse
import json
import sys
import tempfile
import time
from pathlib import Path

import torch

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))
sys.path.insert(0, str(REPO / "bench"))

from service.contract.train_config import TrainConfig  # noqa: E402
from trainer.checkpoint import load_encoder, read_metrics  # noqa: E402
from trainer.engine import train  # noqa: E402
from trainer.evaluate import labeled_splits, raw_pixel_baseline  # noqa: E402
from trainer.models import Encoder  # noqa: E402
from knn_quality import probe, recipe_for  # noqa: E402

METHODS = ("simclr", "moco_v2", "byol")
LABELS = {"simclr": "SimCLR", "moco_v2": "MoCo v2", "byol": "BYOL"}


def _metrics(run_dir: Path) -> tuple[list[float], list[tuple[int, float]]]:
    """(loss of every log window, [(epoch, kNN top-1)] of the monitor's readings)."""
    records = read_metrics(run_dir)
    losses = [r["loss"] for r in records if "loss" in r]
    return losses, [(r["epoch"], r["knn_top1"]) for r in records if r.get("event") == "knn"]


def method_config(method: str, args: argparse.Namespace) -> TrainConfig:
    """The shared budget plus what belongs to `method`."""
    own: dict[str, object] = {
        "simclr": {"temperature": args.temperature},
        "moco_v2": {"temperature": args.temperature, "queue_size": args.queue_size, "moco_momentum": args.moco_momentum},
        "byol": {"byol_tau_base": args.byol_tau_base, "pred_hidden_dim": args.head_dim},
    }[method]
    base_lr = args.byol_base_lr if method == "byol" else args.base_lr
    return TrainConfig(
        method=method, backbone=args.backbone, small_stem=args.small_stem, image_size=args.image_size,
        epochs=args.epochs, max_steps=args.max_steps, batch_size=args.batch_size, optimizer=args.optimizer,
        base_lr=base_lr, weight_decay=args.weight_decay, warmup_epochs=0.0, seed=args.seed, num_workers=0,
        log_every_steps=5, checkpoint_every_steps=10_000, proj_hidden_dim=args.head_dim,
        knn_every_epochs=args.knn_every_epochs,
        augment={"crop_min_scale": args.crop_min_scale, "hflip_prob": args.hflip_prob, "color_strength": args.color_strength,
                 "blur": False},
        **own,
    )  # fmt: skip


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--data", default=str(REPO.parent / "shared" / "data" / "cifar10-5k.npz"))
    recipe = "default: from the data, as bench/knn_quality.py's recipe_for"
    p.add_argument("--image-size", type=int, default=None, help=recipe)
    p.add_argument("--epochs", type=int, default=None, help=recipe)
    p.add_argument("--max-steps", type=int, default=None, help="cap on optimiser steps, for a loaded machine")
    p.add_argument("--batch-size", type=int, default=None, help=recipe)
    p.add_argument("--backbone", default="resnet18")
    p.add_argument("--small-stem", action="store_true", help="CIFAR stem (16x the compute at 32 px)")
    p.add_argument("--optimizer", default="lars")
    p.add_argument("--base-lr", type=float, default=None, help=recipe + " (SimCLR's and MoCo's)")
    p.add_argument("--weight-decay", type=float, default=1e-6)
    p.add_argument("--temperature", type=float, default=0.2, help="SimCLR's and MoCo's")
    p.add_argument("--crop-min-scale", type=float, default=None, help=recipe)
    p.add_argument("--hflip-prob", type=float, default=None, help=recipe)
    p.add_argument("--color-strength", type=float, default=0.5)
    p.add_argument("--queue-size", type=int, default=1024)
    p.add_argument("--moco-momentum", type=float, default=0.9)
    p.add_argument("--byol-tau-base", type=float, default=0.99)
    p.add_argument("--byol-base-lr", type=float, default=0.2, help="BYOL's own base rate (paper: 0.2 with LARS)")
    p.add_argument("--head-dim", type=int, default=512, help="hidden width of every projector/predictor")
    p.add_argument("--knn-every-epochs", type=int, default=0, help="also print each method's kNN top-1 every N epochs")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--threads", type=int, default=1)
    p.add_argument("--methods", nargs="+", default=list(METHODS), choices=METHODS)
    args = p.parse_args()
    recipe = recipe_for(Path(args.data))
    for flag in ("image_size", "epochs", "batch_size", "base_lr", "crop_min_scale", "hflip_prob"):
        if getattr(args, flag) is None:
            setattr(args, flag, getattr(recipe, flag))
    torch.set_num_threads(args.threads)

    splits = labeled_splits(args.data, args.image_size)  # x_train, y_train, x_test, y_test, decoded once
    rows = [("raw pixels (centred)", None, None, raw_pixel_baseline(*splits), None, None)]
    torch.manual_seed(args.seed)  # the engine's initial weights come from the same seed
    random_enc = Encoder(args.backbone, args.small_stem)
    rows.append(("random-init " + args.backbone, None, None, probe(random_enc, *splits),
                 None, None))  # fmt: skip
    for name, *_, scores, _, _ in rows:
        print(f"{name}: {scores}", flush=True)
    for method in args.methods:
        with tempfile.TemporaryDirectory() as tmp:
            result = train(method_config(method, args), args.data, tmp, resume=False)
            losses, knn_curve = _metrics(Path(tmp))
            encoder, _, _ = load_encoder(tmp)
            scores = probe(encoder, *splits)
        rows.append((LABELS[method], losses[0], losses[-1], scores, result.step, result.wall_s))
        print(f"{method}: {result.step} steps, {result.wall_s:.0f} s, loss {losses[0]:.3f} -> {losses[-1]:.3f}, {scores}",
              flush=True)  # fmt: skip
        if knn_curve:
            print(f"{method}: kNN top-1 by epoch " + ", ".join(f"{e}: {100 * v:.1f}%" for e, v in knn_curve), flush=True)

    print(f"\n{json.dumps(vars(args))}\n")
    print("| features | loss start | loss end | kNN top-1 | linear top-1 | steps | train s |")
    print("|---|---:|---:|---:|---:|---:|---:|")
    for name, start, end, s, steps, wall in rows:
        fmt = lambda v, spec: "-" if v is None else format(v, spec)  # noqa: E731
        print(f"| {name} | {fmt(start, '.3f')} | {fmt(end, '.3f')} | {100 * s['knn_top1']:.1f}% | "
              f"{100 * s['linear_top1']:.1f}% | {fmt(steps, 'd')} | {fmt(wall, '.0f')} |")  # fmt: skip


if __name__ == "__main__":
    main()
