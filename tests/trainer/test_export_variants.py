"""The int8 variant: calibrated and verified at export against the fp32 reference, published
beside it only when it passes; a broken variant is refused and the fp32 model published alone.

Real images the package ships: scikit-learn's 1,797 handwritten digits (8x8 grey, shown at
16 px in RGB), enough for 256 calibration images and 1,000+ held-out ones. The encoder is a
ResNet-18 (standard stem) trained for 8 SimCLR steps on them: a random-init network's
embeddings are too alike for int8 to keep their neighbours, and export then (rightly) refuses it.
"""

from __future__ import annotations

from pathlib import Path

import numpy as np
import onnx
import pytest
from onnx import numpy_helper
from sklearn.datasets import load_digits

from service.contract.registry import ModelRegistry, sha256_file
from service.contract.train_config import TrainConfig
from trainer import export
from trainer.checkpoint import load_encoder
from trainer.data import open_dataset
from trainer.engine import train
from trainer.export import (
    CALIBRATION_IMAGES,
    INT8_THRESHOLDS,
    VERIFY_IMAGES,
    calibration_split,
    export_and_publish,
    export_run,
    ort_session,
    quantize_int8,
    verify_variant,
)

SIZE = 16
pytestmark = pytest.mark.slow  # a short training run and three quantisations, ~2 minutes on 2 cores


@pytest.fixture(scope="module")
def digits_npz(tmp_path_factory: pytest.TempPathFactory) -> Path:
    digits = load_digits()
    x = (digits.images * 16).clip(0, 255).astype(np.uint8)[..., None].repeat(3, axis=3)  # [1797, 8, 8, 3]
    path = tmp_path_factory.mktemp("digits") / "digits.npz"
    np.savez(path, x_train=x, y_train=digits.target)
    return path


@pytest.fixture(scope="module")
def published(tmp_path_factory: pytest.TempPathFactory, digits_npz: Path):
    """export_run of a run on the digits: (registry, card, images at SIZE)."""
    data = open_dataset(digits_npz, SIZE)
    images = np.stack([data.image(i) for i in range(len(data))])  # [1797, 16, 16, 3], as export reads them
    cfg = TrainConfig(
        image_size=SIZE, small_stem=False, batch_size=64, epochs=1, max_steps=8, warmup_epochs=0.1, num_workers=0
    )
    root = tmp_path_factory.mktemp("variants")
    run_dir = root / "run"
    train(cfg, digits_npz, run_dir, resume=False)
    encoder = load_encoder(run_dir)[0]
    registry = ModelRegistry(root / "models")
    card = export_run(run_dir, registry, model_id="digits-int8")
    return registry, card, images, encoder


def test_the_int8_variant_is_verified_and_listed_with_its_figures(published, digits_npz: Path) -> None:
    registry, card, _, _ = published
    variant = card.variants["int8"]
    path = registry.root / "digits-int8" / "model.int8.onnx"
    assert variant.file == "model.int8.onnx" and variant.sha256 == sha256_file(path) and card.refused_variants == {}
    figures = variant.verification
    assert figures["images"] >= VERIFY_IMAGES and figures["calibration_images"] == CALIBRATION_IMAGES
    assert figures["thresholds"] == INT8_THRESHOLDS
    assert all(figures[k] >= limit for k, limit in INT8_THRESHOLDS.items())
    assert registry.verify("digits-int8", "int8") == (card, path)
    # Same contract as the reference: uint8 input, metadata the server checks, plus the variant.
    meta = ort_session(path).get_modelmeta().custom_metadata_map
    assert (meta["model_id"], meta["embedding_dim"], meta["variant"]) == ("digits-int8", "512", "int8")
    model = onnx.load(str(path))
    assert model.graph.input[0].type.tensor_type.elem_type == onnx.TensorProto.UINT8
    assert any(n.op_type == "QuantizeLinear" for n in model.graph.node)
    # The figures are what an independent float64 check of the published files gives.
    picked = export._dataset_images(str(digits_npz), SIZE, CALIBRATION_IMAGES + VERIFY_IMAGES)
    held_out = calibration_split(picked)[1]  # the images export verified on
    assert len(held_out) == figures["images"]
    ref = ort_session(registry.root / "digits-int8" / "model.onnx").run(None, {"images": held_out})[0]
    got = ort_session(path).run(None, {"images": held_out})[0]
    cosine = np.einsum("nd,nd->n", ref.astype(np.float64), got.astype(np.float64))
    assert figures["cosine_min"] == pytest.approx(cosine.min(), abs=1e-6)
    assert figures["cosine_mean"] == pytest.approx(cosine.mean(), abs=1e-6)
    assert card.train_config["precision"] in ("fp32", "bf16")  # resolved at the run's start, never "auto"


