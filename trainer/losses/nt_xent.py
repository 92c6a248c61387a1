"""NT-Xent, the normalised temperature-scaled cross-entropy of SimCLR (Chen et al. 2020,
arXiv:2002.05709, Eq. 1 and Alg. 1).

For 2N views (N images, two views each) and unit vectors z, anchor i with positive j(i):

    l_i  = -log( exp(s_ij / T) / sum_{k != i} exp(s_ik / T) ),   s = cosine similarity
    loss = mean over the 2N anchors of l_i

so each anchor has 1 positive and 2N - 2 negatives. In a distributed run every rank holds
N_local images; the candidates (positives and negatives) are gathered from all ranks with
gradients, while the mean runs over the local anchors only. DDP then averages the
per-rank losses' gradients, which equals the gradient of the single-process global mean.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F

from trainer import distributed

# Added to self-similarity logits; finite (unlike -inf) so that 0 * mask stays 0 in
# backward and gradcheck sees a smooth function, and exp() of it is exactly 0.
_SELF_MASK = -1e9


def nt_xent_loss(
    z_a: torch.Tensor,
    z_b: torch.Tensor,
    temperature: float,
    *,
    gather: bool = True,
    valid: torch.Tensor | None = None,
) -> torch.Tensor:
    """Mean NT-Xent over the 2N local anchors; z_a, z_b: [N, D], row i of each the views of image i.

    With `gather` and an initialised process group of more than one rank, the negatives are
    the views of every rank's images (global batch), with gradients flowing back to each rank.
    `valid` (bool [N]) masks slots out: a masked image is neither an anchor nor a candidate.
    """
    if z_a.shape != z_b.shape or z_a.ndim != 2:
        raise ValueError(f"z_a and z_b must both be [N, D]; got {tuple(z_a.shape)} and {tuple(z_b.shape)}")
    # The similarity matrix and the log-sum-exp run in at least float32, even under autocast.
    with torch.autocast(device_type=z_a.device.type, enabled=False):
        dtype = torch.promote_types(z_a.dtype, torch.float32)
        z_a = F.normalize(z_a.to(dtype), dim=1)  # [N, D]
        z_b = F.normalize(z_b.to(dtype), dim=1)  # [N, D]
        n = z_a.shape[0]
        local_valid = torch.ones(n, dtype=torch.bool, device=z_a.device) if valid is None else valid.to(z_a.device)
        if gather and distributed.world_size() > 1:
            keys_a = distributed.gather_with_grad(z_a)  # [M, D], M = N * world
            keys_b = distributed.gather_with_grad(z_b)  # [M, D]
            keys_valid = distributed.gather_with_grad(local_valid.to(dtype)) > 0.5  # [M]
            offset = distributed.rank() * n
        else:
            keys_a, keys_b, keys_valid, offset = z_a, z_b, local_valid, 0
        m = keys_a.shape[0]
        anchors = torch.cat([z_a, z_b])  # [2N, D]
        keys = torch.cat([keys_a, keys_b])  # [2M, D]
        logits = anchors @ keys.T / temperature  # [2N, 2M]
        idx = torch.arange(n, device=z_a.device) + offset  # global index of each local image
        self_cols = torch.cat([idx, idx + m])  # [2N]: where each anchor meets itself
        pos_cols = torch.cat([idx + m, idx])  # [2N]: the other view of the same image
        self_mask = F.one_hot(self_cols, 2 * m).to(torch.bool)  # [2N, 2M]
        self_mask |= ~torch.cat([keys_valid, keys_valid]).view(1, 2 * m)  # masked slots are no candidates
        logits = logits.masked_fill(self_mask, _SELF_MASK)
        anchors_valid = torch.cat([local_valid, local_valid])  # [2N]
        if not bool(anchors_valid.any()):
            return logits.sum() * 0.0  # every slot masked: no loss, the graph kept for DDP
        return F.cross_entropy(logits[anchors_valid], pos_cols[anchors_valid])  # log-sum-exp inside: stable
