"""InfoNCE with a queue of negatives (MoCo, He et al. 2020, arXiv:1911.05722, Eq. 1 and Alg. 1).

For a query q_i, its positive key k_i (the other view through the momentum encoder) and K
negatives from the queue, all unit vectors:

    logits_i = [q_i . k_i, q_i . queue_1, ..., q_i . queue_K] / T     [N, 1 + K]
    loss     = mean_i CE(logits_i, label 0)

MoCo v2 (Chen et al. 2020, arXiv:2003.04297) uses T = 0.2.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F


def info_nce_logits(query: torch.Tensor, key: torch.Tensor, queue: torch.Tensor, temperature: float) -> torch.Tensor:
    """Logits [N, 1 + K]: column 0 the positive pair, the rest the queue.

    query, key: [N, D] (normalised here); queue: [K, D], rows already unit-norm (as stored).
    """
    q = F.normalize(query, dim=1)  # [N, D]
    k = F.normalize(key, dim=1)  # [N, D]
    l_pos = (q * k).sum(dim=1, keepdim=True)  # [N, 1]
    l_neg = q @ queue.detach().T  # [N, K]
    return torch.cat([l_pos, l_neg], dim=1) / temperature  # [N, 1 + K]


def info_nce_loss(
    query: torch.Tensor,
    key: torch.Tensor,
    queue: torch.Tensor,
    temperature: float = 0.2,
    valid: torch.Tensor | None = None,
) -> torch.Tensor:
    """Mean cross-entropy of :func:`info_nce_logits` with the positive at index 0, over the
    queries not masked out by `valid` (bool [N]); a scalar."""
    logits = info_nce_logits(query, key, queue, temperature).float()  # [N, 1 + K]
    if valid is not None:
        valid = valid.to(logits.device)
        if not bool(valid.any()):
            return logits.sum() * 0.0
        logits = logits[valid]
    labels = torch.zeros(logits.shape[0], dtype=torch.long, device=logits.device)
    return F.cross_entropy(logits, labels)
