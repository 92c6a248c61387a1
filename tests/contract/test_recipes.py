"""The per-kind recipes that the quality benchmark, its test and the demo share."""

from __future__ import annotations

import pytest

from service.contract.recipes import SHORT_RUN_SETTINGS, SMALL_GRAYSCALE, Recipe, recipe_for_images
from service.contract.train_config import TrainJobRequest
from service.up import DEMO_JOB


@pytest.mark.parametrize(
    ("side", "grayscale", "size", "hflip", "grey_prob", "batch"),
    [
        (8, True, 16, 0.0, 0.0, 64),
        (32, False, 32, 0.5, 0.2, 128),
        (8, False, 16, 0.5, 0.2, 128),
        (28, True, 28, 0.0, 0.0, 128),
    ],
)
def test_the_recipe_follows_the_images(
    side: int, grayscale: bool, size: int, hflip: float, grey_prob: float, batch: int
) -> None:
    recipe = recipe_for_images(side, grayscale)
    assert (recipe.image_size, recipe.hflip_prob, recipe.grayscale_prob, recipe.batch_size) == (
        size,
        hflip,
        grey_prob,
        batch,
    )
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


@pytest.mark.parametrize("method", ["simclr", "moco_v2", "byol"])
@pytest.mark.parametrize("recipe", [SMALL_GRAYSCALE, recipe_for_images(32, False)], ids=["grey", "colour"])
def test_every_method_gets_the_recipe_with_its_short_run_settings(method: str, recipe: Recipe) -> None:
    cfg = recipe.config(method=method).resolved()  # MoCo's validation: K a multiple of the batch
    assert (cfg.method, cfg.image_size, cfg.batch_size, cfg.base_lr, cfg.epochs) == (
        method, recipe.image_size, recipe.batch_size, recipe.base_lr, recipe.epochs)  # fmt: skip
    assert (cfg.augment.crop_min_scale, cfg.augment.hflip_prob) == (recipe.crop_min_scale, recipe.hflip_prob)
    assert {k: getattr(cfg, k) for k in SHORT_RUN_SETTINGS[method]} == SHORT_RUN_SETTINGS[method]
    if method == "byol":  # its own 4096-wide heads and one-sided solarisation stay
        assert (cfg.proj_hidden_dim, cfg.pred_hidden_dim, cfg.augment.view_b_solarize_prob) == (4096, 4096, 0.2)
    assert recipe.config(method=method, temperature=0.1, byol_tau_base=0.9).resolved().byol_tau_base == 0.9
