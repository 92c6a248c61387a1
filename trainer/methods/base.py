"""The base of every self-supervised method: it owns the step from two views to a loss.

The engine draws two augmented views per image (with the configs from `views_augment`),
calls the method (DDP wraps `forward`, which is `training_step`), steps the optimiser, and
calls the hooks around it, where MoCo and BYOL move their momentum networks.
"""

from __future__ import annotations

from typing import TypeVar

import torch
from torch import nn

from service.contract.train_config import AugmentConfig, TrainConfig
from trainer.models import Encoder

T = TypeVar("T")


def decided(value: T | None, name: str) -> T:
    """A config field that the run's defaults decide (service.contract.defaults) before any
    method is built; None here means the config was not resolved."""
    if value is None:
        raise ValueError(f"{name} is undecided: build methods from a resolved TrainConfig")
    return value


class Method(nn.Module):
    """Encoder f plus whatever the method trains on top of it; `encoder` is what gets exported."""

    def __init__(self, cfg: TrainConfig) -> None:
        super().__init__()
        self.cfg = cfg.resolved()
        self.encoder = Encoder(self.cfg.backbone, bool(self.cfg.small_stem))

    def views_augment(self) -> tuple[AugmentConfig, AugmentConfig]:
        """The augmentation of view a and of view b; the same T twice unless a method overrides it."""
        return self.cfg.augment, self.cfg.augment

    def training_step(self, x_a: torch.Tensor, x_b: torch.Tensor, valid: torch.Tensor | None = None) -> torch.Tensor:
        """Two augmented batches [N, 3, S, S] of the same N images -> scalar loss; `valid` (bool
        [N], None = all) masks out the slots of images that failed to decode (trainer/data.py)."""
        raise NotImplementedError

    def forward(self, x_a: torch.Tensor, x_b: torch.Tensor, valid: torch.Tensor | None = None) -> torch.Tensor:
        return self.training_step(x_a, x_b, valid)

    def on_before_step(self, step: int, total_steps: int) -> None:
        """Called before the forward pass of optimiser step `step` (0-based)."""

    def on_after_optimizer_step(self, step: int, total_steps: int) -> None:
        """Called after the optimiser has updated the parameters at step `step`."""
