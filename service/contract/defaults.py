"""The defaults of a pretraining run, decided in one place from the run itself.

A TrainConfig field left at None is a default still to decide. `resolve` decides every one
of them from the method, the image size, the data size, the global batch, the number of
optimiser steps and the number of training processes, once, when the run starts, and says
where each value comes from (`Resolution.sources`). The engine prints them and stores the
explicit config in the run's config.json, its checkpoint and the model card; a resumed run
takes the stored values (`adopt_stored`) instead of deciding again, so a change of these
rules never changes, nor refuses, a run already under way.

The rules, by the length of the run in epochs E (optimiser steps / steps per epoch) and in
steps T:

* warm-up: the papers' 10 epochs (SimCLR Appendix B.6, BYOL Appendix C), at most a tenth of
  the run, so a short run ramps up and then decays; MoCo v2 has none (`main_moco.py`: cosine
  from the first step).
* learning rate and its scaling rule, per optimiser:
  - LARS for SimCLR: the square-root rule lr = 0.075 x sqrt(B) below a batch of 4096 (SimCLR
    Appendix B.1: better at small batches), the linear rule lr = 0.3 x B/256 from 4096 on
    (Sec. 3 and B.6); the two meet at B = 4096, where lr = 4.8. Weight decay 1e-6.
  - LARS for BYOL: lr = 0.2 x B/256, weight decay 1.5e-6 (BYOL Appendix C).
  - SGD: lr = 0.03 x B/256, weight decay 1e-4 (MoCo v2, facebookresearch/moco main_moco.py).
  - AdamW: lr = 5e-4 x B/256, weight decay 0.04 (DINO, Caron et al. 2021, main_dino.py).
  Each method has its paper's optimiser (SimCLR and BYOL LARS, MoCo v2 SGD); an optimiser
  given by the caller brings its own rate and decay from the list above.
* temperature: SimCLR 0.1 for images larger than 64 px (Table 5, ImageNet); on small
  images 0.5 for runs of 100 epochs or more (Appendix B.9, CIFAR-10) and 0.2 below (MoCo v2's
  value; the 3-epoch cifar10-5k runs of docs/benchmarks.md); MoCo v2 0.2 (He et al. / Chen
  et al. 2020, main_moco.py --moco-t).
* colour strength: 1.0 for images larger than 64 px (Appendix A), 0.5 on small ones
  (Appendix B.9); MoCo v2 and BYOL 0.5 (ColorJitter(0.4, 0.4, 0.4, 0.1), main_moco.py
  --aug-plus; BYOL Table 6, nearest strength).
* crop scale: the paper's 8% of the area from 100 epochs on (Appendix A), 20% below (MoCo
  v2's aug-plus crop: a few epochs cannot learn from 8% fragments); MoCo v2 always 20%.
* momentum networks: an exponential average remembers ~1 / (1 - m) steps, so m is chosen
  for that horizon to be at most a tenth of the run (1 - m = 10 / T), between the lowest
  rate its paper shows training well and the paper's value: MoCo m in [0.9, 0.999] (MoCo,
  He et al. 2020, Sec. 4.1 ablation), BYOL tau_base in [0.99, 0.996] (0.99: solo-learn's
  CIFAR setting; 0.996: BYOL Sec. 3.2). MoCo's queue holds the keys of that horizon, K = B x
  round(1 / (1 - m)), at most 65,536 (the paper's K) and at most the images outside one
  batch, so it never holds a second key of an image of the batch from the same epoch.
* sync BN: on when more than one process trains (SimCLR Sec. 2.2, global BN).

Without the data size (`num_images=None`, a config resolved outside a run: tests, exports)
the step-dependent values take the papers' long-run ones.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any

from service.contract.train_config import AugmentConfig, TrainConfig

# Fields of TrainConfig (dotted for AugmentConfig's) that `resolve` decides when left None.
RESOLVED_FIELDS = (
    "optimizer",
    "base_lr",
    "lr_scaling",
    "weight_decay",
    "warmup_epochs",
    "temperature",
    "proj_hidden_dim",
    "proj_out_dim",
    "pred_hidden_dim",
    "small_stem",
    "moco_momentum",
    "queue_size",
    "byol_tau_base",
    "sync_bn",
    "augment.color_strength",
    "augment.crop_min_scale",
    "augment.blur",
)

PAPER_OPTIMIZER = {"simclr": "lars", "moco_v2": "sgd", "byol": "lars"}
LONG_RUN_EPOCHS = 100  # from here on, the papers' long-run augmentations and temperature
SMALL_IMAGE = 64  # sides up to this are CIFAR-like: small stem, no blur, colour 0.5
SQRT_RULE_MAX_BATCH = 4096
MOCO_MAX_QUEUE = 65_536
WARMUP_EPOCHS, WARMUP_FRACTION = 10.0, 0.1
EMA_HORIZON_FRACTION = 0.1
MOCO_MOMENTUM_RANGE = (0.9, 0.999)
BYOL_TAU_RANGE = (0.99, 0.996)


@dataclass(frozen=True)
class RunShape:
    """What a run knows when it starts: its data size and number of training processes."""

    num_images: int | None = None
    world_size: int = 1


@dataclass(frozen=True)
class Resolution:
    """An explicit config and, for each default it decided, the value's source."""

    config: TrainConfig
    sources: dict[str, str] = field(default_factory=dict)

    def value(self, name: str) -> Any:
        """The value of field `name` (dotted for `augment.*`)."""
        obj: Any = self.config
        for part in name.split("."):
            obj = getattr(obj, part)
        return obj

    def describe(self) -> list[str]:
        """One line per decided field: `field = value  (source)`."""
        return [f"{name} = {self.value(name)!r}  ({src})" for name, src in self.sources.items()]


