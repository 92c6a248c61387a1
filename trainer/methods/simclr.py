"""SimCLR (Chen et al. 2020, arXiv:2002.05709, Alg. 1): f, then g, then NT-Xent.

h = f(x) [N, D] is the representation kept after training; z = g(h) [N, 128] is where the
contrastive loss is applied. g is Linear(D, D)-BN-ReLU-Linear(D, 128) (Sec. B.9; the hidden
width defaults to the feature dim). Both views go through f and g in one batch of 2N, as in
the paper's code, so BatchNorm statistics cover both views.
"""

from __future__ import annotations

import torch

from service.contract.train_config import TrainConfig
from trainer.losses.nt_xent import nt_xent_loss
from trainer.methods.base import Method, decided
from trainer.models import ProjectionHead


class SimCLR(Method):
    def __init__(self, cfg: TrainConfig) -> None:
        super().__init__(cfg)
        dim = self.encoder.feature_dim
        self.projector = ProjectionHead(
            dim, self.cfg.proj_hidden_dim or dim, int(decided(self.cfg.proj_out_dim, "proj_out_dim"))
        )

    def training_step(self, x_a: torch.Tensor, x_b: torch.Tensor, valid: torch.Tensor | None = None) -> torch.Tensor:
        z = self.projector(self.encoder(torch.cat([x_a, x_b])))  # [2N, 128]
        z_a, z_b = z.chunk(2)  # [N, 128] each
        return nt_xent_loss(z_a, z_b, float(decided(self.cfg.temperature, "temperature")), valid=valid)
