"""`simclr-embed up` with no broker configured: embedded valkey-server, worker and API as
subprocesses of one command; the same end-to-end job test passes against it."""

from __future__ import annotations

import shutil
import signal
import socket
import subprocess
import sys
import time
from collections.abc import Iterator
from pathlib import Path

import httpx
import numpy as np
import pytest
from _procs import STARTUP_S, free_port, wait_until
from jobstack import REPO, Api, base_env
from test_jobs import job_lifecycle_to_served_model

from service.contract.variants import vector_space

pytestmark = [pytest.mark.integration, pytest.mark.slow]


def start_up(data_dir: Path, **env: str) -> tuple[Api, subprocess.Popen[bytes], int]:
    """`simclr-embed up` over `data_dir` on free ports; returns once its API answers."""
    port, broker_port = free_port(), free_port()
    env = {
        **base_env(data_dir),
        "SIMCLR_EMBED_PORT": str(port),
        "SIMCLR_EMBED_EMBEDDED_BROKER_PORT": str(broker_port),
        **env,
    }
    log_path = data_dir.parent / "up.log"
    with open(log_path, "ab") as log:
        proc = subprocess.Popen(
            [sys.executable, "-m", "service.cli", "up"], cwd=REPO, env=env, stdout=log, stderr=subprocess.STDOUT
        )
    api = Api(f"http://127.0.0.1:{port}", data_dir)

    def answering() -> bool:
        assert proc.poll() is None, log_path.read_text()[-3000:]
        try:
            return api.http.get("/train-jobs").status_code == 200
        except httpx.TransportError:
            return False

    wait_until(answering, STARTUP_S, "`simclr-embed up` to serve the API")
    return api, proc, broker_port


def stop_up(api: Api, proc: subprocess.Popen[bytes]) -> None:
    if proc.poll() is None:
        proc.send_signal(signal.SIGTERM)
        try:
            proc.wait(90)
        except subprocess.TimeoutExpired:
            proc.kill()
    api.http.close()


@pytest.fixture(scope="module")
def up(
    tmp_path_factory: pytest.TempPathFactory, digits_path: Path
) -> Iterator[tuple[Api, subprocess.Popen[bytes], int]]:
    data_dir = tmp_path_factory.mktemp("up") / "data"
    (data_dir / "datasets").mkdir(parents=True)
    shutil.copyfile(digits_path, data_dir / "datasets" / "digits.npz")
    api, proc, broker_port = start_up(data_dir, SIMCLR_EMBED_DEMO_ON_EMPTY="false")
    try:
        yield api, proc, broker_port
    finally:
        if proc.poll() is None:
            proc.kill()
        api.http.close()


def test_up_runs_a_job_end_to_end_on_the_embedded_broker(up, digits_path: Path) -> None:
    api, proc, broker_port = up
    with np.load(digits_path) as data:
        digits = data["x_test"][:16]
    job_lifecycle_to_served_model(api, digits)
    assert (api.data_dir / "broker" / "appendonlydir").is_dir()  # the embedded broker persists to the data folder

    proc.send_signal(signal.SIGTERM)
    assert proc.wait(90) == 0
    with pytest.raises(httpx.TransportError):
        httpx.get(f"{api.base_url}/train-jobs", timeout=2)
    with pytest.raises(OSError):  # the embedded broker stopped with it
        socket.create_connection(("127.0.0.1", broker_port), timeout=1).close()


def children_of(pid: int) -> set[int]:
    """Direct children of `pid`, from /proc (`up` starts broker, worker and API in sessions of their own)."""
    found: set[int] = set()
    for task in Path(f"/proc/{pid}/task").iterdir():
        found.update(int(c) for c in (task / "children").read_text().split())
    return found


def alive(pid: int) -> bool:
    try:
        state = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()[0]
    except FileNotFoundError:
        return False
    return state != "Z"


def test_a_burst_of_signals_stops_up_and_every_child(tmp_path: Path) -> None:
    """`make up` forwards SIGTERM to its child, so a group kill delivers several: each lands in the
    stop handler or in the main loop's wait; `up` must still stop broker, worker and API in time."""
    api, proc, _ = start_up(tmp_path / "data", SIMCLR_EMBED_DEMO_ON_EMPTY="false")
    try:
        children = children_of(proc.pid)
        assert len(children) == 3, children  # broker, worker, API
        for sig in (signal.SIGTERM, signal.SIGTERM, signal.SIGINT, signal.SIGTERM, signal.SIGINT):
            proc.send_signal(sig)
        grace_s = 15 + 60 + 15  # `up` gives the API, the worker and the broker these in turn
        assert proc.wait(grace_s) == 0
        assert not [c for c in children if alive(c)], "children left running after `up` stopped"
    finally:
        stop_up(api, proc)


def test_first_start_trains_the_demo_and_search_works(tmp_path: Path) -> None:
    """A fresh data folder and no dataset of the user's: `up` writes scikit-learn's digits, trains
    the demo encoder through the job queue, activates it and indexes 300 digits; a restart does not
    train it again. Needs no ../shared data: this is what a fresh clone gets."""
    data_dir = tmp_path / "data"
    api, proc, _ = start_up(data_dir)  # the demo is on by default
    try:

        def indexed() -> dict | None:
            page = api.http.get("/items", params={"limit": 1000}).json()
            return page if page["total"] == 300 else None

        page = wait_until(indexed, 900, "the demo to train, activate and index 300 digits", every_s=2)
        jobs = api.http.get("/train-jobs").json()["items"]
        assert [j["state"] for j in jobs] == ["succeeded"] and jobs[0]["name"].startswith("demo")
        models = api.http.get("/models").json()
        active, space = models["active"], vector_space(models["active"], models["active_variant"])
        # vectors of the variant this deployment embeds with (int8 where its export verified one)
        assert active == jobs[0]["model_id"] and all(i["models"] == [space] for i in page["items"])

        # Each digit finds itself at score 1 (first, or tied with an identical scan); its nearest
        # other digit mostly has the same label (chance: 10%).
        labels = {i["id"]: i["metadata"]["label"] for i in page["items"]}
        same = 0
        for item_id in list(labels)[:50]:
            hits = api.http.post("/search", json={"item_id": item_id, "k": 3}).json()["results"]
            assert item_id in [h["id"] for h in hits[:2]] and hits[0]["score"] > 0.9999, hits
            nearest = next(h["id"] for h in hits if h["id"] != item_id)
            same += labels[nearest] == labels[item_id]
        assert same >= 40, f"{same}/50 nearest neighbours share the label"
    finally:
        stop_up(api, proc)
    assert proc.returncode == 0

    assert (data_dir / "demo-complete").is_file()  # written once the digits are indexed

    api, proc, _ = start_up(data_dir)
    try:
        time.sleep(3)  # the demo thread would have submitted by now
        assert api.http.get("/train-jobs").json()["total"] == 1
        assert api.http.get("/items").json()["total"] == 300
    finally:
        stop_up(api, proc)

    # What a crash after the demo model was published, before its digits were indexed, leaves:
    # the job succeeded and its model active, no items, no completion marker. The next start
    # indexes the digits with that model and trains nothing new.
    (data_dir / "demo-complete").unlink()
    shutil.rmtree(data_dir / "items")
    api, proc, _ = start_up(data_dir)
    try:
        page = wait_until(indexed, 300, "the restarted demo to index its 300 digits", every_s=2)
        assert api.http.get("/train-jobs").json()["total"] == 1
        assert all(i["models"] == [space] for i in page["items"])
        wait_until((data_dir / "demo-complete").is_file, 30, "the demo's completion marker")
    finally:
        stop_up(api, proc)
