"""MoCo v2 (He et al. 2020, arXiv:1911.05722; Chen et al. 2020, arXiv:2003.04297).

A query encoder f_q with a 2-layer MLP head g_q is trained by InfoNCE (T = 0.2) against a
momentum key encoder f_k (theta_k <- m theta_k + (1 - m) theta_q, m = 0.999) and a queue of K
past keys used as negatives. What is new over the base method:

* The head g has BatchNorm in its hidden layer and at its output (no affine), as MoCo v3's
  projector, where the paper's v2 head is Linear-ReLU-Linear. Without the output BN the
  outputs of different images share a large common direction (mean cosine 0.4 between keys
  of different CIFAR-10 images at init, 0.5 to 0.7 after 40 steps), and against a queue of keys from
  earlier steps the loss falls fastest by moving that direction away from the queue's rather
  than by telling images apart: the loss stayed near ln(K + 1) and kNN at random init's. The
  output BN centres every BN batch, which removes that shortcut (docs/benchmarks.md).

* Symmetric loss by default: both views are queries and both are keys,
  loss = (InfoNCE(q_a, k_b) + InfoNCE(q_b, k_a)) / 2, as in MoCo v3 and lightly's and
  solo-learn's MoCo v2 recipes; `symmetric=False` gives the paper's original, asymmetric
  loss InfoNCE(q_a, k_b). Both losses use the queue as it was before this step; then the
  step's keys (2N, or N when asymmetric, gathered over all ranks) are enqueued, oldest out.
* Shuffle BN (paper, Sec. 3.3), so BatchNorm cannot leak which key belongs to which query:
  under DDP the key batch is shuffled across ranks before f_k and unshuffled after (as
  facebookresearch/moco's `_batch_shuffle_ddp`), unless the networks run SyncBatchNorm. On one process a
  shuffle alone changes nothing, so the batch is split into groups of at least 32 images (at
  most 8 groups, the paper's 8 GPUs) that each get their own BN statistics, and the keys are
  grouped by a random permutation (the "split BN" of the MoCo authors' CIFAR demo).
* Augmentation: the same T for both views (the config's); blur follows `augment.blur`,
  which is on above 64 px and off for small images as in SimCLR's CIFAR recipe.
"""

from __future__ import annotations

from collections.abc import Callable

import torch
import torch.distributed as dist
import torch.nn.functional as F
from torch import nn

from service.contract.train_config import TrainConfig
from trainer.distributed import gather_with_grad, rank, world_size
from trainer.losses.info_nce import info_nce_loss
from trainer.methods.base import Method, decided
from trainer.methods.momentum import ema_update, momentum_copy
from trainer.models import ProjectionHead
from trainer.sync_bn import SYNC_BATCHNORM_TYPES

BN_GROUP_MIN = 32  # images a BatchNorm group holds at least when one process emulates shuffle BN
BN_GROUPS_MAX = 8


class KeyQueue(nn.Module):
    """A FIFO of K unit-norm keys [K, D] with a write pointer; no gradients (buffers only)."""

    keys: torch.Tensor  # [K, D] buffer
    ptr: torch.Tensor  # [] buffer: where the next keys go

    def __init__(self, size: int, dim: int) -> None:
        super().__init__()
        # Random unit vectors until real keys replace them, as in the reference code.
        self.register_buffer("keys", F.normalize(torch.randn(size, dim), dim=1))  # [K, D]
        self.register_buffer("ptr", torch.zeros((), dtype=torch.long))

    @torch.no_grad()
    def enqueue(self, keys: torch.Tensor) -> None:
        """Write `keys` [n, D] at the pointer, wrapping around, so the n oldest keys go out."""
        size = self.keys.shape[0]
        ptr = int(self.ptr)
        if len(keys) > size:  # only the newest K survive; keep the pointer where they would end
            ptr = (ptr + len(keys) - size) % size
            keys = keys[-size:]
        idx = (ptr + torch.arange(len(keys), device=keys.device)) % size  # [n]
        self.keys[idx] = keys.to(self.keys.dtype)
        self.ptr.fill_((ptr + len(keys)) % size)


