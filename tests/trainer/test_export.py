"""Export of the encoder f to ONNX: parity with torch on real images, the graph contract,
metadata, refusal of a broken export, and the `simclr-embed export` command.

Real images: 32x32 patches of scikit-learn's sample photographs (tests/_data.py). ResNet-18
with the small-image stem runs at their native 32 px; ResNet-50 runs at 64 px (upscaled by the serving
ResizePolicy) to keep CPU time small while still using real pixels. Weights are random but
BatchNorm statistics are calibrated on real images and affine parameters randomised, so
folding BatchNorm into Conv at export is exercised with non-trivial values.
"""

from __future__ import annotations

import json
import re
import subprocess
import sys
from pathlib import Path

import numpy as np
import onnx
import pytest
import torch
from _data import PHOTO_TRAIN
from torch import nn

from service.contract.defaults import RunShape, resolve
from service.contract.imaging import ResizePolicy
from service.contract.registry import ModelCard, ModelRegistry
from service.contract.train_config import TrainConfig
from trainer import export
from trainer.checkpoint import save_checkpoint
from trainer.export import ExportError, export_encoder, export_run, ort_session, reference_embed
from trainer.models import Encoder
from trainer.precision import resolve_precision

REPO = Path(__file__).resolve().parents[2]
BATCH_SIZES = (1, 7, 64)


def _calibrated_encoder(backbone: str, small_stem: bool, images: np.ndarray, seed: int) -> Encoder:
    """A random encoder whose BatchNorm layers hold real-image statistics and non-unit affines."""
    torch.manual_seed(seed)
    encoder = Encoder(backbone, small_stem)
    gen = torch.Generator().manual_seed(seed)
    bns = [m for m in encoder.modules() if isinstance(m, nn.BatchNorm2d)]
    with torch.no_grad():
        for bn in bns:
            bn.weight.copy_(torch.rand(bn.weight.shape, generator=gen) + 0.5)
            bn.bias.copy_(torch.randn(bn.bias.shape, generator=gen) * 0.1)
            bn.reset_running_stats()
            bn.momentum = None  # cumulative average: the calibration batch's exact statistics
        encoder.train()
        encoder(torch.from_numpy(reference_input(images[:32])))
        for bn in bns:
            bn.momentum = 0.1
    return encoder.eval()


def reference_input(images: np.ndarray) -> np.ndarray:
    """uint8 [N, S, S, 3] -> normalised float32 [N, 3, S, S] (for calibration only)."""
    from service.contract.encoder_io import PIXEL_MEAN, PIXEL_STD

    x = (images.astype(np.float32) / 255.0 - np.asarray(PIXEL_MEAN, np.float32)) / np.asarray(PIXEL_STD, np.float32)
    return np.ascontiguousarray(x.transpose(0, 3, 1, 2))


def make_run_dir(root: Path, encoder: Encoder, cfg: TrainConfig, data: str, fingerprint: str = "fp-test") -> Path:
    """A run directory by the documented layout (config.json + checkpoints/last.pt)."""
    cfg = cfg.resolved()
    (root / "checkpoints").mkdir(parents=True)
    (root / "config.json").write_text(
        json.dumps(
            {
                "config": cfg.model_dump(mode="json"),
                "data": data,
                "dataset": {"fingerprint": fingerprint, "num_images": 5000, "skipped": 0, "classes": []},
            }
        )
    )
    state = {"encoder": encoder.state_dict(), "epoch": 1, "step": 10, "config": cfg.model_dump(mode="json")}
    save_checkpoint(root / "checkpoints" / "last.pt", state)
    return root


@pytest.fixture(scope="module", autouse=True)
def _threads():
    before = torch.get_num_threads()
    torch.set_num_threads(2)
    yield
    torch.set_num_threads(before)


@pytest.fixture(scope="module", params=["resnet18-small-32", "resnet50-64"])
def exported(request, tmp_path_factory, photos, photos_path):
    """One export per backbone per session: (run_dir, registry, card, torch encoder, size)."""
    backbone, size = ("resnet18", 32) if request.param.startswith("resnet18") else ("resnet50", 64)
    small_stem = backbone == "resnet18"
    images = ResizePolicy(size).batch(photos)
    encoder = _calibrated_encoder(backbone, small_stem, images, seed=1)
    cfg = TrainConfig(backbone=backbone, image_size=size, small_stem=small_stem, batch_size=64, epochs=1)
    root = tmp_path_factory.mktemp(request.param)
    run_dir = make_run_dir(root / "run", encoder, cfg, str(photos_path))
    (run_dir / "result.json").write_text(
        json.dumps({"step": 10, "loss": 5.5, "stopped": False, "metrics": {"knn_top1": 0.4125}})
    )
    registry = ModelRegistry(root / "models")
    card = export_run(run_dir, registry, activate=True)
    return run_dir, registry, card, encoder, size


