"""Optimisers and the learning-rate schedule of SimCLR (Chen et al. 2020, Sec. B.6).

LARS (You et al. 2017, arXiv:1708.03888) scales each weight tensor's step by a trust ratio
eta * ||w|| / ||g + wd w||, as in the paper's TensorFlow code. Biases and BatchNorm
parameters (every tensor with ndim <= 1) are in a param group flagged `lars_exclude`: no
adaptation and no weight decay. Schedule: linear warm-up, then cosine decay to 0.
"""

from __future__ import annotations

import functools
import math
from collections.abc import Callable, Iterable

import torch
from torch import nn

from service.contract.train_config import TrainConfig


class LARS(torch.optim.Optimizer):
    """SGD with momentum and layer-wise trust ratios; param groups may set `lars_exclude=True`.

    Per tensor w with gradient g (float math, in place):
        d = g + wd * w                      (wd = 0 when excluded)
        r = eta * ||w|| / ||d||             (1 when excluded or either norm is 0)
        v = momentum * v + lr * r * d       (lr inside the momentum, as the paper's code)
        w = w - v
    """

    def __init__(
        self,
        params: Iterable[torch.Tensor] | Iterable[dict],
        lr: float,
        momentum: float = 0.9,
        weight_decay: float = 0.0,
        eta: float = 0.001,
    ) -> None:
        if lr < 0 or not 0 <= momentum < 1 or weight_decay < 0 or eta <= 0:
            raise ValueError(f"invalid LARS hyper-parameters lr={lr} momentum={momentum} wd={weight_decay} eta={eta}")
        defaults = dict(lr=lr, momentum=momentum, weight_decay=weight_decay, eta=eta, lars_exclude=False)
        super().__init__(params, defaults)

    @torch.no_grad()
    def step(self, closure: Callable[[], torch.Tensor] | None = None) -> torch.Tensor | None:  # type: ignore[override]
        loss = None
        if closure is not None:
            with torch.enable_grad():
                loss = closure()
        for group in self.param_groups:
            exclude = group["lars_exclude"]
            for p in group["params"]:
                if p.grad is None:
                    continue
                d = p.grad
                if not exclude:
                    if group["weight_decay"]:
                        d = d.add(p, alpha=group["weight_decay"])
                    w_norm, d_norm = torch.linalg.vector_norm(p), torch.linalg.vector_norm(d)
                    ratio = torch.where(
                        (w_norm > 0) & (d_norm > 0), group["eta"] * w_norm / d_norm, torch.ones_like(w_norm)
                    )
                    d = d * ratio
                state = self.state[p]
                if "momentum_buffer" not in state:
                    state["momentum_buffer"] = torch.zeros_like(p)
                buf = state["momentum_buffer"]
                buf.mul_(group["momentum"]).add_(d, alpha=group["lr"])
                p.sub_(buf)
        return loss


def param_groups(model: nn.Module, weight_decay: float) -> list[dict]:
    """Two groups: weights (decayed, adapted) and biases/BN parameters (`lars_exclude`, no decay)."""
    params = [p for p in model.parameters() if p.requires_grad]
    weights = [p for p in params if p.ndim > 1]
    excluded = [p for p in params if p.ndim <= 1]
    return [
        {"params": weights, "weight_decay": weight_decay, "lars_exclude": False},
        {"params": excluded, "weight_decay": 0.0, "lars_exclude": True},
    ]


def build_optimizer(model: nn.Module, cfg: TrainConfig) -> torch.optim.Optimizer:
    """`cfg.optimizer` at the peak rate `cfg.learning_rate` (already scaled with the batch size);
    `cfg` resolved (service.contract.defaults)."""
    if cfg.weight_decay is None or cfg.optimizer is None:
        raise ValueError("optimizer / weight_decay are not decided yet: use TrainConfig.resolved()")
    groups = param_groups(model, cfg.weight_decay)
    lr = cfg.learning_rate
    if cfg.optimizer == "lars":
        return LARS(groups, lr=lr, momentum=cfg.momentum)
    if cfg.optimizer == "sgd":
        return torch.optim.SGD(groups, lr=lr, momentum=cfg.momentum)
    if cfg.optimizer == "adamw":
        return torch.optim.AdamW(groups, lr=lr)
    raise ValueError(f"unknown optimizer {cfg.optimizer!r}")


def warmup_cosine(step: int, total_steps: int, warmup_steps: int) -> float:
    """Multiplier of the peak rate for optimiser step `step` (0-based).

    (step + 1) / warmup_steps during warm-up, so the first step already moves; then
    0.5 (1 + cos(pi (step - warmup) / (total - warmup))), which is 1 at the end of warm-up
    and reaches 0 at step == total_steps.
    """
    if step < warmup_steps:
        return (step + 1) / warmup_steps
    decay_steps = max(total_steps - warmup_steps, 1)
    progress = min(step - warmup_steps, decay_steps) / decay_steps
    return 0.5 * (1.0 + math.cos(math.pi * progress))


def build_scheduler(
    optimizer: torch.optim.Optimizer, total_steps: int, warmup_steps: int
) -> torch.optim.lr_scheduler.LambdaLR:
    """Per-step LambdaLR of :func:`warmup_cosine` (its state dict holds only numbers)."""
    schedule = functools.partial(warmup_cosine, total_steps=total_steps, warmup_steps=min(warmup_steps, total_steps))
    return torch.optim.lr_scheduler.LambdaLR(optimizer, schedule)
