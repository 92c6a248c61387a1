"""SimCLR vs MoCo v2 vs BYOL at the same budget: loss start/end and kNN top-1 of h.

Each method pretrains through the real engine (`trainer.engine.train`) on the same data with
the same epochs, global batch, image size, backbone and crop/flip settings: the data's recipe
(service/contract/recipes.py; larger crops and no flip on small grey digits). Everything else
is each method's own default for the run (service/contract/defaults.py): its paper's optimiser,
learning rate and weight decay, its temperature and colour strength, MoCo's queue and key
momentum and BYOL's target rate following the run's length. Then the encoder f is
scored by bench/knn_quality.py's `probe` (kNN top-1, k = 200, T = 0.1, and a linear probe)
beside raw pixels and a randomly initialised encoder of the same architecture (same seed as
the runs' initial weights). "loss start" is the mean over the first log window, "end" over
the last; "first direction" and "effective rank" describe the spread of the L2-normalised h of
the train split (`trainer.evaluate.variance_spectrum`), which shows a dimensional collapse;
"defaults chosen" is what the run's defaults decided for each method (optimiser, rate and its
scaling rule, weight decay, warm-up, temperature or target rate, MoCo's m and K). Every flag given overrides the recipe for all the methods it applies to.

    .venv/bin/python bench/methods_compare.py --data ../shared/data/cifar10-5k.npz --epochs 10 --threads 1
    .venv/bin/python bench/methods_compare.py --data ../shared/data/digits.npz --threads 1 --knn-every-epochs 5
"""

from __future__ import annotations

import argparse
import json
import sys
import tempfile
from pathlib import Path

import torch

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))
sys.path.insert(0, str(REPO / "bench"))

from knn_quality import given_flags, probe, recipe_for

from service.contract.recipes import Recipe
from service.contract.train_config import TrainConfig
from trainer.checkpoint import load_encoder, read_metrics
from trainer.engine import train
from trainer.evaluate import labeled_splits, raw_pixel_baseline
from trainer.models import Encoder

METHODS = ("simclr", "moco_v2", "byol")
LABELS = {"simclr": "SimCLR", "moco_v2": "MoCo v2", "byol": "BYOL"}
LIGHTLY_METHODS = ("simclr", "byol")  # raced with --against-lightly


def _metrics(run_dir: Path) -> tuple[list[float], list[tuple[int, float]]]:
    """(loss of every log window, [(epoch, kNN top-1)] of the monitor's readings)."""
    records = read_metrics(run_dir)
    losses = [r["loss"] for r in records if "loss" in r]
    return losses, [(r["epoch"], r["knn_top1"]) for r in records if r.get("event") == "knn"]


def _choices(cfg: TrainConfig) -> str:
    """What the run's defaults decided for one method, as the table shows it."""
    scaling = {"linear": "x B/256", "sqrt": "x sqrt(B/256)", "none": ""}[cfg.lr_scaling or "none"]
    own = f"T {cfg.temperature:g}" if cfg.method != "byol" else f"tau {cfg.byol_tau_base:g}"
    if cfg.method == "moco_v2":
        own += f", m {cfg.moco_momentum:g}, K {cfg.queue_size}"
    return (f"{cfg.optimizer.upper()} lr {cfg.base_lr:g} {scaling} = {cfg.learning_rate:.3g}, wd {cfg.weight_decay:g}, "
            f"warm-up {cfg.warmup_epochs:g} ep, {own}")  # fmt: skip


