"""`simclr-embed up` with no broker configured: embedded valkey-server, worker and API as
subprocesses of one command; the same end-to-end job test passes against it."""

from __future__ import annotations

import shutil
import signal
import socket
import subprocess
import sys
from collections.abc import Iterator
from pathlib import Path

import httpx
import numpy as np
import pytest

from _procs import free_port, wait_until
from jobstack import REPO, Api, base_env
from test_jobs import job_lifecycle_to_served_model

pytestmark = [pytest.mark.integration, pytest.mark.slow]


@pytest.fixture(scope="module")
def up(tmp_path_factory: pytest.TempPathFactory, digits_path: Path) -> Iterator[tuple[Api, subprocess.Popen[bytes], int]]:
    data_dir = tmp_path_factory.mktemp("up") / "data"
    (data_dir / "datasets").mkdir(parents=True)
    shutil.copyfile(digits_path, data_dir / "datasets" / "digits.npz")
    port, broker_port = free_port(), free_port()
    env = {
        **base_env(data_dir), "SIMCLR_EMBED_PORT": str(port), "SIMCLR_EMBED_EMBEDDED_BROKER_PORT": str(broker_port),
        "SIMCLR_EMBED_DEMO_ON_EMPTY": "false",
    }
    log = open(data_dir.parent / "up.log", "ab")
    proc = subprocess.Popen([sys.executable, "-m", "service.cli", "up"], cwd=REPO, env=env, stdout=log,
                            stderr=subprocess.STDOUT)
    api = Api(f"http://127.0.0.1:{port}", data_dir)

    def answering() -> bool:
        assert proc.poll() is None, (data_dir.parent / "up.log").read_text()[-3000:]
        try:
            return api.http.get("/train-jobs").status_code == 200
        except httpx.TransportError:
            return False

    wait_until(answering, 90, "`simclr-embed up` to serve the API")
    try:
        yield api, proc, broker_port
    finally:
        if proc.poll() is None:
            proc.kill()
        api.http.close()


def test_up_runs_a_job_end_to_end_on_the_embedded_broker(up, digits_path: Path) -> None:  # noqa: ANN001
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
