"""BYOL (Grill et al. 2020, arXiv:2006.07733): predict a slowly moving target network, no negatives.

Online: f, projector g (Linear(D, 4096)-BN-ReLU-Linear(4096, 256)) and predictor q (same shape,
256 -> 4096 -> 256). Target: copies of f and g moved only by EMA with rate
tau = 1 - (1 - tau_base)(cos(pi k / K) + 1) / 2, tau_base = 0.996. What is new over the base:

* Loss: 2 - 2 cos(q(g(f(v))), sg(g'(f'(v')))) for both orderings of the two views; we report
  the mean of the two (lightly's convention), half the paper's sum, so its scale matches a
  single term (range [0, 4]).
* The asymmetric augmentation pair (paper, Table 6): view a blur p = 1.0, no solarisation;
  view b blur p = 0.1, solarisation p = 0.2. These are BYOL's defaults in the config
  (METHOD_AUGMENT_DEFAULTS: view a takes `blur_prob`/`solarize_prob`, view b
  `view_b_blur_prob`/`view_b_solarize_prob`, falling back to view a's), so explicit values
  win. Blur itself follows `augment.blur` (off for images of 64 px or less, as solo-learn's
  CIFAR recipe), so small images keep only the solarisation asymmetry.
"""

from __future__ import annotations

import torch

from service.contract.train_config import AugmentConfig, TrainConfig
from trainer.losses.byol import byol_loss
from trainer.methods.base import Method, decided
from trainer.methods.momentum import cosine_tau, ema_update, momentum_copy
from trainer.models import ProjectionHead


class BYOL(Method):
    def __init__(self, cfg: TrainConfig) -> None:
        super().__init__(cfg)
        dim, out = self.encoder.feature_dim, int(decided(self.cfg.proj_out_dim, "proj_out_dim"))
        self.projector = ProjectionHead(dim, int(self.cfg.proj_hidden_dim or dim), out)
        self.predictor = ProjectionHead(out, int(self.cfg.pred_hidden_dim or dim), out)
        if self.cfg.byol_tau_base is None:
            raise ValueError("byol_tau_base is not decided: pass TrainConfig.resolved()")
        self.tau_base = self.cfg.byol_tau_base
        self.target_encoder = momentum_copy(self.encoder)
        self.target_projector = momentum_copy(self.projector)

    def views_augment(self) -> tuple[AugmentConfig, AugmentConfig]:
        return self.cfg.augment, self.cfg.augment.view_b()

    def training_step(self, x_a: torch.Tensor, x_b: torch.Tensor, valid: torch.Tensor | None = None) -> torch.Tensor:
        x = torch.cat([x_a, x_b])  # [2N, 3, S, S]: one batch, BN statistics over both views
        p_a, p_b = self.predictor(self.projector(self.encoder(x))).chunk(2)  # [N, 256] each
        with torch.no_grad():
            z_a, z_b = self.target_projector(self.target_encoder(x)).chunk(2)  # [N, 256] each
        return (byol_loss(p_a, z_b, valid) + byol_loss(p_b, z_a, valid)) / 2

    def on_after_optimizer_step(self, step: int, total_steps: int) -> None:
        tau = cosine_tau(step, total_steps, self.tau_base)
        ema_update(self.encoder, self.target_encoder, tau)
        ema_update(self.projector, self.target_projector, tau)