def method_config(method: str, recipe: Recipe, args: argparse.Namespace) -> TrainConfig:
    """The data's recipe for `method` (the rest: the run's defaults), overridden by any flag given."""
    own = {"simclr": ("temperature",), "moco_v2": ("temperature", "queue_size", "moco_momentum"),
           "byol": ("byol_tau_base",)}[method]  # fmt: skip
    heads = {} if args.head_dim is None else {"proj_hidden_dim": args.head_dim}
    if args.head_dim is not None and method == "byol":
        heads["pred_hidden_dim"] = args.head_dim
    return recipe.config(
        method=method, backbone=args.backbone, small_stem=args.small_stem, optimizer=args.optimizer, seed=args.seed,
        max_steps=args.max_steps, knn_every_epochs=args.knn_every_epochs, **heads,
        **given_flags(args, "image_size", "epochs", "batch_size", "base_lr", "weight_decay", *own),
        augment=given_flags(args, "crop_min_scale", "hflip_prob", "color_strength"),
    )  # fmt: skip


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--data", default=str(REPO.parent / "shared" / "data" / "cifar10-5k.npz"))
    from_recipe = "default: the data's recipe (service/contract/recipes.py)"
    p.add_argument("--image-size", type=int, default=None, help=from_recipe)
    p.add_argument("--epochs", type=int, default=None, help=from_recipe)
    p.add_argument("--max-steps", type=int, default=None, help="cap on optimiser steps, for a loaded machine")
    p.add_argument("--batch-size", type=int, default=None, help=from_recipe)
    p.add_argument("--backbone", default="resnet18")
    p.add_argument("--small-stem", action="store_true", help="CIFAR stem (16x the compute at 32 px)")
    p.add_argument("--optimizer", default=None, help="default: each method's paper optimiser")
    p.add_argument("--base-lr", type=float, default=None, help=from_recipe + ", the same for every method")
    p.add_argument("--weight-decay", type=float, default=None, help=from_recipe)
    p.add_argument("--temperature", type=float, default=None, help="SimCLR's and MoCo's; " + from_recipe)
    p.add_argument("--crop-min-scale", type=float, default=None, help=from_recipe)
    p.add_argument("--hflip-prob", type=float, default=None, help=from_recipe)
    p.add_argument("--color-strength", type=float, default=None, help=from_recipe)
    p.add_argument("--queue-size", type=int, default=None, help="MoCo's K; " + from_recipe)
    p.add_argument("--moco-momentum", type=float, default=None, help="MoCo's m; " + from_recipe)
    p.add_argument("--byol-tau-base", type=float, default=None, help="BYOL's tau_base; " + from_recipe)
    p.add_argument(
        "--head-dim",
        type=int,
        default=None,
        help="hidden width of every projector and predictor (default: each method's own)",
    )
    p.add_argument("--knn-every-epochs", type=int, default=0, help="also print each method's kNN top-1 every N epochs")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--threads", type=int, default=1)
    p.add_argument("--methods", nargs="+", default=list(METHODS), choices=METHODS)
    p.add_argument(
        "--against-lightly",
        action="store_true",
        help="also pretrain lightly's SimCLR and BYOL at the same settings (bench/lightly_simclr.py, "
        "bench/lightly_byol.py; the bench extra) and score them",
    )
    args = p.parse_args()
    recipe = recipe_for(Path(args.data))
    configs = {method: method_config(method, recipe, args) for method in args.methods}
    image_size = next(iter(configs.values())).image_size
    torch.set_num_threads(args.threads)

    splits = labeled_splits(args.data, image_size)  # x_train, y_train, x_test, y_test, decoded once
    resolved = {m: cfg.resolved(num_images=len(splits[0])) for m, cfg in configs.items()}
    rows = [("raw pixels (centred)", None, None, raw_pixel_baseline(*splits), None, None)]
    torch.manual_seed(args.seed)  # the engine's initial weights come from the same seed
    random_enc = Encoder(args.backbone, args.small_stem)
    rows.append(("random-init " + args.backbone, None, None, probe(random_enc, *splits),
                 None, None))  # fmt: skip
    for name, *_, scores, _, _ in rows:
        print(f"{name}: {scores}", flush=True)
    for method in args.methods:
        with tempfile.TemporaryDirectory() as tmp:
            result = train(configs[method], args.data, tmp, resume=False)
            losses, knn_curve = _metrics(Path(tmp))
            encoder, _, _ = load_encoder(tmp)
            scores = probe(encoder, *splits)
        rows.append((LABELS[method], losses[0], losses[-1], scores, result.step, result.wall_s))
        print(f"{method}: {result.step} steps, {result.wall_s:.0f} s, loss {losses[0]:.3f} -> {losses[-1]:.3f}, {scores}",
              flush=True)  # fmt: skip
        if knn_curve:
            print(
                f"{method}: kNN top-1 by epoch " + ", ".join(f"{e}: {100 * v:.1f}%" for e, v in knn_curve), flush=True
            )
        if args.against_lightly and method in LIGHTLY_METHODS:
            from lightly_simclr import train_lightly  # needs the bench extra

            encoder, stats = train_lightly(resolved[method], splits[0])
            scores = probe(encoder, *splits)
            # lightly's BYOL loss is -cos, ours 2 - 2 cos: shown on our scale, so the columns compare.
            scale = (lambda v: 2 + 2 * v) if method == "byol" else (lambda v: v)
            rows.append((f"lightly {LABELS[method]}", scale(stats["loss_first_window"]), scale(stats["loss_last_window"]),
                         scores, stats["steps"], stats["wall_s"]))  # fmt: skip
            print(f"lightly {method}: {stats}, {scores}", flush=True)

    print(f"\n{json.dumps(vars(args))}")
    for method, cfg in resolved.items():
        print(f"{method}: {cfg.model_dump_json(exclude_defaults=True)}")
    print()
    print(
        "| features | defaults chosen | loss start | loss end | kNN top-1 | linear top-1 | first direction "
        "| effective rank | steps | train s |"
    )
    print("|---|---|---:|---:|---:|---:|---:|---:|---:|---:|")
    choices = {LABELS[m]: _choices(cfg) for m, cfg in resolved.items()}
    for name, start, end, s, steps, wall in rows:
        fmt = lambda v, spec: "-" if v is None else format(v, spec)
        shape = f"{fmt(s.get('first_direction_share'), '.0%')} | {fmt(s.get('effective_rank'), '.0f')}"
        chosen = choices.get(name, "its benchmark's" if name.startswith("lightly") else "-")
        print(f"| {name} | {chosen} | {fmt(start, '.3f')} | {fmt(end, '.3f')} | {100 * s['knn_top1']:.1f}% | "
              f"{100 * s['linear_top1']:.1f}% | {shape} | {fmt(steps, 'd')} | {fmt(wall, '.0f')} |")  # fmt: skip


if __name__ == "__main__":
    main()
