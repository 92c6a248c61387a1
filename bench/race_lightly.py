"""The training race of issue 15: our SimCLR at its defaults against lightly's SimCLR at the
settings of lightly's own CIFAR-10 benchmark, same data, epochs, batch and encoder.

    ours     trainer.engine.train(TrainConfig(epochs, batch_size, seed)): every other value is
             the run's default (service/contract/defaults.py), printed with its source;
             ResNet-18 with the small stem (the default at 32 px).
    lightly  lightly 1.6's parts as its CIFAR-10 benchmark assembles them:
             SimCLRTransform(input_size=32, cj_strength=0.5, gaussian_blur=0.0) (two views per
             image, per-image PIL transforms), SimCLRProjectionHead(512, 512, 128),
             NTXentLoss(temperature=0.5), SGD lr 0.06 x B/256, momentum 0.9, weight decay 5e-4,
             cosine decay per step; the same trainer.models.Encoder, seeded the same.

Both pretrain on the train split of cifar10-5k.npz (5,000 images). Score: kNN top-1 of the
frozen, L2-normalised h (k = 200, cosine, votes weighted exp(sim / 0.1)) with the 5,000
training images as memory and the 10,000 test JPEGs of cifar10-jpeg.tar.gz as queries
(unpacked once, outside the repo: `tar xzf ../shared/data/cifar10-jpeg.tar.gz -C /tmp/cifar10-jpeg`).

Each (side, seed) is one run that appends its result to --results (JSON lines), so the runs
can be spread over sessions; `--table` prints the markdown table of what is there.

    .venv/bin/python bench/race_lightly.py --side ours --seed 0
    .venv/bin/python bench/race_lightly.py --side lightly --seed 0
    .venv/bin/python bench/race_lightly.py --table
"""

from __future__ import annotations

import argparse
import json
import statistics
import sys
import tempfile
import time
from pathlib import Path

import numpy as np
import torch
from torch import nn

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))

from service.contract.train_config import TrainConfig
from trainer.checkpoint import load_encoder
from trainer.data import labeled_arrays, open_labeled
from trainer.engine import train
from trainer.evaluate import embed_images, knn_top1
from trainer.models import Encoder

SHARED = REPO.parent / "shared" / "data"
TRAIN = SHARED / "cifar10-5k.npz"
JPEG_ROOT = Path("/tmp/cifar10-jpeg")
RESULTS = REPO / "bench" / "results" / "race_lightly.jsonl"


def train_ours(epochs: int, batch: int, seed: int, work: Path) -> tuple[nn.Module, dict[str, object]]:
    cfg = TrainConfig(epochs=epochs, batch_size=batch, seed=seed, num_workers=0)
    run_dir = work / f"ours-{seed}"
    result = train(cfg, TRAIN, run_dir, resume=False)
    encoder, resolved, _ = load_encoder(run_dir)
    decided = json.loads((run_dir / "config.json").read_text())["defaults"]
    chosen = {k: resolved.model_dump()[k] for k in ("optimizer", "base_lr", "lr_scaling", "weight_decay",
              "warmup_epochs", "temperature")}  # fmt: skip
    chosen |= {"peak_lr": resolved.learning_rate, "color_strength": resolved.augment.color_strength,
               "crop_min_scale": resolved.augment.crop_min_scale, "defaults_decided": sorted(decided)}  # fmt: skip
    return encoder, {"steps": result.step, "wall_s": round(result.wall_s, 1), "config": chosen}


