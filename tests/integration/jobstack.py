"""The job stack as real processes: a private redis-server, `simclr-embed worker` subprocesses
(Celery, solo pool: not eager mode) and the API under uvicorn, all on free ports with a tmp data
folder. Tests start, kill and restart its parts through `Stack`."""

from __future__ import annotations

import io
import json
import os
import signal
import subprocess
import sys
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import httpx
import numpy as np
import pytest
from _procs import STARTUP_S, RedisServer, free_port, wait_until
from PIL import Image

from service.contract.registry import ModelRegistry

REPO = Path(__file__).resolve().parents[2]
LOCK_TTL_S = 3.0  # a killed worker's job is re-sent about this long after its last heartbeat

# The tiny run every test uses: seconds on one CPU thread, checkpoints every 2 steps.
TINY_JOB: dict[str, Any] = {
    "method": "simclr",
    "backbone": "resnet18",
    "small_stem": True,
    "image_size": 16,
    "batch_size": 16,
    "epochs": 1,
    "max_steps": 6,
    "warmup_epochs": 0.0,
    "num_workers": 0,
    "checkpoint_every_steps": 2,
    "log_every_steps": 1,
    "precision": "fp32",
    "channels_last": False,
}


def png(image: np.ndarray) -> bytes:
    buf = io.BytesIO()
    Image.fromarray(image).save(buf, format="PNG")
    return buf.getvalue()


def base_env(data_dir: Path) -> dict[str, str]:
    env = {k: v for k, v in os.environ.items() if not k.startswith("SIMCLR_EMBED_")}
    env.update(
        {
            "SIMCLR_EMBED_DATA_DIR": str(data_dir),
            "SIMCLR_EMBED_DATASET_ROOTS": str(data_dir / "datasets"),
            "SIMCLR_EMBED_JOB_LOCK_TTL_S": str(LOCK_TTL_S),
            "OMP_NUM_THREADS": "1",
            "MKL_NUM_THREADS": "1",
            "PYTHONUNBUFFERED": "1",
        }
    )
    return env


class Api:
    """HTTP helpers over one API base URL (used for the test stack and for `simclr-embed up`)."""

    def __init__(self, base_url: str, data_dir: Path) -> None:
        self.base_url = base_url
        self.http = httpx.Client(base_url=base_url, timeout=30)
        self.data_dir = data_dir
        self.registry = ModelRegistry(data_dir / "models")

    def submit(self, dataset: str = "digits.npz", **overrides: Any) -> str:
        answer = self.http.post("/train-jobs", json={**TINY_JOB, "dataset": dataset, **overrides})
        assert answer.status_code == 202, answer.text
        return answer.json()["id"]

    def job(self, job_id: str) -> dict[str, Any]:
        answer = self.http.get(f"/train-jobs/{job_id}")
        assert answer.status_code == 200, answer.text
        return answer.json()

    def wait_state(self, job_id: str, state: str, timeout_s: float) -> dict[str, Any]:
        def reached() -> dict[str, Any] | None:
            job = self.job(job_id)
            if job["state"] in ("failed", "cancelled", "succeeded") and job["state"] != state:
                pytest.fail(f"job {job_id} ended {job['state']} (wanted {state}): {job.get('error')}")
            return job if job["state"] == state else None

        return wait_until(reached, timeout_s, f"job {job_id} to be {state}", every_s=0.25)

    def run_dir(self, job_id: str) -> Path:
        return self.data_dir / "jobs" / job_id

    def store_digits_under_a_new_model(
        self,
        digits_path: Path,
        prefix: str,
        classes: Sequence[int],
        per_class: int,
        label_field: str = "digit",
        **metadata: Any,
    ) -> tuple[str, str, list[str], list[int]]:
        """Pretrain a tiny model (activated), wait until the API serves it, then store the first
        `per_class` test digits of each of `classes` as items `<prefix>-<index>` with metadata
        {label_field: digit, **metadata}. Returns (job id, model id, item ids, their digits)."""
        job_id = self.submit(max_steps=4, activate=True)
        model_id = self.wait_state(job_id, "succeeded", 240)["model_id"]
        with np.load(digits_path) as data:
            x, y = data["x_test"], data["y_test"]  # [N, 8, 8, 1] uint8, [N]
        picks = np.concatenate([np.flatnonzero(y == c)[:per_class] for c in classes])
        ids, labels = [f"{prefix}-{i}" for i in picks], [int(y[p]) for p in picks]
        files = [("files", (f"{i}.png", png(np.repeat(x[p], 3, axis=-1)), "image/png")) for i, p in zip(ids, picks)]
        meta = [json.dumps({label_field: label, **metadata}) for label in labels]

        def added() -> bool:  # the API serves the new model once it picked up the activation
            index = self.http.get("/readyz").json()["checks"].get("index", "")
            if not (index.startswith(f"ok: {model_id},") or index.startswith(f"ok: {model_id}@")):
                return False
            answer = self.http.post("/items?replace=true", files=files, data={"ids": ids, "metadata": meta})
            assert answer.status_code == 201, answer.text
            return True

        wait_until(added, 60, f"the API to serve {model_id} and take the digits")
        return job_id, model_id, ids, labels


