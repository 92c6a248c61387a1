"""Momentum (EMA) networks shared by MoCo and BYOL.

MoCo (He et al. 2020, arXiv:1911.05722, Eq. 2): theta_k <- m theta_k + (1 - m) theta_q with a
fixed m. BYOL (Grill et al. 2020, arXiv:2006.07733, Sec. 3.2) uses the same update with a rate
tau that rises from tau_base to 1 over training: tau = 1 - (1 - tau_base)(cos(pi k / K) + 1) / 2.
Only parameters are averaged; the momentum network's BatchNorm running statistics are its own
(it runs in train mode and normalises with batch statistics, as in both papers' code).
"""

from __future__ import annotations

import copy
import math

import torch
from torch import nn


def momentum_copy(module: nn.Module) -> nn.Module:
    """A frozen copy of `module` to be moved by :func:`ema_update` only (never by the optimiser)."""
    target = copy.deepcopy(module)
    target.requires_grad_(False)
    return target


@torch.no_grad()
def ema_update(online: nn.Module, target: nn.Module, tau: float) -> None:
    """target <- tau * target + (1 - tau) * online, parameter by parameter, in place."""
    for p_online, p_target in zip(online.parameters(), target.parameters(), strict=True):
        p_target.lerp_(p_online.detach(), 1.0 - tau)


def cosine_tau(step: int, total_steps: int, tau_base: float, tau_final: float = 1.0) -> float:
    """BYOL's EMA rate at optimiser step `step` of `total_steps`: tau_base at 0, tau_final at the end."""
    progress = min(max(step, 0), total_steps) / max(total_steps, 1)
    return tau_final - (tau_final - tau_base) * (math.cos(math.pi * progress) + 1) / 2
