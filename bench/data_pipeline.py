"""Images/s of the data side alone: decode + resize from a folder of JPEGs, and the batched
SimCLR augmentation (two views) on CPU tensors (and on the GPU when there is one).

The CIFAR-10 JPEG folder comes from ../shared/data/cifar10-jpeg.tar.gz, unpacked once
outside the repository:

    mkdir -p /tmp/cifar10-jpeg && tar xzf ../shared/data/cifar10-jpeg.tar.gz -C /tmp/cifar10-jpeg
    .venv/bin/python bench/data_pipeline.py --folder /tmp/cifar10-jpeg --threads 1
"""

from __future__ import annotations

import argparse
import json
import sys
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from service.contract.train_config import AugmentConfig
from trainer.data import open_dataset
from trainer.transforms import SimCLRAugment


def decode_rate(folder: Path, image_size: int, limit: int, workers: int) -> dict[str, float]:
    """Open the folder (scan + header check + content hash), then decode `limit` images
    through a DataLoader the way the engine reads them."""
    started = time.perf_counter()
    data = open_dataset(folder, image_size)
    opened = time.perf_counter() - started
    subset = torch.utils.data.Subset(data, range(min(limit, len(data))))
    loader = torch.utils.data.DataLoader(subset, batch_size=256, num_workers=workers)
    started = time.perf_counter()
    n = sum(len(images) for images, _ in loader)
    decode_s = time.perf_counter() - started
    return {
        "files": len(data),
        "open_s": round(opened, 2),
        "open_files_per_s": round(len(data) / opened),
        "decoded": n,
        "decode_images_per_s": round(n / decode_s),
        "loader_workers": workers,
    }


def augment_rate(device: str, image_size: int, batch: int, blur: bool, repeats: int) -> float:
    """Images/s of two augmented views of uint8 [batch, 3, S, S] batches."""
    aug = SimCLRAugment(AugmentConfig(blur=blur), image_size).to(device)
    x = torch.randint(0, 256, (batch, 3, image_size, image_size), dtype=torch.uint8, device=device)
    for _ in range(2):
        aug(x)
    if device == "cuda":
        torch.cuda.synchronize()
    started = time.perf_counter()
    for _ in range(repeats):
        aug(x), aug(x)
    if device == "cuda":
        torch.cuda.synchronize()
    return batch * repeats / (time.perf_counter() - started)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--folder", type=Path, default=Path("/tmp/cifar10-jpeg"))
    parser.add_argument("--image-size", type=int, default=32)
    parser.add_argument("--decode-limit", type=int, default=10_000)
    parser.add_argument("--workers", type=int, default=0, help="DataLoader workers for decoding")
    parser.add_argument("--batch", type=int, default=256)
    parser.add_argument("--repeats", type=int, default=10)
    parser.add_argument("--threads", type=int, default=1)
    args = parser.parse_args()
    torch.set_num_threads(args.threads)
    out: dict[str, object] = {"torch_threads": args.threads}
    if args.folder.is_dir():
        out["decode"] = decode_rate(args.folder, args.image_size, args.decode_limit, args.workers)
    devices = ["cpu"] + (["cuda"] if torch.cuda.is_available() else [])
    for device in devices:
        for size in (args.image_size, 224):
            for blur in (False, True):
                rate = augment_rate(device, size, args.batch if size <= 64 else 64, blur, args.repeats)
                out[f"augment_{device}_{size}px_blur_{'on' if blur else 'off'}_images_per_s"] = round(rate)
    print(json.dumps(out, indent=2))


if __name__ == "__main__":
    main()
