"""Images per second of SimCLR training: the data pipeline alone and a full training step.

A full step is what `trainer.engine` runs for each batch: the next batch from its DataLoader,
two batched augmentations of the uint8 images, forward through f and g, NT-Xent, backward,
LARS, schedule (the engine's own `_train_step`, not a copy). With `lightly` importable (the
`bench` extra), lightly's SimCLR at the same settings (bench/lightly_simclr.py: its per-image
PIL SimCLRTransform in a DataLoader, SimCLRProjectionHead, NTXentLoss, its LARS) is timed in
the same run, both its data pipeline alone and its full step. On a GPU, ResNet-50 at 224 px too.

Ours runs at each of `--precisions` as `train()` resolves it (trainer/precision.py: `auto` is
bf16 autocast with channels-last on CUDA and on CPUs with AMX / AVX512_BF16, else fp32); lightly
runs fp32, as its users run it on a CPU. `--threads 1,2` repeats everything at each count.

    python bench/train_throughput.py --threads 1 --num-workers 0   # CPU: ResNet-18, 32 px, batch 256
    python bench/train_throughput.py --threads 1,2 --num-workers 0 --stems small --precisions auto
    python bench/train_throughput.py --data ../shared/data/cifar10-5k.npz
"""

from __future__ import annotations

import argparse
import json
import tempfile
import time
from collections.abc import Callable, Iterator
from pathlib import Path

import numpy as np
import torch
from torch.utils.data import DataLoader

from service.contract.train_config import TrainConfig
from trainer.data import open_dataset
from trainer.engine import _prepare_run_dir, _resolution, _Trainer
from trainer.precision import resolve_precision


def _timed(fn: Callable[[], object], warmup: int, steps: int, sync: bool) -> float:
    """Seconds per call of `fn`, after `warmup` untimed calls."""
    for _ in range(warmup):
        fn()
    if sync:
        torch.cuda.synchronize()
    start = time.perf_counter()
    for _ in range(steps):
        fn()
    if sync:
        torch.cuda.synchronize()
    return (time.perf_counter() - start) / steps


def _dataset_path(data: str | None, image_size: int, n: int, tmp: Path) -> str:
    if data:
        return data
    rng = np.random.default_rng(0)  # random pixels: throughput does not depend on content
    path = tmp / "random.npz"
    np.savez(path, x_train=rng.integers(0, 256, (n, image_size, image_size, 3), dtype=np.uint8))
    return str(path)


def bench_ours(cfg: TrainConfig, data: str, warmup: int, steps: int, cuda: bool, tmp: Path) -> dict[str, float]:
    """The engine's DataLoader alone, the data pipeline (load + both views), and a full step
    (load, then the engine's own `_train_step`: augment, forward, backward, optimiser)."""
    dataset = open_dataset(data, cfg.image_size)
    run_dir = Path(tempfile.mkdtemp(dir=tmp))
    resolution = _resolution(cfg, len(dataset), 1, run_dir, resume=False)  # as train() decides
    _prepare_run_dir(resolution, data, dataset, run_dir, resume=False)
    trainer = _Trainer(0, 1, cuda, resolution.config, dataset, None, run_dir, None, None)  # no kNN monitor
    trainer.method.train()
    batches = _cycle(trainer.loader)  # (uint8 frames [B, 3, Hc, Wc], sizes [B, 2], ok [B])

    def pipeline() -> None:
        frames, sizes, _ = next(batches)
        x = frames.to(trainer.aug_device, non_blocking=True)
        for aug in trainer.augments:
            aug(x, sizes)

    return {
        "loader_images_per_s": cfg.batch_size / _timed(lambda: next(batches), warmup, steps, cuda),
        "pipeline_images_per_s": cfg.batch_size / _timed(pipeline, warmup, steps, cuda),
        "step_images_per_s": cfg.batch_size / _timed(lambda: trainer._train_step(*next(batches)), warmup, steps, cuda),
    }


