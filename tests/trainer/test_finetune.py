"""Fine-tuning with few labels (trainer.finetune): the network starts from the checkpoint's f and
g's first layer, batches are class-balanced, epochs follow the label count, and a short run
learns a task it could not do before."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest
import torch

from service.contract.train_config import TrainConfig
from trainer.checkpoint import save_checkpoint
from trainer.finetune import balanced_batches, build_classifier, epochs_for, finetune, predict_proba
from trainer.methods import build_method

SIZE = 16


def simclr_run(root: Path, seed: int = 0) -> tuple[Path, dict[str, torch.Tensor]]:
    """A run directory whose checkpoint holds a SimCLR method (f and g) as the engine writes it."""
    cfg = TrainConfig(method="simclr", backbone="resnet18", image_size=SIZE, batch_size=8, epochs=1).resolved()
    torch.manual_seed(seed)
    method = build_method(cfg)
    (root / "checkpoints").mkdir(parents=True)
    (root / "config.json").write_text(json.dumps({"config": cfg.model_dump(mode="json")}))
    state = {
        "method": method.state_dict(),
        "encoder": method.encoder.state_dict(),
        "epoch": 1,
        "step": 1,
        "config": cfg.model_dump(mode="json"),
    }
    save_checkpoint(root / "checkpoints" / "last.pt", state)
    return root, method.state_dict()


def test_epochs_follow_simclr_v2_at_1_and_10_percent() -> None:
    assert epochs_for(12.8) == 60 and epochs_for(5) == 60  # ImageNet 1% and fewer
    assert epochs_for(128) == 30 and epochs_for(5000) == 30  # ImageNet 10% and more
    assert 30 < epochs_for(50) < 60 and epochs_for(40) >= epochs_for(50)


def test_batches_are_class_balanced_on_imbalanced_labels() -> None:
    labels = np.repeat(np.arange(3), [90, 9, 1])
    batches = balanced_batches(labels, 30, 200, np.random.default_rng(0))
    shares = np.bincount(labels[batches.ravel()], minlength=3) / batches.size
    np.testing.assert_allclose(shares, [1 / 3] * 3, atol=0.02)  # 6000 draws: sd ~0.006
    assert set(batches[labels[batches] == 2].tolist()) == {99}  # the rare class's one example


def test_starts_from_f_and_the_first_layer_of_g(tmp_path: Path) -> None:
    run_dir, state = simclr_run(tmp_path / "run")
    model, cfg = build_classifier(run_dir, 4)
    assert cfg.method == "simclr" and model.classifier.out_features == 4
    for name, value in model.encoder.state_dict().items():
        assert torch.equal(value, state[f"encoder.{name}"]), name
    assert torch.equal(model.neck[0].weight, state["projector.layers.0.weight"])
    assert torch.equal(model.neck[1].running_var, state["projector.layers.1.running_var"])
    scratch, _ = build_classifier(run_dir, 4, pretrained=False)
    assert not torch.equal(scratch.neck[0].weight, model.neck[0].weight)
    assert not torch.equal(scratch.encoder.net.conv1.weight, model.encoder.net.conv1.weight)
    assert sum(p.numel() for p in scratch.parameters()) == sum(p.numel() for p in model.parameters())


def test_a_run_without_checkpoint_is_refused(tmp_path: Path) -> None:
    with pytest.raises(FileNotFoundError, match="no checkpoint"):
        build_classifier(tmp_path, 3)


def test_short_finetune_learns_to_tell_two_kinds_of_image_apart(tmp_path: Path) -> None:
    """Dark noisy squares vs bright ones: chance before, near perfect after a few steps."""
    run_dir, _ = simclr_run(tmp_path / "run")
    rng = np.random.default_rng(0)
    labels = np.repeat([0, 1], 12)
    base = np.where(labels == 0, 40, 210)[:, None, None, None]
    images = np.clip(base + rng.normal(0, 25, (24, SIZE, SIZE, 3)), 0, 255).astype(np.uint8)
    model, _ = build_classifier(run_dir, 2)
    result = finetune(model, images, labels, SIZE, epochs=15, batch_size=8, seed=0)
    assert result.steps == 15 * 3 and result.lr == pytest.approx(0.05 * 8 / 256)
    proba = predict_proba(result.model, images)
    assert proba.shape == (24, 2) and np.allclose(proba.sum(axis=1), 1, atol=1e-5)
    assert np.mean(proba.argmax(axis=1) == labels) >= 0.9
