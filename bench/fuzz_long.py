"""The long API fuzzing run: the schemathesis CLI against `simclr-embed serve` in a subprocess.

The server gets a fresh data folder with a tiny published ONNX encoder, `--items` indexed
images, a private redis-server as broker and a dataset root, so every operation runs real
code. Binary/base64 fields draw real images (tests/hardening/fuzz_formats.py, loaded as
schemathesis hooks). After the run the server must still answer /healthz and be alive.

    .venv/bin/python bench/fuzz_long.py --max-examples 300 --max-time 900

Extra arguments after `--` go to `schemathesis run` (e.g. `-- --checks not_a_server_error`).
"""

from __future__ import annotations

import argparse
import os
import shutil
import subprocess
import sys
import tempfile
from pathlib import Path

import httpx
from load_test import REPO, build_data_dir, live_server, noise_images  # bench/ is sys.path[0]

sys.path.insert(0, str(REPO / "tests"))
from _procs import RedisServer

# Checks the schema cannot satisfy, with the reason (docs/reliability.md, "Excluded everywhere"):
# positive_data_acceptance: the schema cannot say "bytes that decode as an image", so a
#   schema-valid random blob is rightly refused with 415/422;
# allow_header_conformance: Starlette's 405 lists only the first matching route's methods;
# use_after_free: `DELETE /train-jobs/{id}` cancels a job, whose record stays readable (state
#   `cancelled`) by design; DELETE-then-404 for items is checked in tests/service/items.
EXCLUDED = ["positive_data_acceptance", "allow_header_conformance", "use_after_free"]


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--max-examples", type=int, default=300)
    parser.add_argument("--max-time", type=int, default=900, help="seconds for the whole schemathesis run")
    parser.add_argument("--items", type=int, default=50)
    parser.add_argument("extra", nargs="*", help="arguments passed to `schemathesis run`")
    args = parser.parse_args()

    with tempfile.TemporaryDirectory(prefix="fuzz-long-") as tmp:
        root = Path(tmp)
        data_dir = build_data_dir(root)
        (data_dir / "datasets" / "folder").mkdir(parents=True)
        redis = RedisServer(root / "redis")
        redis.start()
        try:
            env = {"SIMCLR_EMBED_BROKER_URL": redis.url, "SIMCLR_EMBED_MAX_UPLOAD_BYTES": str(1 << 20)}
            with live_server(data_dir, **env) as server:
                url, proc = server.url, server.proc
                files = [("files", (f"{i}.png", p, "image/png")) for i, p in enumerate(noise_images(args.items, 3))]
                httpx.post(
                    url + "/items", files=files, data={"ids": [f"seed-{i}" for i in range(args.items)]}, timeout=120
                ).raise_for_status()
                cli_env = {
                    **os.environ,
                    "SCHEMATHESIS_HOOKS": "tests.hardening.fuzz_formats",
                    "PYTHONPATH": os.pathsep.join([str(REPO), os.environ.get("PYTHONPATH", "")]),
                }
                cmd = [
                    shutil.which("schemathesis", path=str(Path(sys.executable).parent)) or "schemathesis",
                    "run",
                    f"{url}/openapi.json",
                    "--checks",
                    "all",
                    "--exclude-checks",
                    ",".join(EXCLUDED),
                    "--max-examples",
                    str(args.max_examples),
                    "--max-time",
                    str(args.max_time),
                    "--request-timeout",
                    "30",
                    "--max-response-time",
                    "10",
                    "--suppress-health-check",
                    "all",
                    "--no-color",
                    *args.extra,
                ]
                print("$", " ".join(cmd), flush=True)
                code = subprocess.call(cmd, cwd=REPO, env=cli_env)
                alive = proc.poll() is None and httpx.get(url + "/healthz", timeout=5).status_code == 200
                print(f"schemathesis exit status {code}; server alive and healthy afterwards: {alive}")
                return code if alive else 2
        finally:
            redis.stop()


if __name__ == "__main__":
    sys.exit(main())
