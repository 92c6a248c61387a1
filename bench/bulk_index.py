"""Bulk indexing throughput (service.items.bulk, the code an `/index-jobs` job and `simclr-embed
index` run) against raw ONNX Runtime on the same batches, same session, one run.

1. Unpack CIFAR-10's train JPEGs (../shared/data/cifar10-jpeg.tar.gz) into a cache folder
   outside the repository (`--cache`), the first `--per-class` of each class (5000 = all 50,000).
2. Export an encoder (ResNet-18 with the CIFAR stem, random weights: speed does not depend on
   training) with the trainer's own exporter into a fresh registry, active; or with `--run` a
   trained run's encoder, with the variants its export verifies (int8 on a CPU deployment
   then embeds, in both measurements: the same session).
3. Raw ONNX Runtime: the same images decoded and resized beforehand (not timed) into the same
   batches, `session.run` alone on each, with the very session the bulk run uses.
4. Bulk: `index_dataset` over the folder into a fresh store: listing, reading, sha256, decoding,
   resizing, the same `session.run`, originals written (fsynced) and one SQLite transaction a
   batch (the writes of one batch overlap the next one's inference).
5. Rounds: raw and bulk alternate (raw, bulk, raw, bulk, ..., raw), each bulk run into a fresh
   store; a round's ratio is its bulk run against the mean of the raw runs either side, so
   drifting load from other processes hits both alike; the median ratio is reported.

    .venv/bin/python bench/bulk_index.py --per-class 200 --batch-size 64 --threads 2 --rounds 3
    .venv/bin/python bench/bulk_index.py --per-class 5000 --run RUN_DIR --threads 1 --rounds 2
"""

from __future__ import annotations

import argparse
import tarfile
import tempfile
import time
from pathlib import Path

import numpy as np

from service.contract.imaging import ResizePolicy, decode_image
from service.contract.registry import ModelCard, ModelRegistry
from service.items.bulk import IMAGE_SUFFIXES, index_dataset
from service.items.reindex import load_encoder, space_of
from service.settings import Settings

REPO = Path(__file__).resolve().parents[1]
ARCHIVE = REPO.parent / "shared" / "data" / "cifar10-jpeg.tar.gz"


def unpack(archive: Path, cache: Path, per_class: int) -> Path:
    """`cache`/train-<per_class>/<class>/NNNN.jpg, the first `per_class` files of each class."""
    target = cache / f"train-{per_class}"
    if (target / ".complete").is_file():
        return target
    taken: dict[str, int] = {}
    with tarfile.open(archive) as tar:
        for member in tar:
            parts = Path(member.name).parts
            parts = parts[parts.index("train") :] if "train" in parts else ()
            if len(parts) != 3 or not member.isfile() or Path(parts[2]).suffix.lower() not in IMAGE_SUFFIXES:
                continue
            if taken.get(parts[1], 0) >= per_class:
                continue
            taken[parts[1]] = taken.get(parts[1], 0) + 1
            out = target / parts[1] / parts[2]
            out.parent.mkdir(parents=True, exist_ok=True)
            source = tar.extractfile(member)
            assert source is not None
            out.write_bytes(source.read())
    (target / ".complete").write_text(f"{sum(taken.values())}\n")
    return target


def publish_model(data_dir: Path, size: int, run: Path | None) -> str:
    if run is not None:
        from trainer.export import export_run

        return export_run(run, ModelRegistry(data_dir / "models"), activate=True, model_id="bench-trained").model_id
    import torch

    from trainer.export import export_encoder
    from trainer.models import Encoder

    torch.manual_seed(0)
    encoder = Encoder("resnet18", small_stem=True).eval()
    card = ModelCard(
        model_id="bench-resnet18",
        method="simclr",
        backbone="resnet18",
        input_size=size,
        embedding_dim=encoder.feature_dim,
        resize_policy=ResizePolicy(size).to_json(),
        created_at="2024-01-01T00:00:00Z",
    )
    onnx_path = data_dir / "model.onnx"
    parity = np.random.default_rng(0).integers(0, 256, (8, size, size, 3), dtype=np.uint8)
    export_encoder(encoder, onnx_path, card=card, parity_images=parity)
    ModelRegistry(data_dir / "models").publish(onnx_path, card, activate=True)
    onnx_path.unlink()
    return card.model_id