class MoCoV2(Method):
    def __init__(self, cfg: TrainConfig, symmetric: bool = True) -> None:
        super().__init__(cfg)
        dim, out = self.encoder.feature_dim, int(decided(self.cfg.proj_out_dim, "proj_out_dim"))
        hidden = self.cfg.proj_hidden_dim or dim
        self.projector = ProjectionHead(dim, hidden, out, last_bn=True)
        self.key_encoder = momentum_copy(self.encoder)
        self.key_projector = momentum_copy(self.projector)
        if self.cfg.queue_size is None or self.cfg.moco_momentum is None:
            raise ValueError("queue_size / moco_momentum are not decided: pass TrainConfig.resolved()")
        self.key_momentum = self.cfg.moco_momentum
        self.queue = KeyQueue(self.cfg.queue_size, out)
        self.symmetric = symmetric
        self.bn_groups = max(1, min(BN_GROUPS_MAX, self.cfg.batch_size // BN_GROUP_MIN))

    def _query(self, x: torch.Tensor) -> torch.Tensor:
        return self.projector(self.encoder(x))

    def _key(self, x: torch.Tensor) -> torch.Tensor:
        return F.normalize(self.key_projector(self.key_encoder(x)), dim=1)

    def training_step(self, x_a: torch.Tensor, x_b: torch.Tensor, valid: torch.Tensor | None = None) -> torch.Tensor:
        views_q = [x_a, x_b] if self.symmetric else [x_a]  # V views [N, 3, S, S]
        views_k = [x_b, x_a] if self.symmetric else [x_b]  # the key of view b is query a's positive
        split = self.bn_groups > 1 and world_size() == 1
        q = self._encode(self._query, views_q, torch.arange(len(x_a), device=x_a.device) if split else None)
        k = self._shuffled_keys(views_k)  # V x [N, P], unit rows
        negatives = self.queue.keys.clone()  # [K, P]; the enqueue below must not touch the graph
        temperature = float(decided(self.cfg.temperature, "temperature"))
        loss = torch.stack(
            [info_nce_loss(q_v, k_v, negatives, temperature, valid) for q_v, k_v in zip(q, k, strict=True)]
        )
        if valid is not None:  # a masked slot's key enqueues as zeros: logit 0 for every query, no gradient
            k = [k_v * valid.to(k_v).view(-1, 1) for k_v in k]
        self.queue.enqueue(gather_with_grad(torch.cat(k)))  # [world * V * N, P], under no_grad
        return loss.mean()

    def _encode(
        self, net: Callable[[torch.Tensor], torch.Tensor], views: list[torch.Tensor], order: torch.Tensor | None
    ) -> list[torch.Tensor]:
        """`net` over V views [N, 3, S, S] -> V outputs [N, P]; all views of an image share a BN batch.

        With `order` (a permutation [N]) the images are split, in that order, into
        `bn_groups` BatchNorm batches, as if each group were on its own GPU.
        """
        if order is None:
            return list(net(torch.cat(views)).chunk(len(views)))
        parts = [
            net(torch.cat([v[idx] for v in views])).unflatten(0, (len(views), len(idx)))  # [V, n, P]
            for idx in order.chunk(self.bn_groups)
        ]
        return list(torch.cat(parts, dim=1)[:, torch.argsort(order)].unbind(0))  # rows back in input order

    @torch.no_grad()
    def _shuffled_keys(self, views: list[torch.Tensor]) -> list[torch.Tensor]:
        """Keys V x [N, P] of the views, each computed in a BN batch other than its query's."""
        n, device, world = len(views[0]), views[0].device, world_size()
        if world == 1:
            return self._encode(self._key, views, torch.randperm(n, device=device) if self.bn_groups > 1 else None)
        if any(isinstance(m, SYNC_BATCHNORM_TYPES) for m in self.key_encoder.modules()):
            return self._encode(self._key, views, None)  # global BN statistics: nothing to hide
        every = [gather_with_grad(v) for v in views]  # V x [W * N, 3, S, S]; no graph under no_grad
        perm = torch.randperm(world * n, device=device)
        dist.broadcast(perm, src=0)
        mine = perm.view(world, n)[rank()]  # [N] global indices this rank encodes
        keys = torch.stack(self._encode(self._key, [e[mine] for e in every], None), dim=1)  # [N, V, P]
        keys = gather_with_grad(keys)[torch.argsort(perm)]  # [W * N, V, P] in global order
        return list(keys.view(world, n, *keys.shape[1:])[rank()].unbind(1))  # this rank's images

    def on_after_optimizer_step(self, step: int, total_steps: int) -> None:
        m = self.key_momentum
        ema_update(self.encoder, self.key_encoder, m)
        ema_update(self.projector, self.key_projector, m)
