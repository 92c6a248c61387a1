"""Server RSS before, during and after requests of many large flat images.

`simclr-embed serve` (a subprocess over a fresh data folder with the tests' tiny encoder) gets
requests of `--images` flat PNGs of `--side` x `--side` pixels on /embed and /items, one at a
time and `--concurrent` at once. For each phase: RSS before, peak RSS during (VmHWM, reset
through /proc/<pid>/clear_refs), RSS `--settle-s` after, and the statuses answered.
`--server-tree DIR` serves from another checkout of the repository (e.g. an older commit,
unpacked by `git archive`), so old and new are measured by the same client.

    .venv/bin/python bench/decode_memory.py
    .venv/bin/python bench/decode_memory.py --server-tree /tmp/old-tree
"""

from __future__ import annotations

import argparse
import io
import json
import os
import subprocess
import sys
import tempfile
import time
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import httpx
from PIL import Image

REPO = Path(__file__).resolve().parents[1]
sys.path[:0] = [str(REPO), str(REPO / "tests")]

from _procs import free_port

from bench.load_test import build_data_dir

MiB = 1 << 20


def status_mib(pid: int, field: str) -> float:
    for line in Path(f"/proc/{pid}/status").read_text().splitlines():
        if line.startswith(field + ":"):
            return int(line.split()[1]) / 1024
    raise RuntimeError(f"no {field} for pid {pid}")


def flat_png(side: int, shade: int) -> bytes:
    buf = io.BytesIO()
    Image.new("RGB", (side, side), (shade, 255 - shade, shade // 2)).save(buf, format="PNG")
    return buf.getvalue()


def start_server(tree: Path, data_dir: Path, port: int) -> subprocess.Popen[bytes]:
    env = {k: v for k, v in os.environ.items() if not k.startswith("SIMCLR_EMBED_") and k != "PYTHONPATH"}
    env.update({"SIMCLR_EMBED_DATA_DIR": str(data_dir), "SIMCLR_EMBED_ORT_INTRA_OP_THREADS": "1"})
    cmd = [sys.executable, "-m", "service.cli", "serve", "--port", str(port), "--log-level", "warning"]
    proc = subprocess.Popen(cmd, cwd=tree, env=env)
    deadline = time.monotonic() + 180
    while True:
        try:
            if httpx.get(f"http://127.0.0.1:{port}/healthz", timeout=1).status_code == 200:
                return proc
        except httpx.TransportError:
            pass
        if proc.poll() is not None or time.monotonic() > deadline:
            raise RuntimeError("the server did not start")
        time.sleep(0.2)


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--side", type=int, default=6000, help="image side (default 36 MP, under the 40 MP limit)")
    parser.add_argument("--images", type=int, default=12, help="images per request")
    parser.add_argument("--concurrent", type=int, default=3)
    parser.add_argument("--settle-s", type=float, default=3.0, help="idle time before RSS 'after' is read")
    parser.add_argument("--server-tree", type=Path, default=REPO, help="checkout the server runs from")
    args = parser.parse_args()

    pngs = [flat_png(args.side, 40 * i % 256) for i in range(args.images)]
    with tempfile.TemporaryDirectory() as tmp:
        data_dir = build_data_dir(Path(tmp))
        port = free_port()
        proc = start_server(args.server_tree.resolve(), data_dir, port)
        url = f"http://127.0.0.1:{port}"
        tag = iter(range(10**6))

        def send(route: str) -> int:
            files = [("files", (f"f{i}.png", p, "image/png")) for i, p in enumerate(pngs)]
            data = {"ids": [f"r{next(tag)}" for _ in pngs]} if route == "items" else None
            return httpx.post(f"{url}/{route}", files=files, data=data, timeout=900).status_code

        phases = []
        try:
            for route in ("embed", "items"):
                for clients in (1, args.concurrent):
                    before = status_mib(proc.pid, "VmRSS")
                    Path(f"/proc/{proc.pid}/clear_refs").write_text("5")
                    start = time.perf_counter()
                    with ThreadPoolExecutor(clients) as pool:
                        statuses = sorted(pool.map(lambda _: send(route), range(clients)))
                    seconds = time.perf_counter() - start
                    peak = status_mib(proc.pid, "VmHWM")
                    time.sleep(args.settle_s)
                    phases.append(
                        {
                            "route": f"/{route}",
                            "requests_at_once": clients,
                            "statuses": statuses,
                            "seconds": round(seconds, 1),
                            "rss_before_mib": round(before),
                            "rss_peak_mib": round(peak),
                            "rss_after_mib": round(status_mib(proc.pid, "VmRSS")),
                        }
                    )
                    print(json.dumps(phases[-1]), flush=True)
        finally:
            proc.terminate()
            proc.wait(30)
    request_mb = sum(map(len, pngs)) / 1e6
    print(
        json.dumps(
            {
                "server_tree": str(args.server_tree),
                "images_per_request": args.images,
                "side": args.side,
                "request_mb": round(request_mb, 2),
                "phases": phases,
            }
        )
    )
    return 0


if __name__ == "__main__":
    sys.exit(main())
