"""The defaults decided for a run (service/contract/defaults.py): the papers' values per method,
adapted to the run's length, batch, image size and number of processes; explicit values win;
a stored run's values are adopted. The expected numbers are written out from the papers here,
not read from the module under test."""

from __future__ import annotations

import math

import pytest

from service.contract.defaults import RESOLVED_FIELDS, RunShape, adopt_stored, resolve, resolve_run
from service.contract.train_config import TrainConfig

CIFAR5K = RunShape(num_images=5000, world_size=1)


def _value(cfg: TrainConfig, name: str) -> object:
    parent, _, leaf = name.rpartition(".")
    return getattr(cfg.augment if parent else cfg, leaf)


def test_moco_v2_resolves_to_sgd_with_its_papers_values() -> None:
    cfg = resolve(TrainConfig(method="moco_v2", epochs=200, batch_size=256), RunShape(1_281_167)).config
    # main_moco.py: SGD lr 0.03 x B/256, momentum 0.9, wd 1e-4, cosine, no warm-up; --moco-t 0.2,
    # --moco-k 65536, --moco-m 0.999; --aug-plus crops from 20% and jitter (0.4, 0.4, 0.4, 0.1).
    assert (cfg.optimizer, cfg.lr_scaling, cfg.base_lr, cfg.momentum, cfg.weight_decay) == (
        "sgd", "linear", 0.03, 0.9, 1e-4)  # fmt: skip
    assert cfg.learning_rate == pytest.approx(0.03)
    assert (cfg.warmup_epochs, cfg.temperature, cfg.queue_size, cfg.moco_momentum) == (0.0, 0.2, 65_536, 0.999)
    assert (cfg.augment.crop_min_scale, cfg.augment.color_strength) == (0.2, 0.5)
    assert resolve(TrainConfig(method="moco_v2", batch_size=1024), CIFAR5K).config.learning_rate == pytest.approx(0.12)


def test_byol_and_simclr_long_runs_get_their_papers_values() -> None:
    imagenet = RunShape(1_281_167)
    byol = resolve(TrainConfig(method="byol", epochs=1000, batch_size=4096, image_size=224), imagenet).config
    # BYOL App. C: LARS 0.2 x B/256, wd 1.5e-6, 10 warm-up epochs; tau_base 0.996; 4096-wide heads to 256.
    assert (byol.optimizer, byol.learning_rate, byol.weight_decay, byol.warmup_epochs) == ("lars", 3.2, 1.5e-6, 10.0)
    assert (byol.byol_tau_base, byol.proj_hidden_dim, byol.proj_out_dim, byol.pred_hidden_dim) == (
        0.996, 4096, 256, 4096)  # fmt: skip
    simclr = resolve(TrainConfig(epochs=100, batch_size=4096, image_size=224), imagenet).config
    # SimCLR: LARS 0.3 x B/256 = 4.8 at 4096, wd 1e-6, 10 warm-up epochs, T = 0.1 (Table 5),
    # colour 1.0, crops from 8%, blur on, standard stem.
    assert (simclr.optimizer, simclr.lr_scaling, simclr.learning_rate, simclr.weight_decay) == (
        "lars", "linear", pytest.approx(4.8), 1e-6)  # fmt: skip
    assert (simclr.warmup_epochs, simclr.temperature, simclr.small_stem) == (10.0, 0.1, False)
    assert (simclr.augment.color_strength, simclr.augment.crop_min_scale, simclr.augment.blur) == (1.0, 0.08, True)
    cifar = resolve(TrainConfig(epochs=500, batch_size=512), RunShape(50_000)).config
    # SimCLR App. B.9 (CIFAR-10): small stem, no blur, colour 0.5, T = 0.5; square-root rule below 4096.
    assert (cifar.small_stem, cifar.augment.blur, cifar.augment.color_strength, cifar.temperature) == (
        True, False, 0.5, 0.5)  # fmt: skip
    assert cifar.learning_rate == pytest.approx(0.075 * math.sqrt(512))


@pytest.mark.parametrize("batch", [64, 256, 1024, 4096, 8192])
def test_simclr_learning_rate_follows_its_named_scaling_rule(batch: int) -> None:
    cfg = resolve(TrainConfig(batch_size=batch), CIFAR5K if batch <= 4096 else RunShape(50_000)).config
    expected = 0.075 * math.sqrt(batch) if batch < 4096 else 0.3 * batch / 256  # App. B.1 / Sec. 3
    assert cfg.lr_scaling == ("sqrt" if batch < 4096 else "linear")
    assert cfg.learning_rate == pytest.approx(expected)


def test_a_short_run_gets_a_bounded_warm_up_and_short_run_augmentations() -> None:
    res = resolve(TrainConfig(epochs=3, batch_size=256), CIFAR5K)
    cfg = res.config  # 19 steps an epoch, 57 steps
    assert cfg.warmup_epochs == pytest.approx(0.3)  # a tenth of the run, not 10 epochs
    assert (cfg.temperature, cfg.augment.color_strength, cfg.augment.crop_min_scale) == (0.2, 0.5, 0.2)
    assert cfg.learning_rate == pytest.approx(1.2)
    # Every decided field names its source.
    assert set(res.sources) <= set(RESOLVED_FIELDS) and all(res.sources.values())
    assert {"base_lr", "lr_scaling", "weight_decay", "warmup_epochs", "temperature", "sync_bn"} <= set(res.sources)
    assert "B.1" in res.sources["base_lr"]


