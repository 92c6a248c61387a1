"""lightly's SimCLR at a TrainConfig's settings: the other side of the races in bench/.

Built from lightly's own parts as its SimCLR examples and benchmarks assemble them:
`SimCLRTransform` (per-image PIL/torchvision transforms, two views per image) with the
config's crop scale, colour strength, flip, grayscale and blur; `SimCLRProjectionHead`
(Linear-BN-ReLU-Linear to 128); `NTXentLoss` at the config's temperature; lightly's `LARS`
(trust coefficient 0.001, momentum, weight decay only on weights, hence no adaptation of
biases and BatchNorm parameters) under `CosineWarmupScheduler` stepped per optimiser step.
The encoder is the same torchvision ResNet as ours (`trainer.models.Encoder`, seeded the same),
so that the races compare the two implementations of one recipe, not two networks.

Needs the `bench` extra (`pip install -e '.[bench]'`); importing this module without lightly
raises ImportError.
"""

from __future__ import annotations

import time
from collections.abc import Callable
from dataclasses import dataclass

import numpy as np
import torch
from lightly.loss import NTXentLoss
from lightly.models.modules import SimCLRProjectionHead
from lightly.transforms import SimCLRTransform
from lightly.utils.lars import LARS
from lightly.utils.scheduler import CosineWarmupScheduler
from PIL import Image
from torch import nn
from torch.utils.data import DataLoader, Dataset

from service.contract.train_config import TrainConfig
from trainer.engine import loader_workers
from trainer.models import Encoder
from trainer.optim import param_groups


def lightly_transform(cfg: TrainConfig) -> SimCLRTransform:
    """SimCLRTransform with the augmentation settings of `cfg` (resolved)."""
    aug = cfg.augment
    return SimCLRTransform(
        input_size=cfg.image_size,
        cj_prob=aug.color_jitter_prob,
        cj_strength=aug.color_strength,
        min_scale=aug.crop_min_scale,
        random_gray_scale=aug.grayscale_prob,
        gaussian_blur=aug.blur_prob if aug.blur else 0.0,
        sigmas=(aug.blur_sigma_min, aug.blur_sigma_max),
        hf_prob=aug.hflip_prob,
    )


class TwoViewDataset(Dataset):
    """uint8 [N, S, S, 3] images -> (view_a, view_b), each float [3, S, S], through `transform`
    (lightly's SimCLRTransform or BYOLTransform: a PIL image -> its two views)."""

    def __init__(self, images: np.ndarray, transform: Callable[[Image.Image], list[torch.Tensor]]) -> None:
        self.images, self.transform = images, transform

    def __len__(self) -> int:
        return len(self.images)

    def __getitem__(self, index: int) -> tuple[torch.Tensor, torch.Tensor]:
        view_a, view_b = self.transform(Image.fromarray(self.images[index]))
        return view_a, view_b


@dataclass
class LightlySimCLR:
    """Encoder, head, loss, optimiser and schedule of one lightly SimCLR run."""

    encoder: Encoder
    head: SimCLRProjectionHead
    criterion: NTXentLoss
    optimizer: LARS
    scheduler: CosineWarmupScheduler

    @classmethod
    def build(cls, cfg: TrainConfig, total_steps: int, warmup_steps: int, device: torch.device) -> LightlySimCLR:
        torch.manual_seed(cfg.seed)  # same initial encoder as trainer.engine at this seed
        encoder = Encoder(cfg.backbone, bool(cfg.small_stem)).to(device)
        dim = encoder.feature_dim
        head = SimCLRProjectionHead(dim, cfg.proj_hidden_dim or dim, int(cfg.proj_out_dim)).to(device)
        optimizer = LARS(
            param_groups(nn.ModuleList([encoder, head]), cfg.weight_decay), lr=cfg.learning_rate, momentum=cfg.momentum
        )
        scheduler = CosineWarmupScheduler(optimizer, warmup_epochs=warmup_steps, max_epochs=total_steps)
        return cls(encoder, head, NTXentLoss(temperature=float(cfg.temperature)), optimizer, scheduler)

    def train(self) -> None:
        self.encoder.train()
        self.head.train()

    def step(self, view_a: torch.Tensor, view_b: torch.Tensor, bf16: bool = False) -> torch.Tensor:
        """One optimiser step on two batches of views [n, 3, S, S]; returns the detached loss."""
        with torch.autocast(view_a.device.type, dtype=torch.bfloat16, enabled=bf16):
            z = self.head(self.encoder(torch.cat([view_a, view_b])))  # [2n, 128]
            loss = self.criterion(*z.float().chunk(2))
        self.optimizer.zero_grad(set_to_none=True)
        loss.backward()
        self.optimizer.step()
        self.scheduler.step()
        return loss.detach()


def train_lightly(cfg: TrainConfig, images: np.ndarray) -> tuple[Encoder, dict[str, float]]:
    """Pretrain lightly's `cfg.method` (SimCLR, or BYOL from bench/lightly_byol.py) on uint8
    [N, S, S, 3] for cfg.epochs on the CPU (drop_last, shuffled per epoch), warming up for
    cfg.warmup_epochs as the engine does.

    Returns the encoder and {steps, wall_s, images_per_s, loss_first_window, loss_last_window}
    with 5-step loss windows, as the engine logs them.
    """
    if cfg.method == "byol":
        from lightly_byol import LightlyBYOL, lightly_byol_transform

        transform, build = lightly_byol_transform(cfg), LightlyBYOL.build
    elif cfg.method == "simclr":
        transform, build = lightly_transform(cfg), LightlySimCLR.build
    else:
        raise ValueError(f"no lightly counterpart here for {cfg.method!r}")
    loader = DataLoader(
        TwoViewDataset(images, transform),
        batch_size=cfg.batch_size,
        shuffle=True,
        drop_last=True,
        num_workers=loader_workers(cfg.num_workers, 1),  # the count our loader takes
        generator=torch.Generator().manual_seed(cfg.seed),
    )
    total_steps = len(loader) * cfg.epochs
    run = build(cfg, total_steps, round(cfg.warmup_epochs * len(loader)), torch.device("cpu"))
    run.train()
    losses: list[float] = []
    started = time.perf_counter()
    for _ in range(cfg.epochs):
        for view_a, view_b in loader:
            losses.append(float(run.step(view_a, view_b)))
    wall = time.perf_counter() - started
    return run.encoder, {
        "steps": len(losses),
        "wall_s": round(wall, 1),
        "images_per_s": round(len(losses) * cfg.batch_size / wall, 1),
        "loss_first_window": float(np.mean(losses[:5])),
        "loss_last_window": float(np.mean(losses[-5:])),
    }
