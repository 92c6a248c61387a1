"""Fine-tuning f with few labels: SimCLR v2's semi-supervised protocol (Chen et al. 2020b,
arXiv:2006.10029, Sec. 2 and Appendix B).

* Start from the pretraining run's checkpoint, not from the exported ONNX encoder: the
  projection head g exists only there, and v2 fine-tunes from g's first layer (f, then g's
  Linear-BN-ReLU, then a new linear classifier), which beats fine-tuning from h with few labels
  (v2, Fig. 4). A checkpoint without such a head (BYOL, MoCo) fine-tunes from h.
* Class-balanced sampling: every batch draws classes uniformly, then an example of the class,
  so a rare class is seen as often as a common one.
* Augmentation: random crop (area 8%-100%) and horizontal flip only, no colour distortion.
* No weight decay; Nesterov SGD, momentum 0.9, cosine-decayed learning rate (the paper uses
  LARS at batch 1024-4096; at the few-dozen batches of a CPU run plain Nesterov SGD is the
  stable choice, and the learning rate scales linearly with the batch, 0.05 x batch / 256 for
  the pretrained layers as in v2's "0.005 x sqrt(batch)" ballpark at batch 64..256).
* Epochs scaled to the number of labels: v2 trains 60 epochs on ImageNet's 1% (~13 labels a
  class) and 30 on 10% (~128 a class); `epochs_for` interpolates on log(labels per class)
  between those points and clips to [30, 60].

The same loop trains the from-scratch baseline (`pretrained=False`: a randomly initialised
network of the same shape, the same augmentation, sampling and number of optimiser steps).

Shapes: images uint8 [N, S, S, 3]; labels int64 [N] in 0..K-1; logits [N, K]; h [N, D].
"""

from __future__ import annotations

import hashlib
import math
import tempfile
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

import numpy as np
import torch
import torch.nn.functional as F
from torch import nn

from service.contract.imaging import ImageDecodeError, ResizePolicy
from service.contract.registry import FORMAT_VERSION, ModelCard, ModelRegistry
from service.contract.train_config import AugmentConfig, TrainConfig
from service.items.reindex import open_store
from service.settings import Settings
from trainer.checkpoint import checkpoint_path, load_checkpoint, rng_state, save_checkpoint, set_rng_state
from trainer.data import DatasetError, labeled_arrays, open_labeled
from trainer.evaluate import images_to_input
from trainer.models import Encoder
from trainer.transforms import SimCLRAugment

CROP_FLIP = AugmentConfig(
    crop_min_scale=0.08,
    color_strength=0.0,  # no colour jitter in fine-tuning (SimCLR v2: crop and flip only)
    hflip_prob=0.5,
    color_jitter_prob=0.0,
    grayscale_prob=0.0,
    blur=False,
    blur_prob=0.0,
    solarize_prob=0.0,
)
BASE_LR = 0.05  # per 256 images
MOMENTUM = 0.9
PROGRESS_EVERY = 5
FINETUNE_CHECKPOINT = Path("checkpoints") / "finetune.pt"  # under the fine-tuning job's own folder
CHECKPOINT_EVERY = 20  # steps between fine-tuning checkpoints (and one whenever the run is stopped)
VALIDATION_SHARE = 0.2  # held out when the dataset has no test split


def epochs_for(labels_per_class: float) -> int:
    """60 epochs at ~13 labels a class (ImageNet 1%), 30 at ~128 (10%), log-linear between."""
    t = (math.log(max(labels_per_class, 1.0)) - math.log(12.8)) / math.log(10.0)
    return round(60 - 30 * min(1.0, max(0.0, t)))


class NoCheckpointError(FileNotFoundError):
    """The run to fine-tune from has no checkpoint (it never started, or its folder is gone)."""

    code = "no_checkpoint"


class FinetunedClassifier(nn.Module):
    """f -> g's first layer (Linear-BN-ReLU, or nothing) -> Linear classifier.

    `forward` gives logits [N, K]; `embed` gives h = f(x) [N, D], the representation the
    embeddings of the service are made of."""

    def __init__(self, encoder: Encoder, neck: nn.Module, neck_dim: int, n_classes: int) -> None:
        super().__init__()
        self.encoder = encoder
        self.neck = neck
        self.classifier = nn.Linear(neck_dim, n_classes)
        self.n_classes = n_classes

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.classifier(self.neck(self.encoder(x)))  # [N, K]


