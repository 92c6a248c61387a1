"""The training job schema: one pydantic model used by the CLI, the API and the worker.

The method-dependent and run-dependent defaults (optimiser, learning rate and its scaling
rule, weight decay, warm-up, temperature, heads, momentum networks, sync BN, colour strength
and crop scale) are the fields left None here; `service.contract.defaults.resolve` decides
them when a run starts, from the run's data size, batch, length and number of processes, and
names each value's source. Per-method augmentation probabilities that do not depend on the
run (METHOD_AUGMENT_DEFAULTS: BYOL's asymmetric blur and solarisation) are filled in when a
TrainConfig is validated, for the `augment` fields the caller did not set, so they travel with
the config through JSON (the job store, run directories, model cards) as ordinary values.
"""

from __future__ import annotations

from typing import Literal

from pydantic import BaseModel, ConfigDict, Field, ValidationInfo, field_validator, model_validator

Method = Literal["simclr", "moco_v2", "byol"]
Backbone = Literal["resnet18", "resnet34", "resnet50"]
Optimizer = Literal["lars", "sgd", "adamw"]
Precision = Literal["auto", "fp32", "bf16"]

# Per-method defaults of AugmentConfig fields the caller did not set that do not depend on
# the run; AugmentConfig's own defaults are SimCLR's. BYOL (Grill et al. 2020, Table 6): blur
# p = 1.0 / 0.1 and solarisation p = 0.0 / 0.2 on views a / b. Colour strength, crop scale and
# blur depend on the run and are decided by service.contract.defaults.resolve.
METHOD_AUGMENT_DEFAULTS: dict[str, dict[str, float]] = {
    "simclr": {},
    "moco_v2": {},
    "byol": {
        "blur_prob": 1.0,
        "view_b_blur_prob": 0.1,
        "solarize_prob": 0.0,
        "view_b_solarize_prob": 0.2,
    },
}
# A second view's probability is a default only while its first view's is one too: an
# explicit `blur_prob` alone applies to both views.
VIEW_B_FIELDS = {"view_b_blur_prob": "blur_prob", "view_b_solarize_prob": "solarize_prob"}


class _Strict(BaseModel):
    model_config = ConfigDict(extra="forbid", frozen=True)


class AugmentConfig(_Strict):
    """The paper's stochastic augmentation T, drawn twice per image (Appendix A).

    The defaults are SimCLR's; inside a TrainConfig, the fields left unset take the
    method's values from METHOD_AUGMENT_DEFAULTS, and those left None are decided for the run
    (service.contract.defaults).
    """

    crop_min_scale: float | None = Field(
        None, gt=0.0, le=1.0, description="RandomResizedCrop lower area fraction; None = decided for the run"
    )
    crop_max_scale: float = Field(1.0, gt=0.0, le=1.0)
    hflip_prob: float = Field(0.5, ge=0.0, le=1.0)
    color_strength: float | None = Field(
        None, ge=0.0, le=4.0, description="s: jitter (0.8s, 0.8s, 0.8s, 0.2s); None = decided for the run"
    )
    color_jitter_prob: float = Field(0.8, ge=0.0, le=1.0)
    grayscale_prob: float = Field(0.2, ge=0.0, le=1.0)
    blur: bool | None = Field(None, description="Gaussian blur; None = on for images larger than 64 px")
    blur_prob: float = Field(0.5, ge=0.0, le=1.0)
    blur_kernel_fraction: float = Field(0.1, gt=0.0, le=0.5, description="kernel side / image side")
    blur_sigma_min: float = Field(0.1, gt=0.0)
    blur_sigma_max: float = Field(2.0, gt=0.0)
    solarize_prob: float = Field(0.0, ge=0.0, le=1.0)
    view_b_blur_prob: float | None = Field(
        None, ge=0.0, le=1.0, description="BYOL: blur_prob of the second view; None = blur_prob"
    )
    view_b_solarize_prob: float | None = Field(
        None, ge=0.0, le=1.0, description="BYOL: solarize_prob of the second view; None = solarize_prob"
    )
    device: Literal["auto", "cpu", "cuda"] = Field(
        "auto", description="where the batched augmentation runs; auto = the training device"
    )

    def view_b(self) -> AugmentConfig:
        """The second view's augmentation (BYOL's asymmetric pair): each `view_b_*` field that is
        set replaces its view-a field (VIEW_B_FIELDS)."""
        set_b = {b: getattr(self, b) for b in VIEW_B_FIELDS if getattr(self, b) is not None}
        return self.model_copy(update={VIEW_B_FIELDS[b]: value for b, value in set_b.items()})

    @model_validator(mode="after")
    def _ranges(self) -> AugmentConfig:
        if self.crop_min_scale is not None and self.crop_min_scale > self.crop_max_scale:
            raise ValueError("crop_min_scale must not exceed crop_max_scale")
        if self.blur_sigma_min > self.blur_sigma_max:
            raise ValueError("blur_sigma_min must not exceed blur_sigma_max")
        return self


