"""/embed throughput through the real server vs raw ONNX Runtime, same model, same machine, one run.

1. Export an encoder (ResNet-18 with the CIFAR stem by default, random weights: speed does not
   depend on training) with the trainer's own exporter into a fresh registry.
2. Raw ONNX Runtime: one session configured like the server's (ORT_ENABLE_ALL, same thread
   counts), already-preprocessed uint8 batches, throughput at each batch size; the best one
   is the reference.
3. /embed: `simclr-embed serve` (uvicorn) on loopback; `--clients` concurrent asyncio clients
   post PNG-encoded CIFAR images (`--per-request` per request, multipart) for `--seconds`;
   every response is checked (200, right number of vectors). Includes decoding, resizing,
   micro-batching, JSON encoding, HTTP, and the clients themselves, which share the CPU.
4. Rounds: raw ORT at its best batch size and /embed alternate `--rounds` times, so that load
   from other processes drifting over the run hits both alike; the ratio of each round and the
   median ratio are reported.

    .venv/bin/python bench/embed_throughput.py --seconds 10 --clients 32 --per-request 8 --rounds 5
"""

from __future__ import annotations

import argparse
import asyncio
import io
import os
import sys
import tempfile
import time
from pathlib import Path

import httpx
import numpy as np
import onnxruntime as ort
from PIL import Image

REPO = Path(__file__).resolve().parents[1]
sys.path[:0] = [str(REPO), str(REPO / "tests")]  # the tests' server fixture and the helpers it imports

from service.contract.imaging import ResizePolicy
from service.contract.registry import ModelCard, ModelRegistry
from service.runtime import default_providers
from tests.service.conftest import live_server


def load_images(count: int, size: int) -> np.ndarray:
    """Real CIFAR-10 test images when ../shared/data has them, else noise; uint8 [count, S, S, 3]."""
    path = REPO.parent / "shared" / "data" / "cifar10-5k.npz"
    if path.is_file():
        with np.load(path) as data:
            images = data["x_test"][:count]
    else:
        images = np.random.default_rng(0).integers(0, 256, (count, 32, 32, 3), dtype=np.uint8)
    return ResizePolicy(size).batch(images)


def publish_model(root: Path, backbone: str, size: int, images: np.ndarray) -> str:
    import torch

    from trainer.export import export_encoder
    from trainer.models import Encoder

    torch.manual_seed(0)
    encoder = Encoder(backbone, small_stem=size <= 64).eval()
    model_id = f"bench-{backbone}-{size}"
    card = ModelCard(
        model_id=model_id,
        method="simclr",
        backbone=backbone,
        input_size=size,
        embedding_dim=encoder.feature_dim,
        resize_policy=ResizePolicy(size).to_json(),
        created_at="2024-01-01T00:00:00Z",
    )
    onnx_path = root / "model.onnx"
    export_encoder(encoder, onnx_path, card=card, parity_images=images[:8])
    ModelRegistry(root / "models").publish(onnx_path, card, activate=True)
    return model_id


def raw_session(model_path: Path, threads: int) -> ort.InferenceSession:
    """A session configured like the server's."""
    options = ort.SessionOptions()
    options.graph_optimization_level = ort.GraphOptimizationLevel.ORT_ENABLE_ALL
    options.execution_mode = ort.ExecutionMode.ORT_SEQUENTIAL
    options.intra_op_num_threads = threads
    return ort.InferenceSession(str(model_path), options, providers=default_providers())


def raw_ort(session: ort.InferenceSession, images: np.ndarray, batch: int, seconds: float) -> float:
    """Images per second of session.run at one batch size (inputs already preprocessed)."""
    inputs = np.ascontiguousarray(np.resize(images, (batch, *images.shape[1:])))
    session.run(["embedding"], {"images": inputs})  # warm-up
    done, start = 0, time.perf_counter()
    while (elapsed := time.perf_counter() - start) < seconds:
        session.run(["embedding"], {"images": inputs})
        done += batch
    return done / elapsed


async def http_throughput(
    url: str, bodies: list[tuple[bytes, str]], per_request: int, clients: int, seconds: float
) -> tuple[float, int]:
    """Images per second over `clients` concurrent connections; every answer checked."""
    limits = httpx.Limits(max_connections=clients, max_keepalive_connections=clients)
    async with httpx.AsyncClient(base_url=url, timeout=60, limits=limits) as http:
        for body, ctype in bodies[:2]:  # warm-up
            (await http.post("/embed", content=body, headers={"Content-Type": ctype})).raise_for_status()
        done = 0
        deadline = time.perf_counter() + seconds

        async def client(i: int) -> None:
            nonlocal done
            k = i
            while time.perf_counter() < deadline:
                body, ctype = bodies[k % len(bodies)]
                r = await http.post("/embed", content=body, headers={"Content-Type": ctype})
                if r.status_code != 200 or r.content.count(b"],") != per_request - 1:
                    raise RuntimeError(f"bad answer {r.status_code}: {r.text[:200]}")
                done += per_request
                k += clients

        start = time.perf_counter()
        await asyncio.gather(*(client(i) for i in range(clients)))
        return done / (time.perf_counter() - start), done


