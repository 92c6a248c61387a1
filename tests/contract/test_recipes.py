"""The per-kind recipes that the quality benchmark, its test and the demo share."""

from __future__ import annotations

import pytest

from service.contract.defaults import RESOLVED_FIELDS
from service.contract.recipes import SMALL_GRAYSCALE, Recipe, recipe_for_images
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
    # The learning rate is the run's default, not the recipe's: the square-root rule 0.075 x sqrt(B).
    cfg = recipe.config()
    assert cfg.base_lr is None and cfg.resolved(num_images=5000).learning_rate == pytest.approx(0.075 * batch**0.5)


def test_overrides_win_and_augment_merges() -> None:
    cfg = SMALL_GRAYSCALE.config(epochs=5, seed=7, augment={"color_strength": 1.0})
    assert (cfg.epochs, cfg.seed) == (5, 7)
    assert (cfg.augment.color_strength, cfg.augment.crop_min_scale, cfg.augment.hflip_prob) == (1.0, 0.6, 0.0)
    # The warm-up is the defaults' tenth of the run (at most 10 epochs), decided for the data.
    assert cfg.warmup_epochs is None and cfg.resolved(num_images=1437).warmup_epochs == 0.5
    assert SMALL_GRAYSCALE.config().resolved(num_images=1437).warmup_epochs == 3.0


def test_the_demo_job_is_the_recipe_at_ten_epochs() -> None:
    request = TrainJobRequest.model_validate(DEMO_JOB)
    expected = SMALL_GRAYSCALE.config(epochs=10, checkpoint_every_steps=50)
    assert request.model_dump(include=set(type(expected).model_fields)) == expected.model_dump()


@pytest.mark.parametrize("method", ["simclr", "moco_v2", "byol"])
@pytest.mark.parametrize(
    ("recipe", "num_images"), [(SMALL_GRAYSCALE, 1437), (recipe_for_images(32, False), 5000)], ids=["grey", "colour"]
)
def test_every_method_gets_the_recipe_and_the_defaults_for_its_run(
    method: str, recipe: Recipe, num_images: int
) -> None:
    cfg = recipe.config(method=method)
    assert (cfg.method, cfg.image_size, cfg.batch_size, cfg.epochs, cfg.small_stem) == (
        method, recipe.image_size, recipe.batch_size, recipe.epochs, False)  # fmt: skip
    # No second set of defaults: everything but the data's choices is left to the run's defaults.
    left = {"optimizer", "base_lr", "lr_scaling", "weight_decay", "warmup_epochs", "temperature", "sync_bn"}
    assert all(getattr(cfg, k) is None for k in left | {"moco_momentum", "queue_size", "byol_tau_base"})
    assert left <= set(RESOLVED_FIELDS)
    run = cfg.resolved(num_images=num_images)
    steps = num_images // recipe.batch_size * recipe.epochs  # 660 steps for digits, 78 for the colour one
    assert (run.augment.hflip_prob, run.augment.crop_min_scale) == (recipe.hflip_prob, recipe.crop_min_scale or 0.2)
    if method == "moco_v2":  # the key encoder's horizon a tenth of the run, its queue those keys
        assert run.moco_momentum == pytest.approx(max(0.9, 1 - 10 / steps), abs=1e-6)
        assert run.queue_size % recipe.batch_size == 0 and run.queue_size <= num_images - recipe.batch_size
    if method == "byol":  # its own 4096-wide heads and one-sided solarisation stay
        assert (run.proj_hidden_dim, run.pred_hidden_dim, run.augment.view_b_solarize_prob) == (4096, 4096, 0.2)
        assert run.byol_tau_base == 0.99
    assert recipe.config(method=method, temperature=0.1, byol_tau_base=0.9).resolved().byol_tau_base == 0.9