def train_lightly(epochs: int, batch: int, seed: int, images: np.ndarray) -> tuple[nn.Module, dict[str, object]]:
    from lightly.loss import NTXentLoss
    from lightly.models.modules import SimCLRProjectionHead
    from lightly.transforms import SimCLRTransform
    from PIL import Image
    from torch.utils.data import DataLoader, Dataset

    transform = SimCLRTransform(input_size=32, cj_strength=0.5, gaussian_blur=0.0)

    class Views(Dataset):
        def __len__(self) -> int:
            return len(images)

        def __getitem__(self, i: int) -> tuple[torch.Tensor, torch.Tensor]:
            a, b = transform(Image.fromarray(images[i]))
            return a, b

    loader = DataLoader(Views(), batch_size=batch, shuffle=True, drop_last=True,
                        generator=torch.Generator().manual_seed(seed))  # fmt: skip
    torch.manual_seed(seed)
    encoder = Encoder("resnet18", small_stem=True)
    head = SimCLRProjectionHead(512, 512, 128)
    criterion = NTXentLoss(temperature=0.5)
    params = list(encoder.parameters()) + list(head.parameters())
    optimizer = torch.optim.SGD(params, lr=0.06 * batch / 256, momentum=0.9, weight_decay=5e-4)
    total = len(loader) * epochs
    scheduler = torch.optim.lr_scheduler.CosineAnnealingLR(optimizer, total)
    encoder.train()
    head.train()
    started, steps = time.perf_counter(), 0
    for _ in range(epochs):
        for a, b in loader:
            z = head(encoder(torch.cat([a, b])))  # [2n, 128]
            loss = criterion(*z.chunk(2))
            optimizer.zero_grad(set_to_none=True)
            loss.backward()
            optimizer.step()
            scheduler.step()
            steps += 1
    return encoder, {"steps": steps, "wall_s": round(time.perf_counter() - started, 1)}


def run(side: str, seed: int, epochs: int, batch: int) -> dict[str, object]:
    train_set = open_labeled(TRAIN, "train", 32)
    x_train, y_train = labeled_arrays(train_set)
    test_set = open_labeled(JPEG_ROOT, "test", 32)
    if test_set.classes != train_set.classes:
        raise SystemExit(f"class order differs: {test_set.classes} vs {train_set.classes}")
    x_test, y_test = labeled_arrays(test_set)
    with tempfile.TemporaryDirectory() as work:
        if side == "ours":
            encoder, info = train_ours(epochs, batch, seed, Path(work))
        else:
            encoder, info = train_lightly(epochs, batch, seed, x_train)
    top1 = knn_top1(embed_images(encoder, x_train), y_train, embed_images(encoder, x_test), y_test, k=200)
    return {"side": side, "seed": seed, "epochs": epochs, "batch": batch, "n_test": len(x_test),
            "knn_top1": top1, **info}  # fmt: skip


def table(path: Path) -> str:
    rows = [json.loads(line) for line in path.read_text().splitlines() if line.strip()]
    out = ["| side | epochs | seeds | kNN top-1 per seed | mean | train s per run |", "|---|---:|---|---|---:|---:|"]
    for side in ("ours", "lightly"):
        for epochs in sorted({r["epochs"] for r in rows if r["side"] == side}):
            mine = sorted((r for r in rows if r["side"] == side and r["epochs"] == epochs), key=lambda r: r["seed"])
            accs = [r["knn_top1"] for r in mine]
            out.append(
                f"| {side} | {epochs} | {', '.join(str(r['seed']) for r in mine)} | "
                f"{', '.join(f'{100 * a:.1f}%' for a in accs)} | {100 * statistics.mean(accs):.1f}% | "
                f"{statistics.mean(r['wall_s'] for r in mine):.0f} |"
            )
    return "\n".join(out)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--side", choices=["ours", "lightly"])
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--epochs", type=int, default=3)
    parser.add_argument("--batch-size", type=int, default=256)
    parser.add_argument("--threads", type=int, default=1)
    parser.add_argument("--results", type=Path, default=RESULTS)
    parser.add_argument("--table", action="store_true", help="print the table of the results so far")
    args = parser.parse_args()
    if args.table:
        print(table(args.results))
        return
    if args.side is None:
        parser.error("--side is required unless --table")
    torch.set_num_threads(args.threads)
    result = run(args.side, args.seed, args.epochs, args.batch_size)
    args.results.parent.mkdir(parents=True, exist_ok=True)
    with open(args.results, "a") as f:
        f.write(json.dumps(result) + "\n")
    print(json.dumps(result))


if __name__ == "__main__":
    main()
