"""BYOL's regression loss (Grill et al. 2020, arXiv:2006.07733, Eq. 2).

The online prediction p must match the target projection z' of the other view; both are
L2-normalised, so the squared error is 2 - 2 cos(p, z'). No gradient flows into z' (sg).
"""

from __future__ import annotations

import torch
import torch.nn.functional as F


def byol_loss(prediction: torch.Tensor, target: torch.Tensor, valid: torch.Tensor | None = None) -> torch.Tensor:
    """mean_i (2 - 2 cos(p_i, sg(z'_i))) over the rows i not masked out by `valid` (bool [N]);
    prediction, target: [N, D] -> scalar in [0, 4]."""
    cos = F.cosine_similarity(prediction.float(), target.detach().float(), dim=1)  # [N]
    loss = 2 - 2 * cos  # [N]
    if valid is None:
        return loss.mean()
    valid = valid.to(loss.device)
    return loss[valid].mean() if bool(valid.any()) else loss.sum() * 0.0
