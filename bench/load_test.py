"""Load test: many concurrent clients on POST /embed and POST /search against a uvicorn subprocess.

Loopback only and bounded: `--clients` asyncio clients (httpx) for `--seconds`, at most
`--max-requests` requests. The server is `simclr-embed serve` over a fresh data folder holding a
tiny published ONNX encoder (the tests' TinyEncoder, exported by trainer.export) and
`--items` indexed images. Reports requests per second, p50/p99 latency per route, error count
and the server's resident memory (VmRSS from /proc) at start, every `--rss-every` seconds, and
at the end. Exit status 1 when any request failed or RSS grew more than `--max-rss-growth-mb`
after warm-up.

    .venv/bin/python bench/load_test.py --clients 48 --seconds 150
"""

from __future__ import annotations

import argparse
import asyncio
import io
import json
import sys
import tempfile
import time
from pathlib import Path

import httpx
import numpy as np
from PIL import Image

REPO = Path(__file__).resolve().parents[1]
sys.path[:0] = [str(REPO), str(REPO / "tests")]  # the tests' fixtures module and the helpers it imports

from tests.service.conftest import DIM, SIZE, TinyEncoder, live_server

MODEL_ID = "load-tiny"


def png_bytes(array: np.ndarray) -> bytes:
    buf = io.BytesIO()
    Image.fromarray(array).save(buf, format="PNG")
    return buf.getvalue()


def noise_images(count: int, seed: int, size: int = SIZE) -> list[bytes]:
    rng = np.random.default_rng(seed)
    return [png_bytes(rng.integers(0, 256, (size, size, 3), dtype=np.uint8)) for _ in range(count)]


def build_data_dir(root: Path) -> Path:
    """`root/data` with one tiny encoder published and active (export + parity check, as the trainer does)."""
    import torch

    from service.contract.imaging import ResizePolicy
    from service.contract.registry import ModelCard, ModelRegistry
    from trainer.export import export_encoder

    torch.set_num_threads(1)
    data = root / "data"
    card = ModelCard(
        model_id=MODEL_ID,
        method="simclr",
        backbone="tiny-cnn",
        input_size=SIZE,
        embedding_dim=DIM,
        resize_policy=ResizePolicy(SIZE).to_json(),
        created_at="2024-01-01T00:00:00Z",
    )
    onnx_path = root / "tiny.onnx"
    parity = np.random.default_rng(0).integers(0, 256, (8, SIZE, SIZE, 3), dtype=np.uint8)
    export_encoder(TinyEncoder(0).eval(), onnx_path, card=card, parity_images=parity)
    ModelRegistry(data / "models").publish(onnx_path, card, activate=True)
    onnx_path.unlink()
    return data


def rss_mb(pid: int) -> float:
    """Resident set size of `pid` in MiB (VmRSS from /proc/<pid>/status)."""
    for line in Path(f"/proc/{pid}/status").read_text().splitlines():
        if line.startswith("VmRSS:"):
            return int(line.split()[1]) / 1024
    raise RuntimeError(f"no VmRSS for pid {pid}")