def _neck_from_state(method_state: dict[str, torch.Tensor]) -> tuple[nn.Module, int] | None:
    """g's first Linear-BN-ReLU from a method state dict (`projector.layers.0` and `.1`), if any."""
    weight = method_state.get("projector.layers.0.weight")
    if weight is None or "projector.layers.1.running_mean" not in method_state:
        return None
    out_dim, in_dim = weight.shape
    neck = nn.Sequential(nn.Linear(in_dim, out_dim, bias=False), nn.BatchNorm1d(out_dim), nn.ReLU(inplace=True))
    neck[0].load_state_dict({"weight": weight})
    neck[1].load_state_dict(
        {
            k.removeprefix("projector.layers.1."): v
            for k, v in method_state.items()
            if k.startswith("projector.layers.1.")
        }
    )
    return neck, int(out_dim)


def run_state(run_dir: str | Path) -> tuple[dict[str, Any], TrainConfig]:
    """A run's last checkpoint and its resolved config; NoCheckpointError when it has none."""
    path = checkpoint_path(run_dir)
    if not path.is_file():
        raise NoCheckpointError(f"{run_dir} has no checkpoint ({path.name}); fine-tuning starts from one")
    state = load_checkpoint(path)
    return state, TrainConfig.model_validate(state["config"]).resolved()


def build_classifier(
    run_dir: str | Path, n_classes: int, *, pretrained: bool = True
) -> tuple[FinetunedClassifier, TrainConfig]:
    """The network to fine-tune from a run's checkpoint (or, `pretrained=False`, the same shape
    randomly initialised). Raises NoCheckpointError when the run has no checkpoint."""
    state, cfg = run_state(run_dir)
    encoder = Encoder(cfg.backbone, bool(cfg.small_stem))
    found = _neck_from_state(state.get("method", {}))
    if pretrained:
        encoder.load_state_dict(state["encoder"])
    neck: nn.Module
    if found is None:
        neck, neck_dim = nn.Identity(), encoder.feature_dim
    else:
        neck, neck_dim = found
        if not pretrained:  # same shape, fresh weights
            neck = nn.Sequential(
                nn.Linear(encoder.feature_dim, neck_dim, bias=False), nn.BatchNorm1d(neck_dim), nn.ReLU(inplace=True)
            )
    return FinetunedClassifier(encoder, neck, neck_dim, n_classes), cfg


def balanced_batches(labels: np.ndarray, batch_size: int, steps: int, generator: np.random.Generator) -> np.ndarray:
    """int [steps, batch] example indices: a uniformly drawn class, then a uniformly drawn example of it."""
    classes = np.unique(labels)
    members = [np.flatnonzero(labels == c) for c in classes]
    picks = generator.integers(0, len(classes), size=(steps, batch_size))
    out = np.empty((steps, batch_size), dtype=np.int64)
    for c, idx in enumerate(members):
        mask = picks == c
        out[mask] = idx[generator.integers(0, len(idx), size=int(mask.sum()))]
    return out


@dataclass
class FinetuneResult:
    model: FinetunedClassifier
    steps: int
    epochs: int
    batch_size: int
    lr: float
    losses: list[float]
    stopped: bool = False
    resumed_from: int = 0  # the checkpoint's step this run went on from (0: from the start)


def _data_key(images: np.ndarray, labels: np.ndarray, **shape: int) -> dict[str, Any]:
    """What a checkpoint must match to be resumed: the labeled data (sha256) and the run's shape."""
    digest = hashlib.sha256(np.ascontiguousarray(images).tobytes())
    digest.update(np.ascontiguousarray(labels, dtype=np.int64).tobytes())
    return {"data": digest.hexdigest(), **shape}