def _optimizer_defaults(method: str, optimizer: str, batch: int) -> tuple[float, str, float, str]:
    """(base_lr, lr_scaling, weight_decay, source) of `optimizer` for `method` at global batch `batch`."""
    if optimizer == "lars" and method == "byol":
        return 0.2, "linear", 1.5e-6, "BYOL App. C: LARS 0.2 x B/256, wd 1.5e-6"
    if optimizer == "lars":
        if batch < SQRT_RULE_MAX_BATCH:
            return 0.075 * 256**0.5, "sqrt", 1e-6, "SimCLR App. B.1: square-root rule 0.075 x sqrt(B), wd 1e-6"
        return 0.3, "linear", 1e-6, "SimCLR Sec. 3 / B.6: linear rule 0.3 x B/256, wd 1e-6"
    if optimizer == "sgd":
        return 0.03, "linear", 1e-4, "MoCo v2 main_moco.py: SGD 0.03 x B/256, wd 1e-4"
    return 5e-4, "linear", 0.04, "DINO main_dino.py: AdamW 5e-4 x B/256, wd 0.04"


def _ema_rate(total_steps: int | None, low: float, high: float) -> float:
    """The averaging rate whose horizon 1 / (1 - m) is a tenth of the run, within [low, high]."""
    if total_steps is None:
        return high
    return min(high, max(low, 1.0 - 1.0 / (EMA_HORIZON_FRACTION * max(1, total_steps))))


def resolve_run(
    cfg: TrainConfig, shape: RunShape, stored: dict[str, Any] | None = None, sources: dict[str, str] | None = None
) -> Resolution:
    """The defaults of a run decided once: those of a resumed run from its `stored` config (and
    their recorded `sources`), the rest for `shape`."""
    if stored is None:
        return resolve(cfg, shape)
    adopted = adopt_stored(cfg, stored, sources)
    fresh = resolve(adopted.config, shape)
    return Resolution(fresh.config, {**adopted.sources, **fresh.sources})