class TrainConfig(_Strict):
    """Every hyper-parameter of a pretraining run. Unknown fields are rejected."""

    method: Method = "simclr"
    backbone: Backbone = "resnet18"
    small_stem: bool | None = Field(
        None, description="3x3 stride-1 first conv, no max-pool; None = on for image_size <= 64"
    )
    image_size: int = Field(32, ge=16, le=512)
    epochs: int = Field(100, ge=1, le=10_000)
    max_steps: int | None = Field(None, ge=1, description="stop after this many optimiser steps")
    batch_size: int = Field(256, ge=2, le=65_536, description="global batch, over all processes")
    optimizer: Optimizer | None = Field(None, description="None = the method's paper optimiser")
    base_lr: float | None = Field(
        None,
        gt=0.0,
        le=100.0,
        description="the rate at batch 256, scaled by lr_scaling; None = decided for the run (service.contract.defaults)",
    )
    lr_scaling: Literal["linear", "sqrt", "none"] | None = Field(
        None, description="linear: x B/256; sqrt: x sqrt(B/256); None = decided for the run (service.contract.defaults)"
    )
    weight_decay: float | None = Field(None, ge=0.0, le=1.0, description="None = the optimiser's paper value")
    momentum: float = Field(0.9, ge=0.0, lt=1.0)
    warmup_epochs: float | None = Field(None, ge=0.0, description="None = 10 epochs, at most 10% of the run")
    temperature: float | None = Field(None, gt=0.0, le=10.0, description="None = the method's, for the run")
    proj_hidden_dim: int | None = Field(None, ge=8, le=16_384, description="None = feature dim (SimCLR)")
    proj_out_dim: int | None = Field(None, ge=8, le=8_192)
    pred_hidden_dim: int | None = Field(None, ge=8, le=16_384, description="BYOL predictor width")
    moco_momentum: float | None = Field(None, ge=0.0, lt=1.0, description="None = follows the run's length")
    queue_size: int | None = Field(None, ge=1, le=1_048_576, description="None = follows the run's length")
    byol_tau_base: float | None = Field(None, ge=0.0, le=1.0, description="None = follows the run's length")
    sync_bn: bool | None = Field(
        None, description="BatchNorm over all processes (the paper's global BN); None = on with >1 process"
    )
    precision: Precision = Field(
        "auto",
        description="auto = bf16 autocast on CUDA and on CPUs with AMX or AVX512_BF16, else fp32; resolved at the run's start",
    )
    channels_last: bool = True
    compile: bool = False
    num_workers: int | None = Field(
        None,
        ge=0,
        le=64,
        description="DataLoader processes per training process; None = this process's share of the CPUs, at most 4",
    )
    devices: int | None = Field(None, ge=1, description="GPUs to use; None = all the worker sees")
    cpu_processes: int = Field(1, ge=1, le=64, description="gloo processes when no GPU is present")
    seed: int = Field(0, ge=0)
    deterministic: bool = False
    checkpoint_every_steps: int = Field(200, ge=1)
    log_every_steps: int = Field(10, ge=1)
    knn_every_epochs: int = Field(
        0,
        ge=0,
        description="kNN top-1 of h every N epochs: labeled train split = memory, test split = queries; 0 = off",
    )
    augment: AugmentConfig = Field(
        default_factory=AugmentConfig,
        validate_default=True,
        description="fields left unset take the method's defaults (METHOD_AUGMENT_DEFAULTS)",
    )

    @field_validator("augment", mode="after")
    @classmethod
    def _method_augment_defaults(cls, augment: AugmentConfig, info: ValidationInfo) -> AugmentConfig:
        """Fill the augment fields the caller left unset with the method's values."""
        method = info.data.get("method")
        if method is None:  # `method` itself failed validation; that error is reported
            return augment
        unset = set(AugmentConfig.model_fields) - augment.model_fields_set
        fill = {
            k: v for k, v in METHOD_AUGMENT_DEFAULTS[method].items()
            if k in unset and VIEW_B_FIELDS.get(k, k) in unset
        }  # fmt: skip
        return augment.model_copy(update=fill) if fill else augment

    @model_validator(mode="after")
    def _method_fits(self) -> TrainConfig:
        if self.method == "moco_v2" and self.queue_size is not None and self.queue_size % self.batch_size:
            raise ValueError(
                f"queue_size ({self.queue_size}) must be a multiple of batch_size ({self.batch_size}) for moco_v2"
            )
        view_b = [k for k in VIEW_B_FIELDS if getattr(self.augment, k) is not None]
        if view_b and self.method != "byol":
            raise ValueError(f"augment.{view_b[0]} applies to byol only; {self.method} draws the same T for both views")
        return self

    def resolved(self, num_images: int | None = None, world_size: int = 1) -> TrainConfig:
        """The config with every default decided (service.contract.defaults.resolve); without
        `num_images`, the step-dependent ones take the papers' long-run values."""
        from service.contract.defaults import RunShape, resolve

        return resolve(self, RunShape(num_images, world_size)).config

    @property
    def learning_rate(self) -> float:
        """Peak learning rate: base_lr scaled from batch 256 to batch_size by lr_scaling."""
        if self.base_lr is None or self.lr_scaling is None:
            raise ValueError("base_lr / lr_scaling are not decided yet: use TrainConfig.resolved()")
        scale = {"linear": self.batch_size / 256, "sqrt": (self.batch_size / 256) ** 0.5, "none": 1.0}
        return self.base_lr * scale[self.lr_scaling]


class TrainJobRequest(TrainConfig):
    """`POST /train-jobs` body: a TrainConfig plus where the data is and what to do after."""

    dataset: str = Field(..., min_length=1, description="folder or .npz under a configured dataset root")
    activate: bool = Field(True, description="activate the exported model when the job succeeds")
    name: str | None = Field(None, max_length=200)