def finetune(
    model: FinetunedClassifier,
    images: np.ndarray,
    labels: np.ndarray,
    image_size: int,
    *,
    epochs: int | None = None,
    batch_size: int = 64,
    seed: int = 0,
    device: str | torch.device = "cpu",
    should_stop: Callable[[], bool] | None = None,
    on_progress: Callable[[dict[str, Any]], None] | None = None,
    checkpoint: Path | None = None,
    checkpoint_every: int = CHECKPOINT_EVERY,
) -> FinetuneResult:
    """Train every layer of `model` on the labeled `images` with the protocol above.

    `should_stop` is asked before every step (a cancelled job: `stopped` is then True);
    `on_progress` gets {step, total_steps, loss, lr} every PROGRESS_EVERY steps.

    `checkpoint`: a file the run's state (weights, optimiser, schedule, random generators,
    step, losses) is written to every `checkpoint_every` steps and when stopped, and resumed
    from when it exists and was written for the same data and run shape (else the run starts
    over). The batches are drawn up front from `seed`, so a resumed run takes the steps the
    uninterrupted one would have taken."""
    torch.manual_seed(seed)
    rng = np.random.default_rng(seed)
    per_class = len(labels) / max(1, len(np.unique(labels)))
    epochs = epochs or epochs_for(per_class)
    batch_size = min(batch_size, len(labels))
    steps = epochs * math.ceil(len(labels) / batch_size)
    lr = BASE_LR * batch_size / 256
    model.to(device).train()
    augment = SimCLRAugment(CROP_FLIP, image_size).to(device)
    optimizer = torch.optim.SGD(model.parameters(), lr=lr, momentum=MOMENTUM, nesterov=True, weight_decay=0.0)
    scheduler = torch.optim.lr_scheduler.LambdaLR(optimizer, lambda s: 0.5 * (1 + math.cos(math.pi * s / steps)))
    x_all = torch.from_numpy(np.ascontiguousarray(images)).permute(0, 3, 1, 2)  # uint8 [N, 3, S, S]
    y_all = torch.from_numpy(labels.astype(np.int64))
    batches = balanced_batches(labels, batch_size, steps, rng)  # [steps, B], all drawn now
    losses: list[float] = []
    key = _data_key(images, labels, steps=steps, batch_size=batch_size, seed=seed, n_classes=model.n_classes)
    start = 0
    if checkpoint is not None and checkpoint.is_file():
        state = load_checkpoint(checkpoint, map_location=device)
        if state.get("key") == key:
            model.load_state_dict(state["model"])
            optimizer.load_state_dict(state["optimizer"])
            scheduler.load_state_dict(state["scheduler"])
            set_rng_state(state["rng"])
            start, losses = int(state["step"]), list(state["losses"])

    def save(step: int) -> None:
        if checkpoint is not None:
            state = {
                "key": key,
                "step": step,
                "losses": losses,
                "model": model.state_dict(),
                "optimizer": optimizer.state_dict(),
                "scheduler": scheduler.state_dict(),
                "rng": rng_state(),
            }
            save_checkpoint(checkpoint, state)

    for step in range(start, steps):
        if should_stop is not None and should_stop():
            save(step)
            model.eval()
            return FinetuneResult(model, step, epochs, batch_size, lr, losses, stopped=True, resumed_from=start)
        index = torch.from_numpy(batches[step])
        x = augment(x_all[index].to(device))  # [B, 3, S, S] normalised
        loss = F.cross_entropy(model(x), y_all[index].to(device))
        optimizer.zero_grad(set_to_none=True)
        loss.backward()
        optimizer.step()
        scheduler.step()
        losses.append(loss.item())
        if on_progress is not None and (step % PROGRESS_EVERY == 0 or step == steps - 1):
            on_progress({"step": step + 1, "total_steps": steps, "loss": losses[-1], "lr": scheduler.get_last_lr()[0]})
        if (step + 1) % checkpoint_every == 0 and step + 1 < steps:
            save(step + 1)
    model.eval()
    return FinetuneResult(model, steps, epochs, batch_size, lr, losses, resumed_from=start)


def predict_proba(model: FinetunedClassifier, images: np.ndarray, batch_size: int = 256) -> np.ndarray:
    """uint8 [N, S, S, 3] -> float32 [N, K] class probabilities (eval mode)."""
    model.eval()
    device = next(model.parameters()).device
    out = []
    with torch.inference_mode():
        for start in range(0, len(images), batch_size):
            chunk = torch.from_numpy(np.ascontiguousarray(images[start : start + batch_size])).to(device)
            out.append(F.softmax(model(images_to_input(chunk)), dim=1).cpu())
    return torch.cat(out).numpy()


LabeledSplit = tuple[list[str | int], np.ndarray, np.ndarray, np.ndarray, np.ndarray]


def _holdout(classes: list[str | int], x: np.ndarray, y: np.ndarray, seed: int) -> LabeledSplit:
    """(classes, x_train, y_train, x_val, y_val): a stratified VALIDATION_SHARE of every class
    held out (at least one image of each, so a class of two keeps one to train on)."""
    rng = np.random.default_rng(seed)
    val = np.concatenate(
        [
            rng.permutation(idx)[: max(1, round(VALIDATION_SHARE * len(idx)))]
            for idx in (np.flatnonzero(y == c) for c in np.unique(y))
        ]
    )
    keep = np.setdiff1d(np.arange(len(y)), val)
    return classes, x[keep], y[keep], x[val], y[val]


def labeled_split(data_path: str | Path, image_size: int, seed: int) -> LabeledSplit:
    """(classes, x_train, y_train, x_val, y_val) of a labeled folder (one sub-folder per class) or
    `.npz`: its test split for validation when it has one, else a stratified VALIDATION_SHARE."""
    train = open_labeled(data_path, "train", image_size)
    x, y = labeled_arrays(train)
    try:
        test = open_labeled(data_path, "test", image_size)
    except DatasetError:
        return _holdout(list(train.classes), x, y, seed)
    x_val, y_val = labeled_arrays(test)
    if list(test.classes) != list(train.classes):
        y_val = np.array([train.classes.index(c) for c in test.classes], dtype=np.int64)[y_val]
    return list(train.classes), x, y, x_val, y_val


