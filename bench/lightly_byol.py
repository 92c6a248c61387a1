"""lightly's BYOL at a TrainConfig's settings: the other side of BYOL's race in bench/methods_compare.py.

Built from lightly's own parts as its BYOL example and CIFAR-10 benchmark assemble them:
`BYOLTransform` (view 1 and view 2 differ in blur and solarisation) with the config's crop,
colour, flip, grayscale, blur and per-view probabilities; `BYOLProjectionHead` and
`BYOLPredictionHead` at the config's widths; momentum copies of encoder and projector moved by
`update_momentum` at `cosine_schedule(step, total, tau_base, 1)` before each step;
`NegativeCosineSimilarity` with each view forwarded as its own batch, symmetrised; lightly's
`LARS` under `CosineWarmupScheduler`, as bench/lightly_simclr.py. The encoder is ours
(`trainer.models.Encoder`, seeded the same), so that the race compares two implementations of
one recipe. Needs the `bench` extra.
"""

from __future__ import annotations

import copy
from dataclasses import dataclass, field

import torch
from lightly.loss import NegativeCosineSimilarity
from lightly.models.modules import BYOLPredictionHead, BYOLProjectionHead
from lightly.models.utils import deactivate_requires_grad, update_momentum
from lightly.transforms.byol_transform import BYOLTransform, BYOLView1Transform, BYOLView2Transform
from lightly.utils.lars import LARS
from lightly.utils.scheduler import CosineWarmupScheduler, cosine_schedule
from torch import nn

from service.contract.train_config import TrainConfig
from trainer.models import Encoder
from trainer.optim import param_groups


def lightly_byol_transform(cfg: TrainConfig) -> BYOLTransform:
    """BYOLTransform with the augmentation settings of `cfg` (resolved, method byol)."""
    aug = cfg.augment
    jitter = dict(cj_prob=aug.color_jitter_prob, cj_strength=1.0, cj_bright=0.8 * aug.color_strength,
                  cj_contrast=0.8 * aug.color_strength, cj_sat=0.8 * aug.color_strength,
                  cj_hue=0.2 * aug.color_strength)  # ours: (0.8s, 0.8s, 0.8s, 0.2s)  # fmt: skip
    shared = dict(input_size=cfg.image_size, min_scale=aug.crop_min_scale, random_gray_scale=aug.grayscale_prob,
                  sigmas=(aug.blur_sigma_min, aug.blur_sigma_max), hf_prob=aug.hflip_prob, **jitter)  # fmt: skip
    view_b = aug.view_b()
    return BYOLTransform(
        view_1_transform=BYOLView1Transform(gaussian_blur=aug.blur_prob if aug.blur else 0.0,
                                            solarization_prob=aug.solarize_prob, **shared),
        view_2_transform=BYOLView2Transform(gaussian_blur=view_b.blur_prob if aug.blur else 0.0,
                                            solarization_prob=view_b.solarize_prob, **shared),
    )  # fmt: skip


@dataclass
class LightlyBYOL:
    """Online encoder, projector and predictor, their momentum copies, loss, optimiser and schedule."""

    encoder: Encoder
    projector: BYOLProjectionHead
    predictor: BYOLPredictionHead
    encoder_momentum: Encoder
    projector_momentum: BYOLProjectionHead
    optimizer: LARS
    scheduler: CosineWarmupScheduler
    tau_base: float
    total_steps: int
    criterion: NegativeCosineSimilarity = field(default_factory=NegativeCosineSimilarity)
    steps_done: int = 0

    @classmethod
    def build(cls, cfg: TrainConfig, total_steps: int, warmup_steps: int, device: torch.device) -> LightlyBYOL:
        torch.manual_seed(cfg.seed)  # same initial encoder as trainer.engine at this seed
        encoder = Encoder(cfg.backbone, bool(cfg.small_stem)).to(device)
        out = int(cfg.proj_out_dim)
        projector = BYOLProjectionHead(encoder.feature_dim, int(cfg.proj_hidden_dim), out).to(device)
        predictor = BYOLPredictionHead(out, int(cfg.pred_hidden_dim), out).to(device)
        encoder_momentum, projector_momentum = copy.deepcopy(encoder), copy.deepcopy(projector)
        deactivate_requires_grad(encoder_momentum)
        deactivate_requires_grad(projector_momentum)
        online = nn.ModuleList([encoder, projector, predictor])
        optimizer = LARS(param_groups(online, cfg.weight_decay), lr=cfg.learning_rate, momentum=cfg.momentum)
        scheduler = CosineWarmupScheduler(optimizer, warmup_epochs=warmup_steps, max_epochs=total_steps)
        return cls(encoder, projector, predictor, encoder_momentum, projector_momentum, optimizer, scheduler,
                   float(cfg.byol_tau_base), total_steps)  # fmt: skip

    def train(self) -> None:
        for module in (self.encoder, self.projector, self.predictor, self.encoder_momentum, self.projector_momentum):
            module.train()

    def step(self, view_a: torch.Tensor, view_b: torch.Tensor, bf16: bool = False) -> torch.Tensor:
        """One optimiser step on two batches of views [n, 3, S, S]; returns the detached loss."""
        tau = cosine_schedule(self.steps_done, self.total_steps, self.tau_base, 1.0)
        update_momentum(self.encoder, self.encoder_momentum, m=tau)
        update_momentum(self.projector, self.projector_momentum, m=tau)
        with torch.autocast(view_a.device.type, dtype=torch.bfloat16, enabled=bf16):
            p_a = self.predictor(self.projector(self.encoder(view_a)))  # [n, 256]
            p_b = self.predictor(self.projector(self.encoder(view_b)))
            with torch.no_grad():
                z_a = self.projector_momentum(self.encoder_momentum(view_a))  # [n, 256]
                z_b = self.projector_momentum(self.encoder_momentum(view_b))
            loss = 0.5 * (self.criterion(p_a.float(), z_b.float()) + self.criterion(p_b.float(), z_a.float()))
        self.optimizer.zero_grad(set_to_none=True)
        loss.backward()
        self.optimizer.step()
        self.scheduler.step()
        self.steps_done += 1
        return loss.detach()