def bench_lightly(
    cfg: TrainConfig, data: str, warmup: int, steps: int, device: torch.device
) -> dict[str, float] | None:
    """lightly's SimCLR (bench/lightly_simclr.py) at the same settings: its DataLoader of
    per-image PIL transforms alone, and a full step (load + augment, forward, backward, LARS)."""
    try:
        from lightly_simclr import LightlySimCLR, TwoViewDataset, lightly_transform
    except ImportError:
        return None

    dataset = open_dataset(data, cfg.image_size)
    images = np.stack([dataset.image(i) for i in range(min(len(dataset), 4 * cfg.batch_size))])  # [n, S, S, 3]
    loader = DataLoader(
        TwoViewDataset(images, lightly_transform(cfg)),
        batch_size=cfg.batch_size,
        shuffle=True,
        drop_last=True,
        num_workers=cfg.num_workers,
        pin_memory=device.type == "cuda",
        persistent_workers=cfg.num_workers > 0,
    )
    run = LightlySimCLR.build(cfg, total_steps=10**6, warmup_steps=0, device=device)
    run.train()
    batches = _cycle(loader)
    bf16 = device.type == "cuda"

    def step() -> None:
        view_a, view_b = next(batches)
        run.step(view_a.to(device, non_blocking=True), view_b.to(device, non_blocking=True), bf16=bf16)

    return {
        "lightly_pipeline_images_per_s": cfg.batch_size / _timed(lambda: next(batches), warmup, steps, False),
        "lightly_step_images_per_s": cfg.batch_size / _timed(step, warmup, steps, device.type == "cuda"),
    }


def _cycle(loader: DataLoader) -> Iterator:
    while True:
        yield from loader


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--data", help=".npz or folder; default: random images generated here")
    parser.add_argument("--batch-size", type=int, default=256)
    parser.add_argument("--warmup", type=int, default=1)
    parser.add_argument("--steps", type=int, default=3)
    parser.add_argument("--num-workers", type=int, default=2)
    parser.add_argument("--threads", default="0", help="torch CPU thread counts, comma list; 0 = torch's default")
    parser.add_argument("--precisions", default="auto", help="ours: comma list of auto, fp32, bf16")
    parser.add_argument(
        "--stems",
        default="small,standard",
        help="ResNet stems to time at 32 px: small (3x3 stride 1, the default at <= 64 px), standard",
    )
    parser.add_argument("--skip-lightly", action="store_true")
    args = parser.parse_args()
    for threads in (int(t) for t in args.threads.split(",")):
        if threads:
            torch.set_num_threads(threads)
        run_settings(args)


def run_settings(args: argparse.Namespace) -> None:
    """Every stem (and ResNet-50 on a GPU) at the current thread count: ours at each precision, lightly."""
    cuda = torch.cuda.is_available()
    device = torch.device("cuda" if cuda else "cpu")
    settings = [("resnet18", 32, stem == "small") for stem in args.stems.split(",")]
    settings += [("resnet50", 224, False)] if cuda else []
    print(
        f"# device: {torch.cuda.get_device_name() if cuda else 'cpu'}, torch {torch.__version__}, "
        f"threads {torch.get_num_threads()}, batch {args.batch_size}, workers {args.num_workers}",
        flush=True,
    )
    with tempfile.TemporaryDirectory() as tmp_name:
        tmp = Path(tmp_name)
        for backbone, size, small_stem in settings:
            cfg = TrainConfig(
                backbone=backbone,
                small_stem=small_stem,
                image_size=size,
                batch_size=args.batch_size,
                num_workers=args.num_workers,
                compile=False,
            ).resolved()
            data = _dataset_path(args.data, size, 4 * args.batch_size, tmp)
            row: dict[str, object] = {
                "backbone": backbone,
                "small_stem": small_stem,
                "image_size": size,
                "batch_size": args.batch_size,
                "blur": cfg.augment.blur,
                "device": device.type,
                "threads": torch.get_num_threads(),
            }
            for requested in args.precisions.split(","):
                precision = resolve_precision(requested, cuda)  # as train() resolves it
                ours = bench_ours(
                    cfg.model_copy(update={"precision": precision}), data, args.warmup, args.steps, cuda, tmp
                )
                row.update({f"{requested}={precision} {k}": v for k, v in ours.items()})
            if not args.skip_lightly:
                theirs = bench_lightly(cfg, data, args.warmup, args.steps, device)
                row.update(theirs or {"lightly": "not installed (pip install -e '.[bench]')"})
            print(json.dumps({k: round(v, 1) if isinstance(v, float) else v for k, v in row.items()}), flush=True)


if __name__ == "__main__":
    main()