@pytest.mark.slow
@pytest.mark.parametrize("batch", BATCH_SIZES)
def test_parity_on_real_images(exported, photos, batch):
    _, registry, card, encoder, size = exported
    _, path = registry.verify(card.model_id)
    images = ResizePolicy(size).batch(photos[100 : 100 + batch])  # [batch, S, S, 3], unseen at export
    got = ort_session(path, threads=2).run(["embedding"], {"images": images})[0]
    expected = reference_embed(encoder, images)
    assert got.shape == (batch, card.embedding_dim) and got.dtype == np.float32
    assert np.abs(got - expected).max() < 1e-4
    if batch > 1:  # parity is not won by a constant output
        assert np.abs(expected - expected[0]).max() > 1e-3


def test_graph_contract(exported):
    _, registry, card, _, size = exported
    _, path = registry.verify(card.model_id)
    model = onnx.load(str(path))
    (inp,), (out,) = model.graph.input, model.graph.output
    assert inp.name == "images" and inp.type.tensor_type.elem_type == onnx.TensorProto.UINT8
    in_dims = inp.type.tensor_type.shape.dim
    assert in_dims[0].dim_param and [d.dim_value for d in in_dims[1:]] == [size, size, 3]
    assert out.name == "embedding" and out.type.tensor_type.elem_type == onnx.TensorProto.FLOAT
    out_dims = out.type.tensor_type.shape.dim
    assert out_dims[0].dim_param and out_dims[1].dim_value == card.embedding_dim
    assert card.embedding_dim == {"resnet18": 512, "resnet50": 2048}[card.backbone]  # f only, no g
    assert max(op.version for op in model.opset_import if op.domain in ("", "ai.onnx")) >= 17
    ops = {node.op_type for node in model.graph.node}
    assert "BatchNormalization" not in ops and {"Cast", "Transpose", "Conv"} <= ops  # eval mode: BN folded
    onnx.checker.check_model(model, full_check=True)


def test_output_unit_norm_and_dynamic_batch(exported):
    _, registry, card, _, size = exported
    session = ort_session(registry.verify(card.model_id)[1], threads=2)
    rng = np.random.default_rng(0)
    for n in (3, 1, 5):  # one session, batch size changing between calls
        images = rng.integers(0, 256, (n, size, size, 3), dtype=np.uint8)
        emb = session.run(["embedding"], {"images": images})[0]
        assert emb.shape == (n, card.embedding_dim)
        np.testing.assert_allclose(np.linalg.norm(emb.astype(np.float64), axis=1), 1.0, atol=1e-6)


def test_metadata_round_trip(exported):
    run_dir, registry, card, _, size = exported
    _, path = registry.verify(card.model_id)
    props = {p.key: p.value for p in onnx.load(str(path)).metadata_props}
    registry_facts = {k: getattr(card, k) for k in ("sha256", "size_bytes", "variants", "refused_variants")}
    assert ModelCard.from_onnx_metadata(props, **registry_facts) == card  # the rest is in the ONNX file
    assert registry.get(card.model_id) == card and registry.active() == card.model_id
    info = json.loads((run_dir / "config.json").read_text())
    assert card.train_config == info["config"]
    assert card.dataset_fingerprint == "fp-test"
    assert ResizePolicy.from_json(card.resize_policy) == ResizePolicy(size)
    assert card.input_size == size and card.method == "simclr"
    assert card.metrics == {"knn_top1": 0.4125, "train_loss": 5.5}
    assert re.fullmatch(rf"simclr-{card.backbone}-\d{{8}}T\d{{6}}Z-[0-9a-f]{{8}}", card.model_id)


# --- refusals and the CLI: a ResNet-18 with the ImageNet stem at 32 px (16x cheaper) ----------


@pytest.fixture
def small_run(tmp_path, photos, photos_path):
    encoder = _calibrated_encoder("resnet18", False, photos, seed=2)
    cfg = TrainConfig(backbone="resnet18", image_size=32, small_stem=False, batch_size=64, epochs=1)
    return make_run_dir(tmp_path / "run", encoder, cfg, str(photos_path)), encoder


def test_broken_wrapper_fails_parity_and_publishes_nothing(small_run, tmp_path, monkeypatch):
    """A wrapper bug (BGR instead of RGB) is caught by the independent torch reference."""
    run_dir, _ = small_run
    registry = ModelRegistry(tmp_path / "models")
    good = export_run(run_dir, registry, activate=True, model_id="good")
    original = export.EmbeddingGraph.forward
    monkeypatch.setattr(export.EmbeddingGraph, "forward", lambda self, x: original(self, x.flip(-1)))
    with pytest.raises(ExportError, match=r"max abs difference of the unit-norm embeddings is [0-9.e-]+") as err:
        export_run(run_dir, registry, activate=True, model_id="broken")
    assert err.value.code == "parity_failed"
    assert [c.model_id for c in registry.list()] == [good.model_id]
    assert registry.active() == "good" and registry.sweep_staging() == 0


