"""CPU-sized SimCLR recipes by kind of image: one source for the quality benchmark, its test
and the demo that `up` trains, so that the figures in docs/benchmarks.md describe all three.

Two kinds, told apart by the images themselves (`recipe_for_images`):

* small grayscale (side < 16, e.g. 8x8 handwritten digits): upsampled to TrainConfig's
  minimum of 16 px with the standard stem; crops keep at least 60% of the area, since a 20%
  crop of an 8x8 digit is a stroke fragment that no longer tells its class; no flip (digits
  are not mirror-symmetric) and no random grayscale (already grey); batch 64, so that
  1,437 images give 22 steps an epoch, 30 epochs.
* anything else: the native size (at least 16 px), flip 0.5, grayscale 0.2 (none for grey
  images), crops as the defaults decide, batch 128, 2 epochs (a few CPU minutes).

Everything else (optimiser, learning rate, weight decay, warm-up, temperature, colour
strength, blur, MoCo's momentum and queue, BYOL's target rate) is left to the run's defaults
(service/contract/defaults.py), which decide it for such short runs as they would for any
other: a recipe is the data's choices, not a second set of defaults. One explicit choice
departs from the defaults: the standard stem (`small_stem=False`), a sixteenth of the small
stem's compute at 32 px, so that the demo and the CPU benchmarks run in minutes.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

from service.contract.train_config import TrainConfig


@dataclass(frozen=True)
class Recipe:
    """The settings that depend on the kind of image; `config` turns them into a TrainConfig.

    `crop_min_scale` None: the run's default (service/contract/defaults.py).
    """

    image_size: int
    crop_min_scale: float | None
    hflip_prob: float
    grayscale_prob: float
    batch_size: int
    epochs: int

    def config(self, **overrides: Any) -> TrainConfig:
        """A single-process TrainConfig of this recipe for `overrides["method"]` (SimCLR if not
        given); `overrides` (TrainConfig fields, `augment` a dict merged into the recipe's) win."""
        augment: dict[str, Any] = {"hflip_prob": self.hflip_prob, "grayscale_prob": self.grayscale_prob}
        if self.crop_min_scale is not None:
            augment["crop_min_scale"] = self.crop_min_scale
        augment.update(overrides.pop("augment", {}))
        fields: dict[str, Any] = {
            "backbone": "resnet18", "small_stem": False, "image_size": self.image_size, "epochs": self.epochs,
            "batch_size": self.batch_size, "num_workers": 0, "log_every_steps": 5, "checkpoint_every_steps": 10_000,
        }  # fmt: skip
        return TrainConfig(**{**fields, **overrides, "augment": augment})


SMALL_GRAYSCALE = Recipe(
    image_size=16, crop_min_scale=0.6, hflip_prob=0.0, grayscale_prob=0.0, batch_size=64, epochs=30
)


def recipe_for_images(side: int, grayscale: bool) -> Recipe:
    """The recipe for images of largest side `side` pixels, grey or colour."""
    if grayscale and side < 16:
        return SMALL_GRAYSCALE
    return Recipe(
        image_size=max(16, side),
        crop_min_scale=None,
        hflip_prob=0.0 if grayscale else 0.5,
        grayscale_prob=0.0 if grayscale else 0.2,
        batch_size=128,
        epochs=2,
    )