def items_split(
    settings: Settings, examples: Sequence[tuple[str, str | int]], image_size: int, seed: int
) -> LabeledSplit:
    """The labeled split of stored items: their originals decoded and resized as the service
    embeds them (ResizePolicy), classes in the classifiers' order (integers, then strings), a
    stratified VALIDATION_SHARE held out. DatasetError `unknown_items` lists items whose
    original is gone (deleted since the job was queued)."""
    from service.classifiers.service import label_order  # onnxruntime only where it is needed

    policy = ResizePolicy(image_size)
    store, blobs = open_store(settings)
    images, labels, missing = [], [], []
    try:
        for item_id, label in examples:
            item = store.get(item_id)
            try:
                if item is None:
                    raise FileNotFoundError(item_id)
                images.append(policy.decode(blobs.get(item.sha256), max_pixels=settings.max_image_pixels))
                labels.append(label)
            except (OSError, ImageDecodeError):
                missing.append(item_id)
    finally:
        store.close()
    if missing:
        shown = ", ".join(repr(i) for i in missing[:10])
        raise DatasetError("unknown_items", f"{len(missing)} labeled item(s) are gone or unreadable: {shown}")
    classes = sorted(set(labels), key=label_order)
    index = {c: i for i, c in enumerate(classes)}
    y = np.asarray([index[label] for label in labels], dtype=np.int64)
    return _holdout(classes, np.stack(images), y, seed)


def finetune_run(
    run_dir: str | Path,
    data: str | Path | Callable[[int, int], LabeledSplit],
    registry: ModelRegistry,
    *,
    model_id: str,
    epochs: int | None = None,
    batch_size: int = 64,
    seed: int = 0,
    should_stop: Callable[[], bool] | None = None,
    on_progress: Callable[[dict[str, Any]], None] | None = None,
    checkpoint: Path | None = None,
) -> ModelCard | None:
    """Fine-tune a pretraining run on labeled images, export it as a classifier and publish
    it (never activated: `kind` "classifier"). None when stopped before the end.

    `data`: a labeled dataset's path (`labeled_split`), or a function (image size, seed) ->
    the split, as `items_split` over stored items gives. `checkpoint`: see `finetune`; a
    stopped run resumes from it."""
    from trainer.export import export_classifier  # onnx only where it is needed

    _, run_cfg = run_state(run_dir)  # raises NoCheckpointError before any image is read
    split = data if callable(data) else (lambda size, s: labeled_split(data, size, s))
    classes, x, y, x_val, y_val = split(run_cfg.image_size, seed)
    if len(classes) < 2 or np.bincount(y, minlength=len(classes)).min() < 1:
        raise DatasetError("too_few_classes", "fine-tuning needs labeled images of at least two classes")
    model, cfg = build_classifier(run_dir, len(classes))
    result = finetune(
        model,
        x,
        y,
        cfg.image_size,
        epochs=epochs,
        batch_size=batch_size,
        seed=seed,
        should_stop=should_stop,
        on_progress=on_progress,
        checkpoint=checkpoint,
    )
    if result.stopped:
        return None
    predicted = predict_proba(result.model, x_val).argmax(axis=1)
    confusion = np.zeros((len(classes), len(classes)), dtype=np.int64)
    np.add.at(confusion, (y_val, predicted), 1)
    policy = ResizePolicy(cfg.image_size)
    card = ModelCard(
        format_version=FORMAT_VERSION,
        model_id=model_id,
        method=cfg.method,
        backbone=cfg.backbone,
        input_size=cfg.image_size,
        embedding_dim=model.encoder.feature_dim,
        resize_policy=policy.to_json(),
        train_config={
            **cfg.model_dump(mode="json"),
            "finetune": {
                "epochs": result.epochs,
                "steps": result.steps,
                "batch_size": result.batch_size,
                "lr": result.lr,
                "seed": seed,
                "from_run": Path(run_dir).name,
                "resumed_from_step": result.resumed_from,
            },
        },
        created_at=datetime.now(UTC).isoformat(timespec="seconds").replace("+00:00", "Z"),
        metrics={
            "val_accuracy": float(np.mean(predicted == y_val)),
            "val_images": len(y_val),
            "labels": len(y),
            "train_loss": float(np.mean(result.losses[-5:])),
        },
        kind="classifier",
        classes=classes,
        val_confusion=confusion.tolist(),
        label_counts=np.bincount(y, minlength=len(classes)).tolist(),
    )
    with tempfile.TemporaryDirectory(prefix="simclr-finetune-") as tmp:
        onnx_path = Path(tmp) / "model.onnx"
        export_classifier(result.model, onnx_path, card=card, parity_images=x_val[:64])
        return registry.publish(onnx_path, card, activate=False)
