"""Fine-tuning with few labels (trainer.finetune): the network starts from the checkpoint's f and
g's first layer, batches are class-balanced, epochs follow the label count, and a short run
learns a task it could not do before."""

from __future__ import annotations

import functools
import json
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image

from service.contract.imaging import ResizePolicy
from service.contract.registry import ModelKindError, ModelRegistry
from service.contract.train_config import TrainConfig
from trainer.checkpoint import save_checkpoint
from trainer.finetune import balanced_batches, build_classifier, epochs_for, finetune, finetune_run, predict_proba
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


def test_finetune_run_publishes_a_classifier_that_never_activates(tmp_path: Path, digits_path: Path) -> None:
    """Real digits (3 classes): a classifier model in the registry, its ONNX outputs consistent
    with the card's validation accuracy, refused as the encoder."""
    import onnxruntime as ort

    with np.load(digits_path) as data:
        tr = np.concatenate([np.flatnonzero(data["y_train"] == c)[:8] for c in (0, 1, 2)])
        te = np.concatenate([np.flatnonzero(data["y_test"] == c)[:5] for c in (0, 1, 2)])
        npz = tmp_path / "few.npz"
        np.savez(
            npz,
            x_train=data["x_train"][tr],
            y_train=data["y_train"][tr],
            x_test=data["x_test"][te],
            y_test=data["y_test"][te],
            classes=np.array(["0", "1", "2"]),
        )
        x_val, y_val = data["x_test"][te], data["y_test"][te]
    run_dir, _ = simclr_run(tmp_path / "run")
    registry = ModelRegistry(tmp_path / "models")
    card = finetune_run(run_dir, npz, registry, model_id="ft-digits", epochs=2, batch_size=8)
    assert card is not None and card.kind == "classifier" and card.classes == ["0", "1", "2"]
    assert card.metrics["labels"] == 24 and card.metrics["val_images"] == 15
    assert registry.get("ft-digits").kind == "classifier"
    with pytest.raises(ModelKindError):
        registry.activate("ft-digits")

    session = ort.InferenceSession(str(registry.root / "ft-digits" / "model.onnx"), providers=["CPUExecutionProvider"])
    assert [o.name for o in session.get_outputs()] == ["embedding", "probabilities"]
    images = ResizePolicy(SIZE).batch([Image.fromarray(x[..., 0]) for x in x_val])
    h, proba = session.run(None, {"images": images})
    np.testing.assert_allclose(np.linalg.norm(h, axis=1), 1, atol=1e-5)
    np.testing.assert_allclose(proba.sum(axis=1), 1, atol=1e-5)
    assert card.metrics["val_accuracy"] == pytest.approx(np.mean(proba.argmax(axis=1) == y_val))
    assert np.sum(card.model_dump()["val_confusion"]) == 15


def test_finetune_run_from_stored_items_keeps_their_labels(tmp_path: Path, digits_path: Path) -> None:
    """Labels given as for classifiers: the stored items' originals, integer labels kept as
    integers (the classifiers' class order), a stratified holdout; a deleted item is named."""
    import io

    from service.items.backend import NewItem
    from service.items.reindex import open_store
    from service.settings import Settings
    from trainer.data import DatasetError
    from trainer.finetune import items_split

    settings = Settings(data_dir=tmp_path / "data")
    store, blobs = open_store(settings)
    pairs: list[tuple[str, str | int]] = []
    originals: list[bytes] = []
    with np.load(digits_path) as data:
        for c in (2, 0, 1):
            for i in np.flatnonzero(data["y_train"] == c)[:6]:
                buf = io.BytesIO()
                Image.fromarray(data["x_train"][i][..., 0]).save(buf, format="PNG")
                originals.append(buf.getvalue())
                store.add([NewItem(f"d{i}", blobs.put(originals[-1]), "image/png", {"digit": int(c)})], {})
                pairs.append((f"d{i}", int(c)))
    store.close()

    classes, x, y, x_val, y_val = items_split(settings, pairs, SIZE, seed=0)
    assert classes == [0, 1, 2] and x.shape == (15, SIZE, SIZE, 3) and x_val.shape == (3, SIZE, SIZE, 3)
    assert np.bincount(y).tolist() == [5, 5, 5] and sorted(y_val.tolist()) == [0, 1, 2]
    first = ResizePolicy(SIZE).decode(originals[0])
    assert any(np.array_equal(first, im) for im in np.concatenate([x, x_val]))  # the service's resize path

    run_dir, _ = simclr_run(tmp_path / "run")
    registry = ModelRegistry(tmp_path / "models")
    split = functools.partial(items_split, settings, pairs)
    card = finetune_run(run_dir, split, registry, model_id="ft-items", epochs=1, batch_size=8)
    assert card is not None and card.classes == [0, 1, 2]
    assert card.metrics["labels"] == 15 and card.metrics["val_images"] == 3

    with pytest.raises(DatasetError, match="'gone'"):
        items_split(settings, [*pairs, ("gone", 1)], SIZE, seed=0)


def test_a_stopped_finetune_resumes_from_its_checkpoint_to_the_same_weights(tmp_path: Path) -> None:
    """Killed (stopped) after 4 of 9 steps, then run again on the same checkpoint: the same
    losses and the same final weights as the run that was never interrupted."""
    run_dir, _ = simclr_run(tmp_path / "run")
    rng = np.random.default_rng(1)
    labels = np.repeat([0, 1], 12)
    images = np.clip(
        np.where(labels == 0, 40, 210)[:, None, None, None] + rng.normal(0, 25, (24, SIZE, SIZE, 3)), 0, 255
    )
    images = images.astype(np.uint8)
    kwargs = {"epochs": 3, "batch_size": 8, "seed": 0}  # 9 steps

    def fresh() -> torch.nn.Module:  # the same new classifier layer for both runs
        torch.manual_seed(7)
        return build_classifier(run_dir, 2)[0]

    whole = finetune(fresh(), images, labels, SIZE, **kwargs)

    checkpoint = tmp_path / "ft" / "checkpoints" / "finetune.pt"
    asked = iter(range(100))
    first = finetune(
        fresh(),
        images,
        labels,
        SIZE,
        should_stop=lambda: next(asked) >= 4,
        checkpoint=checkpoint,
        checkpoint_every=3,
        **kwargs,
    )
    assert first.stopped and first.steps == 4 and checkpoint.is_file()
    # Another initialisation of the new layer: the checkpoint's weights replace it.
    resumed = finetune(build_classifier(run_dir, 2)[0], images, labels, SIZE, checkpoint=checkpoint, **kwargs)
    assert not resumed.stopped and resumed.steps == 9 and resumed.resumed_from == 4 and whole.resumed_from == 0
    assert resumed.losses == whole.losses  # steps 1-4 from the checkpoint, 5-9 taken again
    for name, tensor in whole.model.state_dict().items():
        assert torch.equal(tensor, resumed.model.state_dict()[name]), name

    # A checkpoint of other data is not resumed: the run starts over.
    other = finetune(build_classifier(run_dir, 2)[0], 255 - images, labels, SIZE, checkpoint=checkpoint, **kwargs)
    assert len(other.losses) == 9 and other.losses[0] != whole.losses[0]