def test_neighbour_agreement_against_a_naive_loop() -> None:
    rng = np.random.default_rng(0)
    a = rng.normal(size=(60, 8))
    a /= np.linalg.norm(a, axis=1, keepdims=True)
    b = a + rng.normal(scale=0.2, size=a.shape)
    b /= np.linalg.norm(b, axis=1, keepdims=True)
    expected = []
    for i in range(len(a)):
        near = [
            sorted((j for j in range(len(a)) if j != i), key=lambda j, x=x: -float(x[i] @ x[j]))[:10] for x in (a, b)
        ]
        expected.append(len(set(near[0]) & set(near[1])) / 10)
    assert export.neighbour_agreement(a, b) == pytest.approx(np.mean(expected))
    assert export.neighbour_agreement(a, a) == 1.0


def test_a_variant_calibrated_on_constant_images_is_refused_and_fp32_published_alone(published, tmp_path) -> None:
    registry, card, images, encoder = published
    calibration, held_out = calibration_split(images)
    constant = np.full_like(calibration, 128)
    fresh = card.model_copy(update={"model_id": "digits-constant", "variants": {}, "sha256": ""})
    result = export_and_publish(
        encoder, fresh, registry, parity_images=images[:64], calibration=constant, held_out=held_out
    )
    assert result.variants == {} and "verification against fp32 failed" in result.refused_variants["int8"]
    assert sorted(p.name for p in (registry.root / "digits-constant").iterdir()) == ["card.json", "model.onnx"]
    assert registry.get("digits-constant").refused_variants == result.refused_variants
    registry.verify("digits-constant")


def test_a_variant_with_a_corrupted_weight_fails_verification(published, tmp_path) -> None:
    registry, _, images, _ = published
    calibration, held_out = calibration_split(images)
    reference = registry.root / "digits-int8" / "model.onnx"
    good = tmp_path / "good.onnx"
    quantize_int8(reference, good, calibration)
    assert verify_variant(reference, good, held_out, INT8_THRESHOLDS)[0]
    model = onnx.load(str(good))
    conv_weights = [
        init for init in model.graph.initializer if init.data_type == onnx.TensorProto.INT8 and len(init.dims) == 4
    ]
    first = conv_weights[0]  # the stem's 7x7 convolution, quantised
    flipped = -numpy_helper.to_array(first).astype(np.int16)
    first.CopyFrom(numpy_helper.from_array(flipped.clip(-127, 127).astype(np.int8), first.name))
    broken = tmp_path / "broken.onnx"
    onnx.save(model, str(broken))
    passed, figures = verify_variant(reference, broken, held_out, INT8_THRESHOLDS)
    assert not passed and figures["cosine_mean"] < INT8_THRESHOLDS["cosine_mean"]


def test_too_few_images_to_verify_publish_fp32_alone(published) -> None:
    registry, card, images, encoder = published
    calibration, held_out = calibration_split(images[:600])
    fresh = card.model_copy(update={"model_id": "digits-few", "variants": {}})
    result = export_and_publish(
        encoder, fresh, registry, parity_images=images[:64], calibration=calibration, held_out=held_out
    )
    assert result.variants == {} and f"needs {VERIFY_IMAGES} held-out images" in result.refused_variants["int8"]