def multipart_bodies(images: np.ndarray, per_request: int) -> list[tuple[bytes, str]]:
    """Pre-encoded multipart bodies (PNG files), so the clients spend little CPU building them."""
    bodies = []
    boundary = "benchboundary7f3a"
    for start in range(0, len(images) - per_request + 1, per_request):
        parts = []
        for j, arr in enumerate(images[start : start + per_request]):
            buf = io.BytesIO()
            Image.fromarray(arr).save(buf, format="PNG")
            parts.append(
                f'--{boundary}\r\nContent-Disposition: form-data; name="files"; filename="{j}.png"\r\n'
                f"Content-Type: image/png\r\n\r\n".encode()
                + buf.getvalue()
                + b"\r\n"
            )
        bodies.append((b"".join(parts) + f"--{boundary}--\r\n".encode(), f"multipart/form-data; boundary={boundary}"))
    return bodies


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--backbone", default="resnet18")
    parser.add_argument("--size", type=int, default=32)
    parser.add_argument("--seconds", type=float, default=10.0, help="per measurement")
    parser.add_argument("--clients", type=int, default=32)
    parser.add_argument("--per-request", type=int, default=8)
    parser.add_argument("--batch-sizes", default="1,8,16,32,64,128")
    parser.add_argument("--batch-max-size", type=int, default=64)
    parser.add_argument("--batch-max-wait-ms", type=float, default=2.0)
    parser.add_argument("--threads", type=int, default=0, help="ONNX Runtime intra-op threads (0 = all cores)")
    parser.add_argument("--rounds", type=int, default=3, help="alternations of raw ORT and /embed")
    args = parser.parse_args()

    images = load_images(1024, args.size)
    with tempfile.TemporaryDirectory() as tmp:
        root = Path(tmp)
        model_id = publish_model(root, args.backbone, args.size, images)
        model_path = root / "models" / model_id / "model.onnx"
        session = raw_session(model_path, args.threads)
        raw = {int(b): raw_ort(session, images, int(b), args.seconds / 2) for b in args.batch_sizes.split(",")}
        best_b = max(raw, key=raw.__getitem__)

        env = {
            "SIMCLR_EMBED_ORT_INTRA_OP_THREADS": str(args.threads),
            "SIMCLR_EMBED_BATCH_MAX_SIZE": str(args.batch_max_size),
            "SIMCLR_EMBED_BATCH_MAX_WAIT_MS": str(args.batch_max_wait_ms),
            "SIMCLR_EMBED_MAX_IMAGES_PER_REQUEST": str(max(64, args.per_request)),
        }
        with live_server(root, **env) as server:  # answers once its lifespan has loaded the model
            bodies = multipart_bodies(images, args.per_request)
            rounds = []  # (raw ORT at best_b, /embed) images/s
            for _ in range(args.rounds):
                reference = raw_ort(session, images, best_b, args.seconds)
                served, count = asyncio.run(
                    http_throughput(server.url, bodies, args.per_request, args.clients, args.seconds)
                )
                rounds.append((reference, served))
            metrics = httpx.get(server.url + "/metrics").text

    sums = [float(line.split()[-1]) for line in metrics.splitlines() if line.startswith("simclr_embed_batch_size_sum")]
    counts = [
        float(line.split()[-1]) for line in metrics.splitlines() if line.startswith("simclr_embed_batch_size_count")
    ]
    mean_batch = sum(sums) / max(sum(counts), 1)
    print(
        f"model {model_id} ({args.backbone}, {args.size}x{args.size}), {os.cpu_count()} CPUs, "
        f"ORT {ort.__version__} {default_providers()[0]}, threads={args.threads or 'default'}"
    )
    print("\nBatch-size scan of raw ONNX Runtime (half-length windows):\n")
    print("| batch | images/s |\n|---:|---:|")
    for b, v in raw.items():
        print(f"| {b} | {v:.0f} |")
    print(
        f"\nAlternating rounds, {args.seconds:.0f} s each; /embed: {args.clients} clients x {args.per_request} "
        f"images/request, mean server batch {mean_batch:.1f}:\n"
    )
    print(f"| round | raw ORT batch {best_b} images/s | POST /embed images/s | /embed / raw |\n|---:|---:|---:|---:|")
    ratios = []
    for i, (reference, served) in enumerate(rounds, 1):
        ratios.append(served / reference)
        print(f"| {i} | {reference:.0f} | {served:.0f} | {ratios[-1]:.3f} |")
    print(f"\nmedian /embed / raw ORT = {float(np.median(ratios)):.3f} (last round: {count} images served)")
    return 0


if __name__ == "__main__":
    sys.exit(main())
