"""What serving the int8 variant costs in quality, on a trained CIFAR-10 model.

Export a run (`trainer.export.export_run`: the fp32 model, and the int8 variant when it passes
verification), then embed with ONNX Runtime, fp32 and int8 alike: memory = cifar10-5k.npz's
5,000 labeled train images, queries = the 10,000 test images of the CIFAR-10 JPEG tree.
Reports kNN top-1 of each (cosine, k = 200, T = 0.1, trainer.evaluate.knn_top1), and the
recall@10 of int8 search against fp32 search: a FAISS flat inner-product index of the memory
images per variant (what the server builds by default), each query's 10 results under int8
compared with its 10 under fp32. Also the verification figures export recorded in the card, and
the recall that a variant with a fraction of the int8 error would keep (the int8 embeddings'
difference from fp32 scaled down): how much smaller the error must be for a given recall.

    .venv/bin/python bench/precision_parity.py --seeds 0 --precisions fp32 --runs /tmp/precision-parity
    .venv/bin/python bench/int8_quality.py --run /tmp/precision-parity/fp32-seed0 --threads 2
"""

from __future__ import annotations

import argparse
import json
import sys
import tempfile
import time
from pathlib import Path

import faiss
import numpy as np

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))

from service.contract.registry import ModelRegistry
from service.contract.variants import INT8
from trainer.data import labeled_arrays, open_labeled
from trainer.evaluate import knn_top1
from trainer.export import export_run, ort_session

SHARED = REPO.parent / "shared" / "data"


def embed(path: Path, images: np.ndarray, threads: int, batch: int = 256) -> tuple[np.ndarray, float]:
    """uint8 [N, S, S, 3] -> (float32 [N, D] from ONNX Runtime, images/s)."""
    session = ort_session(path, threads)
    start = time.perf_counter()
    out = np.concatenate(
        [session.run(["embedding"], {"images": images[i : i + batch]})[0] for i in range(0, len(images), batch)]
    )
    return out, len(images) / (time.perf_counter() - start)


def recall_at(k: int, memory: dict[str, np.ndarray], queries: dict[str, np.ndarray]) -> float:
    """Mean |top-k under int8 & top-k under fp32| / k, each variant searching its own index."""
    found = {}
    for variant in ("fp32", INT8):
        index = faiss.IndexFlatIP(memory[variant].shape[1])
        index.add(memory[variant])
        found[variant] = index.search(queries[variant], k)[1]  # [Q, k]
    return float(np.mean([len(np.intersect1d(a, b)) / k for a, b in zip(found["fp32"], found[INT8], strict=True)]))


def scaled_error(variant: dict[str, np.ndarray], fraction: float) -> dict[str, np.ndarray]:
    """fp32 and, as the int8 entry, fp32 + fraction x (int8 - fp32), renormalised: what recall
    a variant with that fraction of the int8 error would keep."""
    mixed = variant["fp32"] + fraction * (variant[INT8] - variant["fp32"])
    return {"fp32": variant["fp32"], INT8: mixed / np.linalg.norm(mixed, axis=1, keepdims=True)}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--run", type=Path, required=True, help="a trained run directory (CIFAR-10)")
    parser.add_argument("--data", type=Path, default=SHARED / "cifar10-5k.npz")
    parser.add_argument("--test-folder", type=Path, default=Path("/tmp/cifar10-jpeg"))
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--json", type=Path, default=None)
    args = parser.parse_args()
    x_train, y_train = labeled_arrays(open_labeled(args.data, "train", 32))  # uint8 [5000, 32, 32, 3]
    x_test, y_test = labeled_arrays(open_labeled(args.test_folder, "test", 32))  # uint8 [10000, 32, 32, 3]
    with tempfile.TemporaryDirectory() as tmp:
        registry = ModelRegistry(Path(tmp) / "models")
        started = time.perf_counter()
        card = export_run(args.run, registry, model_id="bench-int8")
        export_s = time.perf_counter() - started
        if INT8 not in card.variants:
            print(f"int8 refused at export: {card.refused_variants}")
            return
        files = {
            "fp32": registry.root / "bench-int8" / "model.onnx",
            INT8: registry.root / "bench-int8" / "model.int8.onnx",
        }
        memory, queries, rates = {}, {}, {}
        for variant, path in files.items():
            memory[variant], _ = embed(path, x_train, args.threads)
            queries[variant], rates[variant] = embed(path, x_test, args.threads)
    result = {
        "run": str(args.run),
        "export_s": round(export_s, 1),
        "verification": card.variants[INT8].verification,
        "knn_top1": {v: knn_top1(memory[v], y_train, queries[v], y_test) for v in files},
        "recall_at_10": recall_at(10, memory, queries),
        "recall_at_10_with_error_scaled": {
            f: recall_at(10, scaled_error(memory, f), scaled_error(queries, f)) for f in (0.75, 0.5, 0.33, 0.25)
        },
        "embed_images_per_s": {v: round(r, 1) for v, r in rates.items()},
        "sizes_bytes": {"fp32": card.size_bytes, INT8: card.variants[INT8].size_bytes},
    }
    print(json.dumps(result, indent=2))
    if args.json:
        args.json.write_text(json.dumps(result, indent=2))


if __name__ == "__main__":
    main()
