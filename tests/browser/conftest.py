"""Browser fixtures: a real headless Chromium (Debian's chromium + chromedriver) driving the page
that a real API subprocess serves.

The service side is the jobs tests' `Stack` (tests/integration/jobstack.py): a private
redis-server, the API under uvicorn and, when a test asks, a `simclr-embed worker` subprocess,
all on free ports over a tmp data folder. Before the API starts, the data folder gets two
published ONNX encoders (real ResNet-18s, exported by the trainer's own `export_encoder`, `enc-a`
active) and digits.npz as a dataset.

Each test saves a screenshot to tests/artifacts/screenshots/<name>.png (ignored; look there when a
test fails). The README's pictures come from the demo's trained model instead:
tools/readme_screenshots.py.
"""

from __future__ import annotations

import shutil
import sys
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "integration"))  # jobstack lives beside its tests

from _procs import STARTUP_S, wait_until
from jobstack import Stack
from pages import chromium_installed, save_screenshot, start_chromium

REPO = Path(__file__).resolve().parents[2]
SCREENSHOTS = REPO / "tests" / "artifacts" / "screenshots"  # ignored: a test run leaves the tree clean
MODEL_A, MODEL_B = "enc-a", "enc-b"
SIZE = 16
API_KEY = "browser-test-key-1"


@pytest.fixture(scope="session")
def digit_images(digits_path: Path) -> np.ndarray:
    """Real scans, one per class 0-9: uint8 [10, 16, 16, 3] (8x8 grey upscaled 2x, as RGB)."""
    with np.load(digits_path) as data:
        x, y = data["x_test"], data["y_test"]
    first = [int(np.flatnonzero(y == c)[0]) for c in range(10)]
    return np.repeat(x[first].repeat(2, axis=1).repeat(2, axis=2), 3, axis=-1)


@pytest.fixture(scope="session")
def models_template(tmp_path_factory: pytest.TempPathFactory, digit_images: np.ndarray) -> Path:
    """A models/ registry with two randomly initialised ResNet-18 encoders, `enc-a` active."""
    import torch

    from service.contract.imaging import ResizePolicy
    from service.contract.registry import ModelCard, ModelRegistry
    from trainer.export import export_encoder
    from trainer.models import Encoder

    root = tmp_path_factory.mktemp("web-models")
    registry = ModelRegistry(root / "models")
    torch.set_num_threads(1)
    for seed, model_id in enumerate((MODEL_A, MODEL_B)):
        torch.manual_seed(seed)
        card = ModelCard(
            model_id=model_id,
            method="simclr",
            backbone="resnet18",
            input_size=SIZE,
            embedding_dim=512,
            resize_policy=ResizePolicy(SIZE).to_json(),
            created_at=f"2024-05-0{seed + 1}T12:00:00Z",
            dataset_fingerprint=f"{seed:02d}" * 32,
            metrics={"knn_top1": 0.5 + seed / 10},
        )
        onnx_path = root / f"{model_id}.onnx"
        export_encoder(Encoder("resnet18", small_stem=True).eval(), onnx_path, card=card, parity_images=digit_images)
        registry.publish(onnx_path, card, activate=model_id == MODEL_A)
        onnx_path.unlink()
    return root / "models"


@pytest.fixture(scope="session")
def model_ids(models_template: Path) -> tuple[str, str]:
    """The two published encoders: (active at start, the other)."""
    return MODEL_A, MODEL_B


@contextmanager
def _running(stack_class: type[Stack], root: Path, models: Path, digits_path: Path) -> Iterator[Stack]:
    """A stack over a copy of the registry and digits.npz, from ready (model, index, broker) to closed."""
    data = root / "data"
    shutil.copytree(models, data / "models")
    (data / "datasets").mkdir()
    shutil.copyfile(digits_path, data / "datasets" / "digits.npz")
    stack = stack_class(root)
    try:
        wait_until(
            lambda: stack.http.get("/readyz").status_code == 200,
            STARTUP_S,
            "the API to be ready (model, index, broker)",
        )
        yield stack
    finally:
        stack.close()


@pytest.fixture(scope="session")
def web_stack(tmp_path_factory: pytest.TempPathFactory, models_template: Path, digits_path: Path) -> Iterator[Stack]:
    """Redis + API (no API keys) over a data folder with the two encoders; workers on demand."""
    with _running(Stack, tmp_path_factory.mktemp("web"), models_template, digits_path) as stack:
        yield stack


@pytest.fixture
def empty_store(web_stack: Stack) -> None:
    """Deletes every item of web_stack: the tests share one stack, and each one that indexes starts
    from an empty store whatever ran before it."""
    while items := web_stack.http.get("/items", params={"limit": 500}).json()["items"]:
        for item in items:
            assert web_stack.http.delete(f"/items/{item['id']}").status_code == 204


class KeyedStack(Stack):
    """The stack with `SIMCLR_EMBED_API_KEYS` set and keys required for reads too."""

    def _spawn(self, name: str, cmd: list[str]):
        self.env.update(SIMCLR_EMBED_API_KEYS=API_KEY, SIMCLR_EMBED_REQUIRE_KEY_FOR_READS="true")
        return super()._spawn(name, cmd)


@pytest.fixture(scope="session")
def api_key() -> str:
    """The key `keyed_stack` accepts."""
    return API_KEY


@pytest.fixture(scope="session")
def keyed_stack(tmp_path_factory: pytest.TempPathFactory, models_template: Path, digits_path: Path) -> Iterator[Stack]:
    with _running(KeyedStack, tmp_path_factory.mktemp("web-keyed"), models_template, digits_path) as stack:
        yield stack


@pytest.fixture
def browser() -> Iterator[object]:
    """A fresh headless Chromium (fresh sessionStorage) with a 1200x800 viewport."""
    if not chromium_installed():
        pytest.skip("Debian's chromium and chromium-driver are not installed (make browser)")
    driver = start_chromium()
    try:
        yield driver
    finally:
        for entry in driver.get_log("browser"):  # shown by pytest when the test fails
            print("console:", entry["level"], entry["message"])
        driver.quit()


@pytest.fixture
def screenshot(browser) -> Callable[[str], Path]:
    """Save the viewport as SCREENSHOTS/<name>.png."""
    return lambda name: save_screenshot(browser, SCREENSHOTS / f"{name}.png")


@pytest.fixture
def digit_files(tmp_path: Path, digit_images: np.ndarray) -> list[Path]:
    """digit_images as PNG files digit-0.png ... digit-9.png (file inputs take paths)."""
    paths = []
    for label, image in enumerate(digit_images):
        paths.append(tmp_path / f"digit-{label}.png")
        Image.fromarray(image).save(paths[-1], format="PNG")
    return paths
