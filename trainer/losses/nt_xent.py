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


def nt_xent_loss(z_a: torch.Tensor, z_b: torch.Tensor, temperature: float, *, gather: bool = True) -> torch.Tensor:
    """Mean NT-Xent over the 2N local anchors; z_a, z_b: [N, D], row i of each the views of image i.

    With `gather` and an initialised process group of more than one rank, the negatives are
    the views of every rank's images (global batch), with gradients flowing back to each rank.
    """
    if z_a.shape != z_b.shape or z_a.ndim != 2:
        raise ValueError(f"z_a and z_b must both be [N, D]; got {tuple(z_a.shape)} and {tuple(z_b.shape)}")
    # The similarity matrix and the log-sum-exp run in at least float32, even under autocast.
    with torch.autocast(device_type=z_a.device.type, enabled=False):
        dtype = torch.promote_types(z_a.dtype, torch.float32)
        z_a = F.normalize(z_a.to(dtype), dim=1)  # [N, D]
        z_b = F.normalize(z_b.to(dtype), dim=1)  # [N, D]
        n = z_a.shape[0]
        if gather and distributed.world_size() > 1:
            keys_a = distributed.gather_with_grad(z_a)  # [M, D], M = N * world
            keys_b = distributed.gather_with_grad(z_b)  # [M, D]
            offset = distributed.rank() * n
        else:
            keys_a, keys_b, offset = z_a, z_b, 0
        m = keys_a.shape[0]
        anchors = torch.cat([z_a, z_b])  # [2N, D]
        keys = torch.cat([keys_a, keys_b])  # [2M, D]
        logits = anchors @ keys.T / temperature  # [2N, 2M]
        idx = torch.arange(n, device=z_a.device) + offset  # global index of each local image
        self_cols = torch.cat([idx, idx + m])  # [2N]: where each anchor meets itself
        pos_cols = torch.cat([idx + m, idx])  # [2N]: the other view of the same image
        self_mask = F.one_hot(self_cols, 2 * m).to(torch.bool)  # [2N, 2M]
        logits = logits.masked_fill(self_mask, _SELF_MASK)
        return F.cross_entropy(logits, pos_cols)  # log-sum-exp inside: stable
