"""Images per second of SimCLR training: the data pipeline alone and a full training step.

A full step is what `trainer.engine` runs for each batch: two batched augmentations of uint8
images, forward through f and g, NT-Xent, backward, LARS, schedule (the engine's own
`_train_step`, not a copy). With `lightly` importable (the `bench` extra), lightly's SimCLR
step at the same settings (ResNet, SimCLRProjectionHead, NTXentLoss, its LARS, and its
per-image PIL SimCLRTransform) is timed in the same run. On a GPU, ResNet-50 at 224 px too.

    python bench/train_throughput.py                       # CPU: ResNet-18, 32 px, batch 256
    python bench/train_throughput.py --data ../shared/data/cifar10-5k.npz
"""

from __future__ import annotations

import argparse
import json
import tempfile
import time
from collections.abc import Callable
from pathlib import Path

import numpy as np
import torch

from service.contract.train_config import TrainConfig
from trainer.data import open_dataset
from trainer.engine import _Trainer


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
    dataset = open_dataset(data, cfg.image_size)
    trainer = _Trainer(0, 1, cuda, cfg, dataset, tmp, None, None)
    trainer.method.train()
    loader_iter = iter(trainer.loader)

    def next_batch() -> torch.Tensor:
        nonlocal loader_iter
        try:
            return next(loader_iter)[0]
        except StopIteration:
            trainer.sampler.set_epoch(trainer.sampler.epoch + 1)
            loader_iter = iter(trainer.loader)
            return next(loader_iter)[0]

    def pipeline() -> None:  # load a batch, move it, draw both views
        x = next_batch().to(trainer.aug_device, non_blocking=True)
        for aug in trainer.augments:
            aug(x)

    images = next_batch()
    out = {
        "loader_images_per_s": cfg.batch_size / _timed(next_batch, warmup, steps, cuda),
        "pipeline_images_per_s": cfg.batch_size / _timed(pipeline, warmup, steps, cuda),
        "step_images_per_s": cfg.batch_size / _timed(lambda: trainer._train_step(images), warmup, steps, cuda),
    }
    return out


def bench_lightly(cfg: TrainConfig, data: str, warmup: int, steps: int, device: torch.device) -> dict[str, float] | None:
    try:
        from lightly.loss import NTXentLoss
        from lightly.models.modules import SimCLRProjectionHead
        from lightly.transforms import SimCLRTransform
        from lightly.utils.lars import LARS
    except ImportError:
        return None
    from PIL import Image

    from trainer.models import Encoder

    dataset = open_dataset(data, cfg.image_size)
    pil = [Image.fromarray(dataset.image(i)) for i in range(cfg.batch_size)]
    transform = SimCLRTransform(input_size=cfg.image_size, gaussian_blur=0.5 if cfg.augment.blur else 0.0)
    encoder = Encoder(cfg.backbone, bool(cfg.small_stem)).to(device)
    head = SimCLRProjectionHead(encoder.feature_dim, encoder.feature_dim, 128).to(device)
    params = list(encoder.parameters()) + list(head.parameters())
    optimizer = LARS(params, lr=cfg.learning_rate, momentum=cfg.momentum, weight_decay=cfg.weight_decay)
    criterion = NTXentLoss(temperature=float(cfg.temperature))
    bf16 = device.type == "cuda"

    def step() -> None:
        views = [transform(img) for img in pil]  # per image: [view_a, view_b]
        x_a = torch.stack([v[0] for v in views]).to(device, non_blocking=True)
        x_b = torch.stack([v[1] for v in views]).to(device, non_blocking=True)
        with torch.autocast(device.type, dtype=torch.bfloat16, enabled=bf16):
            z = head(encoder(torch.cat([x_a, x_b])))
            loss = criterion(*z.chunk(2))
        optimizer.zero_grad(set_to_none=True)
        loss.backward()
        optimizer.step()

    return {"lightly_step_images_per_s": cfg.batch_size / _timed(step, warmup, steps, device.type == "cuda")}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--data", help=".npz or folder; default: random images generated here")
    parser.add_argument("--batch-size", type=int, default=256)
    parser.add_argument("--warmup", type=int, default=1)
    parser.add_argument("--steps", type=int, default=3)
    parser.add_argument("--num-workers", type=int, default=2)
    parser.add_argument("--threads", type=int, default=0, help="torch CPU threads; 0 = torch's default")
    parser.add_argument("--skip-lightly", action="store_true")
    args = parser.parse_args()
    if args.threads:
        torch.set_num_threads(args.threads)
    cuda = torch.cuda.is_available()
    device = torch.device("cuda" if cuda else "cpu")
    settings = [("resnet18", 32)] + ([("resnet50", 224)] if cuda else [])
    print(f"# device: {torch.cuda.get_device_name() if cuda else 'cpu'}, torch {torch.__version__}, "
          f"threads {torch.get_num_threads()}, batch {args.batch_size}")
    with tempfile.TemporaryDirectory() as tmp_name:
        tmp = Path(tmp_name)
        for backbone, size in settings:
            cfg = TrainConfig(
                backbone=backbone, image_size=size, batch_size=args.batch_size, num_workers=args.num_workers,
                compile=False,
            ).resolved()
            data = _dataset_path(args.data, size, 4 * args.batch_size, tmp)
            row = {"backbone": backbone, "image_size": size, "batch_size": args.batch_size,
                   "device": device.type, **bench_ours(cfg, data, args.warmup, args.steps, cuda, tmp)}
            if not args.skip_lightly:
                theirs = bench_lightly(cfg, data, args.warmup, args.steps, device)
                row.update(theirs or {"lightly": "not installed (pip install -e '.[bench]')"})
            print(json.dumps(row))


if __name__ == "__main__":
    main()
