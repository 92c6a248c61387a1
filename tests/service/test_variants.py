"""Serving variants: which one embeds (the deployment's setting, the card's verified variants,
the provider), /models and /metrics saying so, and the item layer keeping each (model,
variant) pair's vectors apart: an index built with one variant is rebuilt, not mixed, when
the variant changes.

The int8 variant is real: the tiny encoder's ONNX model quantised by the trainer's
`quantize_int8`, calibrated on CIFAR-10 images, published beside its fp32 reference.
"""

from __future__ import annotations

import shutil
import time
from pathlib import Path

import numpy as np
import onnxruntime as ort
import pytest
from fastapi.testclient import TestClient

from service.app import create_app
from service.contract.registry import ModelRegistry, VariantCard
from service.contract.variants import FP32, INT8, serving_variant, vector_space
from service.items.store import ItemStore
from tests.service.conftest import TinyEncoder, _card, make_settings, multipart, png
from trainer.export import export_encoder, quantize_int8

MODEL_Q = "tiny-q"


def run(path: Path, images: np.ndarray) -> np.ndarray:
    """ONNX Runtime alone on one model file: uint8 [N, S, S, 3] -> float32 [N, D]."""
    options = ort.SessionOptions()
    options.intra_op_num_threads = 1
    session = ort.InferenceSession(str(path), options, providers=["CPUExecutionProvider"])
    return session.run(["embedding"], {"images": images})[0]


@pytest.fixture(scope="module")
def q_template(tmp_path_factory: pytest.TempPathFactory, photos: np.ndarray) -> Path:
    """A data_dir whose registry holds MODEL_Q (fp32 + int8), active."""
    root = tmp_path_factory.mktemp("variants")
    work = root / "work"
    work.mkdir()
    card = _card(MODEL_Q)
    export_encoder(TinyEncoder(7).eval(), work / "model.onnx", card=card, parity_images=photos[:16])
    quantize_int8(work / "model.onnx", work / "model.int8.onnx", photos[:64])
    variant = VariantCard(file="model.int8.onnx", providers=["CPUExecutionProvider"], verification={"test": True})
    ModelRegistry(root / "data" / "models").publish(
        work / "model.onnx",
        card.model_copy(update={"variants": {INT8: variant}}),
        variants={INT8: work / "model.int8.onnx"},
        activate=True,
    )
    return root / "data"


@pytest.fixture
def q_dir(q_template: Path, tmp_path: Path) -> Path:
    shutil.copytree(q_template, tmp_path / "data")
    return tmp_path / "data"


def test_serving_variant_rules() -> None:
    assert serving_variant("auto", {INT8}, on_cpu=True) == INT8
    assert serving_variant("auto", set(), on_cpu=True) == FP32  # no verified int8: the reference
    assert serving_variant("auto", {INT8}, on_cpu=False) == FP32  # int8 is for CPU deployments
    assert serving_variant("fp32", {INT8}, on_cpu=True) == FP32  # forced
    assert serving_variant("int8", {INT8}, on_cpu=False) == INT8
    assert serving_variant("int8", set(), on_cpu=True) == FP32
    with pytest.raises(ValueError, match="auto, fp32, int8"):
        serving_variant("fp16", {INT8}, on_cpu=True)


def _embed(client: TestClient, images: np.ndarray) -> np.ndarray:
    r = client.post("/embed", files=multipart([png(a) for a in images]))
    assert r.status_code == 200, r.text
    return np.asarray(r.json()["embeddings"], dtype=np.float32)


@pytest.mark.parametrize(("setting", "expected"), [("auto", INT8), ("fp32", FP32)])
def test_the_runtime_serves_the_deployments_variant_and_says_so(
    q_dir: Path, photos: np.ndarray, setting: str, expected: str
) -> None:
    images = photos[:5]  # already S x S: the resize policy leaves them as they are
    model_file = "model.int8.onnx" if expected == INT8 else "model.onnx"
    direct = run(q_dir / "models" / MODEL_Q / model_file, images)
    other = run(q_dir / "models" / MODEL_Q / ("model.onnx" if expected == INT8 else "model.int8.onnx"), images)
    assert np.abs(direct - other).max() > 1e-3  # the two variants are distinguishable
    with TestClient(create_app(make_settings(q_dir, embed_variant=setting))) as client:
        np.testing.assert_allclose(_embed(client, images), direct, atol=1e-6)
        listed = client.get("/models").json()
        assert listed["active"] == MODEL_Q and listed["active_variant"] == expected
        (model,) = listed["models"]
        assert model["serving_variant"] == expected and set(model["variants"]) == {INT8}
        assert model["variants"][INT8]["sha256"]
        assert f'model_id="{MODEL_Q}",variant="{expected}"}} 1.0' in client.get("/metrics").text


def _wait_served(client: TestClient, space: str, timeout_s: float = 60.0) -> None:
    deadline = time.monotonic() + timeout_s
    while client.app.state.items.stats()["served_model"] != space:
        assert time.monotonic() < deadline, f"{space} was not served within {timeout_s} s"
        client.get("/readyz")
        time.sleep(0.1)


def test_an_index_built_with_one_variant_is_rebuilt_not_mixed_when_the_variant_changes(
    q_dir: Path, photos: np.ndarray
) -> None:
    images = photos[:12]
    ids = [f"c{i}" for i in range(len(images))]
    files = [("files", (f"{i}.png", png(a), "image/png")) for i, a in zip(ids, images, strict=True)]
    fp32_space, int8_space = vector_space(MODEL_Q, FP32), vector_space(MODEL_Q, INT8)
    with TestClient(create_app(make_settings(q_dir, embed_variant="fp32"))) as client:
        _wait_served(client, fp32_space)
        assert client.post("/items", files=files, data={"ids": ids}).status_code == 201
        assert client.get("/items/c0").json()["models"] == [fp32_space]
    # The same deployment restarted at auto (int8 on this CPU): a new vector space, re-embedded.
    with TestClient(create_app(make_settings(q_dir, embed_variant="auto"))) as client:
        _wait_served(client, int8_space)
        items = client.app.state.items
        assert items.stats()["index_size"] == len(images)  # the int8 vectors only, not both
        hit = client.post("/search", files={"file": ("q.png", png(images[3]), "image/png")}, data={"k": "1"}).json()
        assert hit["model_id"] == MODEL_Q and hit["results"][0]["id"] == "c3"
        assert hit["results"][0]["score"] == pytest.approx(1.0, abs=1e-5)  # query and index: one variant
        assert client.get("/items/c0").json()["models"] == sorted([fp32_space, int8_space])
    store = ItemStore(q_dir / "items" / "items.sqlite3")
    try:
        for space, file in ((fp32_space, "model.onnx"), (int8_space, "model.int8.onnx")):
            pks, vectors, _ = store.vectors(space)
            assert len(pks) == len(images)
            order = [store.get(i).pk for i in ids]  # type: ignore[union-attr]
            expected = run(q_dir / "models" / MODEL_Q / file, images)
            got = vectors[[list(pks).index(pk) for pk in order]]
            np.testing.assert_allclose(got, expected, atol=1e-5)  # each space holds its own variant's vectors
    finally:
        store.close()
    snapshots = sorted(p.name for p in make_settings(q_dir).index_dir.iterdir())
    assert f"{int8_space}.faiss" in snapshots