async def run_load(url: str, pid: int, args: argparse.Namespace, queries: list[bytes]) -> dict[str, object]:
    latencies: dict[str, list[float]] = {"embed": [], "search": []}
    errors: list[str] = []
    sent = 0
    stop_at = time.monotonic() + args.seconds
    rss = [(0.0, rss_mb(pid))]
    start = time.monotonic()

    async def client(n: int, http: httpx.AsyncClient) -> None:
        nonlocal sent
        i = n
        while time.monotonic() < stop_at and sent < args.max_requests:
            sent += 1
            image = queries[i % len(queries)]
            route = "search" if i % 2 else "embed"
            i += args.clients
            t0 = time.perf_counter()
            try:
                if route == "embed":
                    r = await http.post("/embed", files={"files": ("q.png", image, "image/png")})
                else:
                    r = await http.post("/search", files={"file": ("q.png", image, "image/png")}, data={"k": "5"})
                ok = r.status_code == 200 and (route == "embed" or len(r.json()["results"]) == 5)
            except httpx.HTTPError as exc:
                errors.append(
                    f"{route}: {type(exc).__name__} after {time.perf_counter() - t0:.3f} s "
                    f"at t={time.monotonic() - start:.0f} s: {exc}"
                )
                continue
            latencies[route].append(time.perf_counter() - t0)
            if not ok:
                errors.append(f"{route}: {r.status_code} {r.text[:200]}")

    async def sample_rss() -> None:
        while time.monotonic() < stop_at and sent < args.max_requests:
            await asyncio.sleep(args.rss_every)
            rss.append((time.monotonic() - start, rss_mb(pid)))

    # Idle connections expire on the client before uvicorn's 5 s keep-alive timeout closes them,
    # so a request is never written onto a connection the server is closing (the HTTP/1.1
    # keep-alive race, which shows up as ReadError on a loaded machine).
    limits = httpx.Limits(
        max_connections=args.clients, max_keepalive_connections=args.clients, keepalive_expiry=args.keepalive_s
    )
    async with httpx.AsyncClient(base_url=url, timeout=60, limits=limits) as http:
        sampler = asyncio.create_task(sample_rss())
        await asyncio.gather(*(client(n, http) for n in range(args.clients)))
        sampler.cancel()
    elapsed = time.monotonic() - start
    rss.append((elapsed, rss_mb(pid)))
    done = sum(len(v) for v in latencies.values())

    def pct(values: list[float], q: float) -> float:
        return float(np.percentile(np.asarray(values) * 1000, q)) if values else float("nan")

    return {
        "clients": args.clients,
        "seconds": round(elapsed, 1),
        "requests": done,
        "rps": round(done / elapsed, 1),
        **{
            f"{route}_{name}_ms": round(pct(v, q), 1)
            for route, v in latencies.items()
            for name, q in (("p50", 50), ("p99", 99))
        },
        "errors": len(errors),
        "first_errors": errors[:5],
        "rss_start_mb": round(rss[0][1], 1),
        "rss_end_mb": round(rss[-1][1], 1),
        "rss_samples": [(round(t), round(m, 1)) for t, m in rss],
    }


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--clients", type=int, default=48)
    parser.add_argument("--seconds", type=float, default=150.0)
    parser.add_argument("--max-requests", type=int, default=200_000, help="hard bound on requests sent")
    parser.add_argument("--items", type=int, default=500, help="images indexed before the load")
    parser.add_argument("--threads", type=int, default=1, help="ONNX Runtime intra-op threads in the server")
    parser.add_argument("--rss-every", type=float, default=15.0)
    parser.add_argument("--keepalive-s", type=float, default=3.0, help="client idle-connection expiry (server: 5 s)")
    parser.add_argument("--warmup-s", type=float, default=10.0, help="load before the RSS baseline is taken")
    parser.add_argument("--max-rss-growth-mb", type=float, default=25.0)
    args = parser.parse_args()

    with tempfile.TemporaryDirectory(prefix="load-test-") as tmp:
        data_dir = build_data_dir(Path(tmp))
        threads = str(args.threads)
        with live_server(data_dir, SIMCLR_EMBED_ORT_INTRA_OP_THREADS=threads, OMP_NUM_THREADS=threads) as server:
            url, proc = server.url, server.proc
            with httpx.Client(base_url=url, timeout=60) as http:
                pics = noise_images(args.items, seed=1)
                for start in range(0, args.items, 50):
                    part = pics[start : start + 50]
                    r = http.post(
                        "/items",
                        files=[("files", (f"{i}.png", p, "image/png")) for i, p in enumerate(part)],
                        data={"ids": [f"item-{start + i}" for i in range(len(part))]},
                    )
                    r.raise_for_status()
            queries = noise_images(64, seed=2)
            warm = argparse.Namespace(**{**vars(args), "seconds": args.warmup_s})
            asyncio.run(run_load(url, proc.pid, warm, queries))  # warm-up: allocator, ORT arenas, sessions
            report = asyncio.run(run_load(url, proc.pid, args, queries))
            report["server_alive"] = proc.poll() is None
    report["items"] = args.items
    print(json.dumps(report))
    growth = float(report["rss_end_mb"]) - float(report["rss_start_mb"])  # type: ignore[arg-type]
    failed = report["errors"] or growth > args.max_rss_growth_mb or not report["server_alive"]
    print(f"RSS growth after warm-up: {growth:+.1f} MiB; {'FAIL' if failed else 'ok'}")
    return 1 if failed else 0


if __name__ == "__main__":
    sys.exit(main())