class Stack(Api):
    def __init__(self, tmp: Path, env: dict[str, str] | None = None) -> None:
        """`env`: settings of this stack's API and workers beyond the base ones (SIMCLR_EMBED_*)."""
        self.tmp = tmp
        self.redis = RedisServer(tmp / "redis")
        self.redis.start()
        self.env = {**base_env(tmp / "data"), "SIMCLR_EMBED_BROKER_URL": self.redis.url, **(env or {})}
        self.workers: list[subprocess.Popen[bytes]] = []
        port = free_port()
        self.api = self._spawn(
            "api",
            [
                sys.executable,
                "-m",
                "uvicorn",
                "--factory",
                "service.app:create_app",
                "--host",
                "127.0.0.1",
                "--port",
                str(port),
            ],
        )
        super().__init__(f"http://127.0.0.1:{port}", tmp / "data")
        try:
            wait_until(self._api_up, STARTUP_S, "the API to answer")
        except BaseException:
            self.close()  # a stack that never came up leaves no server behind
            raise

    def _spawn(self, name: str, cmd: list[str]) -> subprocess.Popen[bytes]:
        log = open(self.tmp / f"{name}.log", "ab")
        return subprocess.Popen(cmd, cwd=REPO, env=self.env, stdout=log, stderr=subprocess.STDOUT)

    def _api_up(self) -> bool:
        assert self.api.poll() is None, (self.tmp / "api.log").read_text()[-3000:]
        try:
            return self.http.get("/healthz").status_code == 200  # open even when keys guard reads
        except httpx.TransportError:
            return False

    def start_worker(self) -> subprocess.Popen[bytes]:
        proc = self._spawn(f"worker-{len(self.workers)}", [sys.executable, "-m", "service.cli", "worker"])
        self.workers.append(proc)
        return proc

    def worker_log(self, proc: subprocess.Popen[bytes]) -> str:
        return (self.tmp / f"worker-{self.workers.index(proc)}.log").read_text(errors="replace")

    def live_workers(self) -> list[subprocess.Popen[bytes]]:
        return [w for w in self.workers if w.poll() is None]

    def kill_worker(self, proc: subprocess.Popen[bytes]) -> None:
        proc.send_signal(signal.SIGKILL)
        proc.wait(10)

    def close(self) -> None:
        for proc in [*self.workers, self.api]:
            if proc.poll() is None:
                proc.terminate()
        for proc in [*self.workers, self.api]:
            try:
                proc.wait(30)
            except subprocess.TimeoutExpired:
                proc.kill()
        self.http.close()
        self.redis.stop()
