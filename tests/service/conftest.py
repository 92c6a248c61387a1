"""Service fixtures: real tiny ONNX encoders in a real registry, the app in-process, and a
real uvicorn subprocess.

The encoders are small conv nets exported by the trainer's own `export_encoder` (so they
follow the ONNX contract exactly, parity-checked on real photo patches) and published with
`ModelRegistry.publish`. Two models with different weights let tests tell them apart.
"""

from __future__ import annotations

import io
import os
import shutil
import subprocess
import sys
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path

import httpx
import numpy as np
import pytest
import torch
from _procs import STARTUP_S, free_port, wait_until
from fastapi.testclient import TestClient
from PIL import Image
from torch import nn

from service.app import create_app
from service.contract.imaging import ResizePolicy
from service.contract.registry import ModelCard, ModelRegistry
from service.settings import Settings
from trainer.export import export_encoder

REPO = Path(__file__).resolve().parents[2]
SIZE, DIM = 32, 24
MODEL_A, MODEL_B = "tiny-a", "tiny-b"


class TinyEncoder(nn.Module):
    """A two-conv stand-in for the ResNet trunk: normalised [N, 3, S, S] -> h [N, DIM]."""

    def __init__(self, seed: int) -> None:
        super().__init__()
        torch.manual_seed(seed)
        self.net = nn.Sequential(
            nn.Conv2d(3, 16, 3, stride=2, padding=1),
            nn.BatchNorm2d(16),
            nn.ReLU(),
            nn.Conv2d(16, DIM, 3, stride=2, padding=1),
            nn.ReLU(),
            nn.AdaptiveAvgPool2d(1),
            nn.Flatten(),
        )
        self.feature_dim = DIM

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.net(x)  # [N, DIM]


def _card(model_id: str) -> ModelCard:
    return ModelCard(
        model_id=model_id,
        method="simclr",
        backbone="tiny-cnn",
        input_size=SIZE,
        embedding_dim=DIM,
        resize_policy=ResizePolicy(SIZE).to_json(),
        created_at=f"2024-01-01T00:00:0{model_id[-1] == 'b':d}Z",
    )


@dataclass(frozen=True)
class Models:
    root: Path  # a data_dir template holding models/ with MODEL_A active and MODEL_B published
    encoders: dict[str, TinyEncoder]


@pytest.fixture(scope="session")
def models(tmp_path_factory: pytest.TempPathFactory, photos: np.ndarray) -> Models:
    root = tmp_path_factory.mktemp("template")
    registry = ModelRegistry(root / "models")
    encoders = {}
    torch.set_num_threads(1)
    for seed, model_id in enumerate((MODEL_A, MODEL_B)):
        encoder = TinyEncoder(seed).eval()
        card = _card(model_id)
        onnx_path = root / f"{model_id}.onnx"
        export_encoder(encoder, onnx_path, card=card, parity_images=photos[:16])
        registry.publish(onnx_path, card, activate=model_id == MODEL_A)
        onnx_path.unlink()
        encoders[model_id] = encoder
    return Models(root, encoders)


@pytest.fixture
def data_dir(models: Models, tmp_path: Path) -> Path:
    """A private copy of the template registry (tests activate and corrupt models)."""
    target = tmp_path / "data"
    shutil.copytree(models.root, target)
    return target


def make_settings(data_dir: Path, **overrides: object) -> Settings:
    return Settings(data_dir=data_dir, ort_intra_op_threads=1, active_poll_s=0.2, **overrides)


@pytest.fixture
def client(data_dir: Path) -> Iterator[TestClient]:
    """The app in-process (lifespan run); server errors come back as responses, not raised."""
    with TestClient(create_app(make_settings(data_dir)), raise_server_exceptions=False) as c:
        yield c


def png(array: np.ndarray, **save: object) -> bytes:
    buf = io.BytesIO()
    Image.fromarray(array).save(buf, format=save.pop("format", "PNG"), **save)
    return buf.getvalue()


def parse_vectors(response: httpx.Response) -> np.ndarray:
    """The float32 vectors a client gets: JSON numbers parsed as float64, then cast."""
    return np.asarray(response.json()["embeddings"], dtype=np.float64).astype(np.float32)


@dataclass
class LiveServer:
    url: str
    proc: subprocess.Popen[bytes]
    log: Path


@contextmanager
def live_server(data_dir: Path, **env: str) -> Iterator[LiveServer]:
    """`simclr-embed serve` in a subprocess on a free loopback port, once /healthz answers.

    The server sees none of the caller's own `SIMCLR_EMBED_*` variables, only `env` over these
    defaults (one ONNX Runtime thread, a quick active-model poll)."""
    port = free_port()
    log = data_dir / f"server-{port}.log"
    environ = {k: v for k, v in os.environ.items() if not k.startswith("SIMCLR_EMBED_")}
    environ.update(
        {
            "SIMCLR_EMBED_DATA_DIR": str(data_dir),
            "SIMCLR_EMBED_ORT_INTRA_OP_THREADS": "1",
            "SIMCLR_EMBED_ACTIVE_POLL_S": "0.2",
            **env,
        }
    )
    with open(log, "wb") as out:
        proc = subprocess.Popen(
            [
                sys.executable,
                "-m",
                "service.cli",
                "serve",
                "--host",
                "127.0.0.1",
                "--port",
                str(port),
                "--log-level",
                "warning",
            ],
            cwd=REPO,
            env=environ,
            stdout=out,
            stderr=subprocess.STDOUT,
        )
    server = LiveServer(f"http://127.0.0.1:{port}", proc, log)

    def up() -> bool:
        if proc.poll() is not None:
            pytest.fail(f"the server exited with {proc.returncode}:\n{log.read_text()[-3000:]}")
        try:
            return httpx.get(server.url + "/healthz", timeout=1).status_code == 200
        except httpx.TransportError:
            return False

    try:
        wait_until(up, STARTUP_S, "the API server to answer /healthz", every_s=0.1)
        yield server
    finally:
        proc.terminate()
        try:
            proc.wait(20)
        except subprocess.TimeoutExpired:
            proc.kill()
            proc.wait()


def direct_ort(data_dir: Path, model_id: str, images: list[Image.Image] | np.ndarray) -> np.ndarray:
    """What ONNX Runtime alone gives: its own session on the model file, the resize policy
    applied by hand. PIL images or uint8 [N, S, S, 3] -> float32 [N, D]."""
    import onnxruntime as ort

    batch = images if isinstance(images, np.ndarray) else ResizePolicy(SIZE).batch(images)  # [N, S, S, 3]
    options = ort.SessionOptions()
    options.intra_op_num_threads = 1
    session = ort.InferenceSession(
        str(data_dir / "models" / model_id / "model.onnx"), options, providers=["CPUExecutionProvider"]
    )
    return session.run(["embedding"], {"images": batch})[0]


def multipart(images: list[bytes]) -> list[tuple[str, tuple[str, bytes, str]]]:
    return [("files", (f"img{i}.png", data, "application/octet-stream")) for i, data in enumerate(images)]