def raw_images_per_s(session: object, batches: list[np.ndarray]) -> float:
    run = session.run  # type: ignore[attr-defined]
    start = time.perf_counter()
    for batch in batches:
        run(["embedding"], {"images": batch})
    return sum(len(b) for b in batches) / (time.perf_counter() - start)


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--archive", type=Path, default=ARCHIVE)
    ap.add_argument("--cache", type=Path, default=Path(tempfile.gettempdir()) / "cifar10-jpeg")
    ap.add_argument("--per-class", type=int, default=5000, help="images of each of the 10 classes (5000: all)")
    ap.add_argument("--batch-size", type=int, default=64)
    ap.add_argument("--threads", type=int, default=2, help="ONNX Runtime intra-op threads")
    ap.add_argument("--size", type=int, default=32)
    ap.add_argument("--rounds", type=int, default=3)
    ap.add_argument("--run", type=Path, default=None, help="a trained run to export (default: random weights)")
    args = ap.parse_args()

    started = time.perf_counter()
    folder = unpack(args.archive, args.cache, args.per_class)
    paths = sorted(p for p in folder.rglob("*") if p.suffix.lower() in IMAGE_SUFFIXES)
    print(f"{len(paths)} JPEGs under {folder} ({time.perf_counter() - started:.1f} s)", flush=True)

    with tempfile.TemporaryDirectory(prefix="bulk-bench-") as tmp:
        data_dir = Path(tmp)
        model_id = publish_model(data_dir, args.size, args.run)
        settings = Settings(data_dir=data_dir, ort_intra_op_threads=args.threads)
        registry = ModelRegistry(settings.models_dir)
        encoder = load_encoder(settings, registry, space_of(settings, registry, model_id))  # what index_dataset writes
        session = encoder.session  # type: ignore[attr-defined]
        images = [decode_image(p.read_bytes()) for p in paths]  # the bulk run's order (sorted paths)
        batches = [
            np.ascontiguousarray(encoder.policy.batch(images[i : i + args.batch_size]))
            for i in range(0, len(images), args.batch_size)
        ]
        del images
        raws = [raw_images_per_s(session, batches)]
        print(f"raw ONNX Runtime: {raws[-1]:.1f} images/s", flush=True)
        bulks = []
        for round_no in range(args.rounds):
            round_dir = data_dir / f"round-{round_no}"  # a fresh item store, the same model and session
            round_dir.mkdir()
            (round_dir / "models").symlink_to(settings.models_dir, target_is_directory=True)
            round_settings = Settings(data_dir=round_dir, ort_intra_op_threads=args.threads)
            start = time.perf_counter()
            report = index_dataset(round_settings, folder, batch_size=args.batch_size, encoder=encoder)
            bulks.append(report.processed / (time.perf_counter() - start))
            assert report.added == len(paths) and not report.failed, report
            print(f"bulk index: {bulks[-1]:.1f} images/s", flush=True)
            raws.append(raw_images_per_s(session, batches))
            print(f"raw ONNX Runtime: {raws[-1]:.1f} images/s", flush=True)
    ratios = [bulk / ((raws[i] + raws[i + 1]) / 2) for i, bulk in enumerate(bulks)]
    print(
        f"space={encoder.space} images={len(paths)} batch={args.batch_size} threads={args.threads} rounds={args.rounds} "
        f"bulk={np.median(bulks):.1f} images/s raw_ort={np.median(raws):.1f} images/s "
        f"ratios={[round(r, 3) for r in ratios]} median_ratio={np.median(ratios):.3f}"
    )
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