def test_momentum_networks_follow_the_run_length() -> None:
    short = resolve(TrainConfig(method="moco_v2", epochs=3, batch_size=256), CIFAR5K).config
    # 57 steps: the key encoder's horizon 1 / (1 - m) at its floor of 10 steps (m = 0.9), the queue
    # the keys of those 10 batches.
    assert (short.moco_momentum, short.queue_size) == (0.9, 2560)
    medium = resolve(TrainConfig(method="moco_v2", epochs=50, batch_size=256), RunShape(50_000)).config
    steps = 195 * 50  # 1 - m = 10 / steps: a horizon of 975 batches, more than the data holds
    assert medium.moco_momentum == pytest.approx(1 - 10 / steps, abs=1e-6)
    assert medium.queue_size == 256 * ((50_000 - 256) // 256)  # the images outside one batch
    small = resolve(TrainConfig(method="moco_v2", epochs=6, batch_size=256), CIFAR5K).config
    assert small.moco_momentum == pytest.approx(1 - 10 / 114, abs=1e-6)
    assert small.queue_size == 256 * 11  # the horizon's 11.4 batches, under 65,536 and the data
    byol_short = resolve(TrainConfig(method="byol", epochs=3, batch_size=256), CIFAR5K).config
    byol_long = resolve(TrainConfig(method="byol", epochs=300, batch_size=256), RunShape(1_281_167)).config
    assert (byol_short.byol_tau_base, byol_long.byol_tau_base) == (0.99, 0.996)


def test_sync_bn_is_on_when_more_than_one_process_trains() -> None:
    assert resolve(TrainConfig(), RunShape(5000, world_size=2)).config.sync_bn is True
    assert resolve(TrainConfig(), RunShape(5000, world_size=1)).config.sync_bn is False
    assert resolve(TrainConfig(sync_bn=False), RunShape(5000, world_size=8)).config.sync_bn is False


def test_explicit_values_win_and_an_optimiser_brings_its_own_rate() -> None:
    given = TrainConfig(epochs=3, base_lr=1.0, temperature=0.5, warmup_epochs=2.0, augment={"crop_min_scale": 0.3})
    res = resolve(given, CIFAR5K)
    assert (res.config.base_lr, res.config.temperature, res.config.warmup_epochs) == (1.0, 0.5, 2.0)
    assert res.config.augment.crop_min_scale == 0.3
    assert not {"base_lr", "temperature", "warmup_epochs", "augment.crop_min_scale"} & set(res.sources)
    sgd = resolve(TrainConfig(optimizer="sgd"), CIFAR5K).config  # SimCLR with SGD: MoCo v2's SGD values
    assert (sgd.base_lr, sgd.lr_scaling, sgd.weight_decay) == (0.03, "linear", 1e-4)
    adamw = resolve(TrainConfig(optimizer="adamw"), CIFAR5K).config  # not LARS's 0.3
    assert (adamw.base_lr, adamw.weight_decay) == (5e-4, 0.04)


def test_the_resolved_config_is_explicit_and_idempotent() -> None:
    # The fields that stay None: another method's (and SimCLR's / MoCo's head width = the feature dim).
    other = {
        "simclr": {"proj_hidden_dim", "pred_hidden_dim", "moco_momentum", "queue_size", "byol_tau_base"},
        "moco_v2": {"proj_hidden_dim", "pred_hidden_dim", "byol_tau_base"},
        "byol": {"moco_momentum", "queue_size"},
    }
    for method, unused in other.items():
        cfg = resolve(TrainConfig(method=method, epochs=3), CIFAR5K).config
        assert {name for name in RESOLVED_FIELDS if _value(cfg, name) is None} == unused, method
        again = resolve(cfg, RunShape(50, world_size=4))
        assert again.config == cfg and not again.sources
        assert TrainConfig.model_validate_json(cfg.model_dump_json()) == cfg


def test_a_stored_run_keeps_its_values_and_their_sources() -> None:
    stored = resolve(TrainConfig(method="moco_v2", epochs=3), CIFAR5K)
    later = TrainConfig(method="moco_v2", epochs=6)  # resumed to run longer: new rules would give more
    assert resolve(later, CIFAR5K).config.queue_size == 2816 != stored.config.queue_size  # fresh: a longer horizon
    adopted = adopt_stored(later, stored.config.model_dump(mode="json"), stored.sources)
    assert adopted.config.model_dump(exclude={"epochs"}) == stored.config.model_dump(exclude={"epochs"})
    assert adopted.sources == stored.sources
    # A field the stored run predates is decided afresh; one given now is the caller's.
    old = stored.config.model_dump(mode="json")
    del old["sync_bn"]
    res = resolve_run(TrainConfig(method="moco_v2", epochs=3, temperature=0.3), RunShape(5000, 2), old, {})
    assert (res.config.sync_bn, res.config.temperature, res.config.queue_size) == (True, 0.3, 2560)
    assert res.sources["sync_bn"].startswith("SimCLR Sec. 2.2") and res.sources["queue_size"] == "stored by the run"