def test_export_time_only_difference_is_caught(small_run, tmp_path, photos):
    """An encoder that behaves differently while being exported than in eval mode."""
    _, encoder = small_run
    handle = encoder.net.layer4.register_forward_hook(
        lambda mod, inp, out: out * 1.5 + 0.01 if torch.onnx.is_in_onnx_export() else out
    )
    images = photos[:16]
    card = ModelCard(
        model_id="x", method="simclr", backbone="resnet18", input_size=32, embedding_dim=512,
        resize_policy=ResizePolicy(32).to_json(), created_at="2025-01-01T00:00:00Z",
    )  # fmt: skip
    out = tmp_path / "model.onnx"
    try:
        with pytest.raises(ExportError) as err:
            export_encoder(encoder, out, card=card, parity_images=images)
    finally:
        handle.remove()
    assert err.value.code == "parity_failed" and not out.exists()
    assert export_encoder(encoder, out, card=card, parity_images=images) < 1e-4  # and without the hook it passes


def test_parity_images_supplied_when_dataset_unreadable(tmp_path, photos):
    encoder = _calibrated_encoder("resnet18", False, photos, seed=3)
    cfg = TrainConfig(backbone="resnet18", image_size=32, small_stem=False, batch_size=64, epochs=1)
    run_dir = make_run_dir(tmp_path / "run", encoder, cfg, str(tmp_path / "gone.npz"))
    registry = ModelRegistry(tmp_path / "models")
    with pytest.raises(ExportError) as err:
        export_run(run_dir, registry)
    assert err.value.code == "no_parity_images" and registry.list() == []
    card = export_run(run_dir, registry, parity_images=photos[:8], metrics={"knn_top1": 0.5}, model_id="m1")
    assert card.metrics == {"knn_top1": 0.5} and registry.active() is None
    assert [c.model_id for c in registry.list()] == ["m1"]


def test_bad_parity_images_refused(small_run, tmp_path):
    _, encoder = small_run
    card = ModelCard(
        model_id="x", method="simclr", backbone="resnet18", input_size=32, embedding_dim=512,
        resize_policy=ResizePolicy(32).to_json(), created_at="2025-01-01T00:00:00Z",
    )  # fmt: skip
    with pytest.raises(ExportError, match=r"uint8 \[N, 32, 32, 3\]"):
        export_encoder(encoder, tmp_path / "m.onnx", card=card, parity_images=np.zeros((2, 32, 32, 3), np.float32))


@pytest.mark.slow
@pytest.mark.integration
def test_cli_export_of_a_trained_run(tmp_path, photos_path):
    """`simclr-embed export` in a subprocess on a run the training engine wrote (2 steps)."""
    from trainer.engine import train

    cfg = TrainConfig(backbone="resnet18", image_size=32, small_stem=False, batch_size=16, max_steps=2, num_workers=0)
    run_dir = tmp_path / "run"
    train(cfg, photos_path, run_dir)
    models = tmp_path / "models"
    proc = subprocess.run(
        [sys.executable, "-m", "service.cli", "export", str(run_dir), "--registry", str(models), "--activate",
         "--model-id", "cli-model"],
        cwd=REPO, capture_output=True, text=True, timeout=300,
    )  # fmt: skip
    assert proc.returncode == 0, proc.stderr
    assert json.loads(proc.stdout.strip().splitlines()[-1])["model_id"] == "cli-model"
    registry = ModelRegistry(models)
    assert registry.active() == "cli-model"
    card, _ = registry.verify("cli-model")
    ran = cfg.resolved(num_images=PHOTO_TRAIN).model_copy(update={"precision": resolve_precision("auto", cuda=False)})
    assert card.train_config == ran.model_dump(mode="json") and card.embedding_dim == 512  # precision resolved
    # Every default decided for the run is in the card: its value in train_config, its source beside.
    decided = json.loads((run_dir / "config.json").read_text())["defaults"]
    assert card.train_defaults == decided and len(decided) == 11  # small_stem is given
    resolution = resolve(cfg, RunShape(PHOTO_TRAIN))
    assert decided == resolution.sources
    for name in decided:
        parent, _, leaf = name.rpartition(".")
        stored = (card.train_config[parent] if parent else card.train_config)[leaf]
        assert stored is not None and stored == resolution.value(name), name
    assert card.dataset_fingerprint == json.loads((run_dir / "config.json").read_text())["dataset"]["fingerprint"]
    assert card.metrics.keys() == {"train_loss"}


def test_cli_export_errors(tmp_path, capsys):
    from service.cli import main

    assert main(["export", str(tmp_path / "nope"), "--registry", str(tmp_path / "models")]) == 1
    assert "is not a run directory" in capsys.readouterr().err
    assert main(["export", str(tmp_path), "--registry", str(tmp_path / "models"), "--model-id", "../evil"]) == 1
    assert "invalid model id '../evil'" in capsys.readouterr().err
    assert not (tmp_path / "evil").exists()
