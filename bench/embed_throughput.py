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
5. Variants (`--variants fp32,int8`, the default): the model is published with its int8
   variant (trainer.export.quantize_int8, calibrated on 256 of the images; random weights, so
   not verified: speed does not depend on them), one server per variant
   (SIMCLR_EMBED_EMBED_VARIANT), and every round measures raw ORT and /embed of each variant.

    .venv/bin/python bench/embed_throughput.py --seconds 10 --clients 32 --per-request 8 --rounds 5
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
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

from service.contract.encoder_io import ort_session_options
from service.contract.imaging import ResizePolicy
from service.contract.registry import ModelCard, ModelRegistry, VariantCard
from service.contract.variants import FP32, INT8
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

    from trainer.export import export_encoder, quantize_int8
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
    int8_path = root / "model.int8.onnx"
    quantize_int8(onnx_path, int8_path, images[:256])
    variant = VariantCard(file="model.int8.onnx", verification={"bench": "random weights, not verified"})
    card = card.model_copy(update={"variants": {INT8: variant}})
    ModelRegistry(root / "models").publish(onnx_path, card, variants={INT8: int8_path}, activate=True)
    return model_id


def raw_session(model_path: Path, threads: int, spin_wait: bool) -> ort.InferenceSession:
    """A session configured like the server's."""
    options = ort_session_options(threads, spin_wait=spin_wait)
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


def mean_batch(metrics: str) -> float:
    """Mean server batch size from a /metrics text."""
    lines = metrics.splitlines()
    sums = [float(line.split()[-1]) for line in lines if line.startswith("simclr_embed_batch_size_sum")]
    counts = [float(line.split()[-1]) for line in lines if line.startswith("simclr_embed_batch_size_count")]
    return sum(sums) / max(sum(counts), 1)


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
    parser.add_argument("--spin-wait", action="store_true", help="SIMCLR_EMBED_ORT_SPIN_WAIT=true, raw sessions alike")
    parser.add_argument("--rounds", type=int, default=3, help="alternations of raw ORT and /embed")
    parser.add_argument("--variants", default="fp32,int8", help="comma list of the variants to serve and time")
    args = parser.parse_args()

    variants = args.variants.split(",")
    images = load_images(1024, args.size)
    with tempfile.TemporaryDirectory() as tmp, contextlib.ExitStack() as servers:
        root = Path(tmp)
        model_id = publish_model(root, args.backbone, args.size, images)
        files = {FP32: "model.onnx", INT8: "model.int8.onnx"}
        sessions = {
            v: raw_session(root / "models" / model_id / files[v], args.threads, args.spin_wait) for v in variants
        }
        raw = {
            v: {int(b): raw_ort(sessions[v], images, int(b), args.seconds / 2) for b in args.batch_sizes.split(",")}
            for v in variants
        }
        best = {v: max(raw[v], key=raw[v].__getitem__) for v in variants}
        env = {
            "SIMCLR_EMBED_ORT_INTRA_OP_THREADS": str(args.threads),
            "SIMCLR_EMBED_BATCH_MAX_SIZE": str(args.batch_max_size),
            "SIMCLR_EMBED_BATCH_MAX_WAIT_MS": str(args.batch_max_wait_ms),
            "SIMCLR_EMBED_MAX_IMAGES_PER_REQUEST": str(max(64, args.per_request)),
            "SIMCLR_EMBED_ORT_SPIN_WAIT": str(args.spin_wait).lower(),
        }
        # One server per variant on the same data dir; each answers once its model is loaded.
        urls = {v: servers.enter_context(live_server(root, **env, SIMCLR_EMBED_EMBED_VARIANT=v)).url for v in variants}
        bodies = multipart_bodies(images, args.per_request)
        rounds = []  # {variant: (raw ORT at its best batch, /embed)} images/s
        for _ in range(args.rounds):
            measured = {}
            for v in variants:
                reference = raw_ort(sessions[v], images, best[v], args.seconds)
                served, count = asyncio.run(
                    http_throughput(urls[v], bodies, args.per_request, args.clients, args.seconds)
                )
                measured[v] = (reference, served)
            rounds.append(measured)
        metrics = {v: httpx.get(urls[v] + "/metrics").text for v in variants}

    print(
        f"model {model_id} ({args.backbone}, {args.size}x{args.size}), {os.cpu_count()} CPUs, "
        f"ORT {ort.__version__} {default_providers()[0]}, threads={args.threads or 'default'}"
    )
    print("\nBatch-size scan of raw ONNX Runtime (half-length windows):\n")
    print("| batch | " + " | ".join(f"{v} images/s" for v in variants) + " |\n|---:|" + "---:|" * len(variants))
    for b in raw[variants[0]]:
        print(f"| {b} | " + " | ".join(f"{raw[v][b]:.0f}" for v in variants) + " |")
    batches = ", ".join(f"{v} {mean_batch(metrics[v]):.1f}" for v in variants)
    print(
        f"\nAlternating rounds, {args.seconds:.0f} s each; /embed: {args.clients} clients x {args.per_request} "
        f"images/request, mean server batch {batches}:\n"
    )
    head = " | ".join(f"raw {v} (batch {best[v]}) | /embed {v} | /embed / raw {v}" for v in variants)
    print(f"| round | {head} |\n|---:|" + "---:|---:|---:|" * len(variants))
    for i, measured in enumerate(rounds, 1):
        cells = " | ".join(
            f"{measured[v][0]:.0f} | {measured[v][1]:.0f} | {measured[v][1] / measured[v][0]:.3f}" for v in variants
        )
        print(f"| {i} | {cells} |")
    for v in variants:
        ratio = float(np.median([m[v][1] / m[v][0] for m in rounds]))
        print(f"median /embed / raw ORT, {v} = {ratio:.3f}")
    if {FP32, INT8} <= set(variants):
        raw_ratio = float(np.median([m[INT8][0] / m[FP32][0] for m in rounds]))
        embed_ratio = float(np.median([m[INT8][1] / m[FP32][1] for m in rounds]))
        print(f"median int8 / fp32: raw ORT {raw_ratio:.2f}x, /embed {embed_ratio:.2f}x (last round: {count} images)")
    return 0


if __name__ == "__main__":
    sys.exit(main())