def resolve(cfg: TrainConfig, shape: RunShape | None = None) -> Resolution:
    """Every None field of `cfg` decided for a run of `shape` (see the module docstring)."""
    shape = shape or RunShape()
    method, size, batch = cfg.method, cfg.image_size, cfg.batch_size
    small = size <= SMALL_IMAGE
    total_steps: int | None = None
    epochs: float = cfg.epochs
    if shape.num_images is not None:
        steps_per_epoch, total_steps = run_length(cfg, shape.num_images)
        epochs = total_steps / max(1, steps_per_epoch)
    long_run = epochs >= LONG_RUN_EPOCHS

    fill: dict[str, Any] = {}
    sources: dict[str, str] = {}

    def decide(name: str, value: Any, source: str) -> None:
        current = cfg.augment if name.startswith("augment.") else cfg
        if getattr(current, name.rsplit(".", 1)[-1]) is None:
            fill[name] = value
            sources[name] = source

    optimizer = cfg.optimizer or PAPER_OPTIMIZER[method]
    decide("optimizer", optimizer, f"{method}'s paper optimiser")
    base_lr, scaling, weight_decay, opt_source = _optimizer_defaults(method, optimizer, batch)
    decide("lr_scaling", scaling, opt_source)
    decide("base_lr", base_lr, f"{opt_source}; base_lr is the rate at B = 256")
    decide("weight_decay", weight_decay, opt_source)
    if method == "moco_v2":
        decide("warmup_epochs", 0.0, "MoCo v2 main_moco.py: cosine schedule, no warm-up")
    else:
        warmup = min(WARMUP_EPOCHS, WARMUP_FRACTION * epochs)
        decide("warmup_epochs", round(warmup, 6), "10 epochs (SimCLR B.6, BYOL App. C), at most 10% of the run")

    if method == "simclr":
        if not small:
            decide("temperature", 0.1, "SimCLR Table 5 (ImageNet)")
        elif long_run:
            decide("temperature", 0.5, f"SimCLR App. B.9 (CIFAR-10), runs of {LONG_RUN_EPOCHS}+ epochs")
        else:
            decide("temperature", 0.2, f"MoCo v2's 0.2 for runs under {LONG_RUN_EPOCHS} epochs (docs/benchmarks.md)")
    elif method == "moco_v2":
        decide("temperature", 0.2, "MoCo v2 main_moco.py --moco-t 0.2")
    else:
        decide("temperature", 1.0, "unused by BYOL's loss")
    head = {"simclr": (None, 128, None), "moco_v2": (None, 128, None), "byol": (4096, 256, 4096)}[method]
    head_source = "BYOL Sec. 3.3: 4096-wide MLPs to 256" if method == "byol" else "SimCLR Sec. 2 / B.6: MLP to 128"
    for name, value in zip(("proj_hidden_dim", "proj_out_dim", "pred_hidden_dim"), head, strict=True):
        if value is not None:
            decide(name, value, head_source)
    decide("small_stem", small, f"SimCLR App. B.9: 3x3 stride-1 stem, no max-pool, for sides <= {SMALL_IMAGE} px")

    if method == "moco_v2":
        m = cfg.moco_momentum if cfg.moco_momentum is not None else _ema_rate(total_steps, *MOCO_MOMENTUM_RANGE)
        decide("moco_momentum", round(m, 6), "MoCo: horizon 1/(1-m) <= 10% of the run, m in [0.9, 0.999]")
        if cfg.queue_size is None:
            batches = MOCO_MAX_QUEUE // batch if total_steps is None else round(1.0 / (1.0 - m))
            if shape.num_images is not None:
                batches = min(batches, max(1, (shape.num_images - batch) // batch))
            batches = max(1, min(batches, MOCO_MAX_QUEUE // batch))
            decide("queue_size", batches * batch, "MoCo: the keys of the momentum horizon, <= 65,536, <= the data")
    if method == "byol":
        tau = _ema_rate(total_steps, *BYOL_TAU_RANGE)
        decide("byol_tau_base", round(tau, 6), "BYOL: horizon 1/(1-tau) <= 10% of the run, tau in [0.99, 0.996]")
    decide("sync_bn", shape.world_size > 1, "SimCLR Sec. 2.2: global BN when more than one process trains")

    if method == "simclr":
        colour, colour_source = (0.5, "SimCLR App. B.9 (CIFAR)") if small else (1.0, "SimCLR App. A")
    else:
        colour, colour_source = 0.5, "MoCo v2 --aug-plus ColorJitter(0.4, 0.4, 0.4, 0.1); BYOL Table 6"
    decide("augment.color_strength", colour, colour_source)
    if method == "moco_v2":
        decide("augment.crop_min_scale", 0.2, "MoCo v2 --aug-plus RandomResizedCrop(scale=(0.2, 1))")
    elif long_run:
        decide("augment.crop_min_scale", 0.08, "SimCLR App. A / BYOL: RandomResizedCrop(scale=(0.08, 1))")
    else:
        decide("augment.crop_min_scale", 0.2, f"crops from 20% (MoCo v2) for runs under {LONG_RUN_EPOCHS} epochs")
    decide("augment.blur", not small, f"SimCLR App. B.9: no blur for sides <= {SMALL_IMAGE} px")

    augment = {k.split(".", 1)[1]: v for k, v in fill.items() if k.startswith("augment.")}
    top = {k: v for k, v in fill.items() if not k.startswith("augment.")}
    if augment:
        top["augment"] = AugmentConfig.model_validate({**cfg.augment.model_dump(), **augment})
    resolved = TrainConfig.model_validate({**cfg.model_dump(), **top})
    return Resolution(resolved, sources)


def adopt_stored(cfg: TrainConfig, stored: dict[str, Any], sources: dict[str, str] | None = None) -> Resolution:
    """`cfg` with each default it leaves open (None) taken from a stored run's config (a dict
    from its checkpoint, with the `sources` it recorded), so that a resumed run keeps the values
    it started with; the sources name the adopted fields."""
    top: dict[str, Any] = {}
    augment: dict[str, Any] = {}
    adopted: dict[str, str] = {}
    for name in RESOLVED_FIELDS:
        parent, _, leaf = name.rpartition(".")
        here = getattr(cfg.augment if parent else cfg, leaf)
        there = (stored.get("augment") or {}) if parent else stored
        if here is None and there.get(leaf) is not None:
            (augment if parent else top)[leaf] = there[leaf]
            adopted[name] = (sources or {}).get(name, "stored by the run")
    if augment:
        top["augment"] = AugmentConfig.model_validate({**cfg.augment.model_dump(), **augment})
    return Resolution(TrainConfig.model_validate({**cfg.model_dump(), **top}) if top else cfg, adopted)


def run_length(cfg: TrainConfig, num_images: int) -> tuple[int, int]:
    """(steps per epoch, total optimiser steps) of `cfg` on `num_images` images (drop_last)."""
    steps_per_epoch = num_images // cfg.batch_size
    total = steps_per_epoch * cfg.epochs
    return steps_per_epoch, total if cfg.max_steps is None else min(total, cfg.max_steps)


__all__ = ["RESOLVED_FIELDS", "Resolution", "RunShape", "adopt_stored", "resolve", "resolve_run", "run_length"]
