"""Encoder inference: ONNX Runtime (CPU) vs torch eager, images/s per batch size.

Both sides run the same thing: uint8 [N, S, S, 3] in, unit-norm embedding out (the exported
graph, trainer.export.EmbeddingGraph, in torch eager under inference_mode). Both get the same
thread count (torch.set_num_threads and ORT intra_op_num_threads). Each encoder is exported
with trainer.export.export_encoder, so the parity check on real CIFAR-10 images runs first.
The int8 variant export publishes (trainer.export.quantize_int8, calibrated on 64 CIFAR-10
images) runs in the same loop, with its cosine to the fp32 ORT output on the timed images.
Torch, ORT fp32 and ORT int8 calls are interleaved so load from other processes hits all alike;
the ORT sessions' thread pools do not spin-wait between calls (`--spin-wait` to let them): a
served process holds one session, but here three pools take turns on the same cores, and a
pool still spinning after its call takes the cores from the next one (on 2 cores that cut the
int8 / fp32 ratio from ~3.4x, each session timed alone, to ~2.2x; docs/benchmarks.md).

    .venv/bin/python bench/onnx_vs_torch.py --threads 2 [--models r18s32,r18_224,r50_224]

Prints a markdown table (docs/benchmarks.md, "Encoder inference: ONNX Runtime vs torch").
"""

from __future__ import annotations

import argparse
import platform
import statistics
import sys
import tempfile
import time
from collections.abc import Callable
from pathlib import Path

import numpy as np
import onnxruntime as ort
import torch

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))

from service.contract.encoder_io import ort_session_options
from service.contract.imaging import ResizePolicy
from service.contract.registry import ModelCard
from trainer.export import EmbeddingGraph, export_encoder, quantize_int8
from trainer.models import Encoder

MODELS = {  # name -> (backbone, small_stem, input size)
    "r18s32": ("resnet18", True, 32),
    "r18_224": ("resnet18", False, 224),
    "r50_224": ("resnet50", False, 224),
}
CIFAR = REPO.parent / "shared" / "data" / "cifar10-5k.npz"


def _session(path: Path, threads: int, spin_wait: bool) -> ort.InferenceSession:
    opts = ort_session_options(threads, spin_wait=spin_wait)  # the server's options
    return ort.InferenceSession(str(path), opts, providers=["CPUExecutionProvider"])


def _time_interleaved(runs: list[Callable[[], object]], min_time: float, min_iters: int) -> list[float]:
    """Median seconds per call of each of `runs`, calls interleaved, after one warm-up call each."""
    for run in runs:
        run()
    times: list[list[float]] = [[] for _ in runs]
    start = time.perf_counter()
    while len(times[0]) < min_iters or time.perf_counter() - start < min_time * len(runs) / 2:
        for run, spent in zip(runs, times, strict=True):
            t0 = time.perf_counter()
            run()
            spent.append(time.perf_counter() - t0)
    return [statistics.median(t) for t in times]


def bench_model(
    name: str, images: np.ndarray, batches: list[int], threads: int, min_time: float, spin_wait: bool = False
) -> list[str]:
    backbone, small_stem, size = MODELS[name]
    torch.manual_seed(0)
    encoder = Encoder(backbone, small_stem).eval()
    policy = ResizePolicy(size)
    card = ModelCard(
        model_id=f"bench-{name}", method="simclr", backbone=backbone, input_size=size,
        embedding_dim=encoder.feature_dim, resize_policy=policy.to_json(), created_at="1970-01-01T00:00:00Z",
    )  # fmt: skip
    rows = []
    with tempfile.TemporaryDirectory() as tmp:
        path = Path(tmp) / "model.onnx"
        diff = export_encoder(encoder, path, card=card, parity_images=policy.batch(images[:16]))
        quantize_int8(path, Path(tmp) / "model.int8.onnx", policy.batch(images[:64]))
        session = _session(path, threads, spin_wait)
        int8 = _session(Path(tmp) / "model.int8.onnx", threads, spin_wait)
        graph = EmbeddingGraph(encoder).eval()
        for batch in batches:
            x = policy.batch(images[:batch])  # [B, S, S, 3] uint8, real images
            xt = torch.from_numpy(x)

            def run_torch() -> None:
                with torch.inference_mode():
                    graph(xt)

            def run_ort() -> None:
                session.run(["embedding"], {"images": x})

            def run_int8() -> None:
                int8.run(["embedding"], {"images": x})

            s_torch, s_ort, s_int8 = _time_interleaved([run_torch, run_ort, run_int8], min_time, min_iters=3)
            ref, got = session.run(["embedding"], {"images": x})[0], int8.run(["embedding"], {"images": x})[0]
            cosine = float(np.min(np.sum(ref.astype(np.float64) * got, axis=1)))
            rows.append(
                f"| {backbone}{' small stem' if small_stem else ''} | {size} | {batch} | {batch / s_torch:.1f} "
                f"| {batch / s_ort:.1f} | {batch / s_int8:.1f} | {s_torch / s_ort:.2f}x | {s_ort / s_int8:.2f}x "
                f"| {diff:.1e} | {cosine:.4f} |"
            )
            print(rows[-1], flush=True)
    return rows


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--models", default="r18s32,r18_224", help=f"comma list of {', '.join(MODELS)}")
    parser.add_argument("--batches", default="1,8,32,64")
    parser.add_argument("--min-time", type=float, default=2.0, help="seconds of timed calls per cell and side")
    parser.add_argument("--spin-wait", action="store_true", help="let the ORT thread pools spin-wait between calls")
    args = parser.parse_args(argv)
    torch.set_num_threads(args.threads)
    with np.load(CIFAR) as data:
        images = np.ascontiguousarray(data["x_test"][:64])  # [64, 32, 32, 3]
    print(
        f"torch {torch.__version__}, onnxruntime {ort.__version__}, {platform.processor() or platform.machine()}, "
        f"{args.threads} threads both sides, ORT_ENABLE_ALL, CPUExecutionProvider\n"
    )
    print(
        "| encoder | S | batch | torch eager img/s | ORT fp32 img/s | ORT int8 img/s | ORT / torch | int8 / fp32 "
        "| parity max diff | int8 cosine min |"
    )
    print("|---|---|---|---|---|---|---|---|---|---|")
    batches = [int(b) for b in args.batches.split(",")]
    for name in args.models.split(","):
        bench_model(name, images, batches, args.threads, args.min_time, args.spin_wait)
    return 0


if __name__ == "__main__":
    sys.exit(main())
