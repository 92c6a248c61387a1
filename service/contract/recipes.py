"""CPU-sized SimCLR recipes by kind of image: one source for the quality benchmark, its test
and the demo that `up` trains, so that the figures in docs/benchmarks.md describe all three.

Two kinds, told apart by the images themselves (`recipe_for_images`):

* small grayscale (side < 16, e.g. 8x8 handwritten digits): upsampled to TrainConfig's
  minimum of 16 px with the standard stem; crops keep at least 60% of the area, since a 20%
  crop of an 8x8 digit is a stroke fragment that no longer tells its class; no flip (digits
  are not mirror-symmetric) and no random grayscale (already grey); batch 64, so that
  1,437 images give 22 steps an epoch, 30 epochs.
* anything else: the paper's CIFAR setting (Appendix B.9) at the native size (at least
  16 px): crops from 20% of the area (the paper's 8% is for 200+ epochs), flip 0.5,
  grayscale 0.2, batch 128, 2 epochs (a few CPU minutes).

Both run LARS at the same peak rate, 0.5 (base_lr x batch / 256: 2.0 x 64 / 256 and
1.0 x 128 / 256; the paper's square-root rule for small batches, 0.075 x sqrt(batch), gives
0.6 and 0.85), colour strength 0.5 (the paper's CIFAR value; on grey images only brightness
and contrast act), no blur (the paper's CIFAR setting).

`config(method=...)` gives the same recipe to MoCo v2 and BYOL with SHORT_RUN_SETTINGS on top:
the papers' momentum rates are set for hundreds of thousands of steps, and a key or target
network averages the last ~1 / (1 - m) steps, so at MoCo's m = 0.999 it would still be the
random initial network after the few hundred steps of a CPU run (docs/benchmarks.md, "SimCLR
vs MoCo v2 vs BYOL"). Each method keeps its own head widths (BYOL's 4096).
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

from service.contract.train_config import TrainConfig

# What a run of a few hundred steps needs beyond the methods' long-run defaults: T = 0.2 for
# the contrastive losses (the paper's CIFAR value), a MoCo queue of 1,024 keys (a multiple of
# both recipes' batch sizes) behind a key encoder at m = 0.9, BYOL's target at tau_base = 0.99
# (solo-learn's CIFAR value) rather than the paper's 0.996.
SHORT_RUN_SETTINGS: dict[str, dict[str, float | int]] = {
    "simclr": {"temperature": 0.2},
    "moco_v2": {"temperature": 0.2, "queue_size": 1024, "moco_momentum": 0.9},
    "byol": {"byol_tau_base": 0.99},
}


@dataclass(frozen=True)
class Recipe:
    """The settings that depend on the kind of image; `config` turns them into a TrainConfig."""

    image_size: int
    crop_min_scale: float
    hflip_prob: float
    grayscale_prob: float
    batch_size: int
    epochs: int
    base_lr: float

    def config(self, **overrides: Any) -> TrainConfig:
        """A single-process TrainConfig of this recipe for `overrides["method"]` (SimCLR if not
        given); `overrides` (TrainConfig fields, `augment` a dict merged into the recipe's) win."""
        augment = {"crop_min_scale": self.crop_min_scale, "hflip_prob": self.hflip_prob,
                   "grayscale_prob": self.grayscale_prob, "color_strength": 0.5, "blur": False,
                   **overrides.pop("augment", {})}  # fmt: skip
        epochs = int(overrides.get("epochs", self.epochs))
        method = overrides.get("method", "simclr")
        fields: dict[str, Any] = {
            "method": method, "backbone": "resnet18", "small_stem": False, "image_size": self.image_size,
            "epochs": epochs, "batch_size": self.batch_size, "optimizer": "lars", "base_lr": self.base_lr,
            "weight_decay": 1e-6, "warmup_epochs": min(1.0, epochs / 10), "num_workers": 0,
            "log_every_steps": 5, "checkpoint_every_steps": 10_000, **SHORT_RUN_SETTINGS[method],
        }  # fmt: skip
        return TrainConfig(**{**fields, **overrides, "augment": augment})


SMALL_GRAYSCALE = Recipe(
    image_size=16, crop_min_scale=0.6, hflip_prob=0.0, grayscale_prob=0.0, batch_size=64, epochs=30, base_lr=2.0
)


def recipe_for_images(side: int, grayscale: bool) -> Recipe:
    """The recipe for images of largest side `side` pixels, grey or colour."""
    if grayscale and side < 16:
        return SMALL_GRAYSCALE
    return Recipe(
        image_size=max(16, side),
        crop_min_scale=0.2,
        hflip_prob=0.0 if grayscale else 0.5,
        grayscale_prob=0.0 if grayscale else 0.2,
        batch_size=128,
        epochs=2,
        base_lr=1.0,
    )
