"""The per-kind recipes that the quality benchmark, its test and the demo share."""

from __future__ import annotations

import pytest

from service.contract.recipes import SMALL_GRAYSCALE, recipe_for_images
from service.contract.train_config import TrainJobRequest
from service.up import DEMO_JOB


@pytest.mark.parametrize(
    ("side", "grayscale", "size", "hflip", "grey_prob", "batch"),
    [(8, True, 16, 0.0, 0.0, 64), (32, False, 32, 0.5, 0.2, 128), (8, False, 16, 0.5, 0.2, 128),
     (28, True, 28, 0.0, 0.0, 128)],
)
def test_the_recipe_follows_the_images(side: int, grayscale: bool, size: int, hflip: float, grey_prob: float,
                                       batch: int) -> None:
    recipe = recipe_for_images(side, grayscale)
    assert (recipe.image_size, recipe.hflip_prob, recipe.grayscale_prob, recipe.batch_size) == (size, hflip, grey_prob,
                                                                                               batch)
    # Both kinds train at the same peak rate: base_lr x batch / 256 = 0.5.
    assert recipe.base_lr * recipe.batch_size / 256 == pytest.approx(0.5)


def test_overrides_win_and_augment_merges() -> None:
    cfg = SMALL_GRAYSCALE.config(epochs=5, seed=7, augment={"color_strength": 1.0})
    assert (cfg.epochs, cfg.seed, cfg.warmup_epochs) == (5, 7, 0.5)  # warm-up: a tenth of the run, at most 1 epoch
    assert (cfg.augment.color_strength, cfg.augment.crop_min_scale, cfg.augment.hflip_prob) == (1.0, 0.6, 0.0)
    assert SMALL_GRAYSCALE.config().warmup_epochs == 1.0


def test_the_demo_job_is_the_recipe_at_ten_epochs() -> None:
    request = TrainJobRequest.model_validate(DEMO_JOB)
    expected = SMALL_GRAYSCALE.config(epochs=10, checkpoint_every_steps=50)
    assert request.model_dump(include=set(type(expected).model_fields)) == expected.model_dump()
