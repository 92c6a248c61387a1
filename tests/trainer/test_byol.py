"""BYOL: the loss against a float64 loop, the target network, the per-view augmentations."""

from __future__ import annotations

import json
import math
from pathlib import Path

import numpy as np
import pytest
import torch
import torch.nn.functional as F

from service.contract.train_config import TrainConfig
from trainer.checkpoint import load_encoder
from trainer.engine import train
from trainer.losses.byol import byol_loss
from trainer.methods.byol import BYOL
from trainer.models import Encoder
from trainer.optim import build_optimizer


def _loop_byol(p: np.ndarray, z: np.ndarray) -> float:
    total = 0.0
    for a, b in zip(p, z, strict=True):
        dot = sum(x * y for x, y in zip(a, b, strict=True))
        total += 2 - 2 * dot / (math.sqrt(sum(x * x for x in a)) * math.sqrt(sum(y * y for y in b)))
    return total / len(p)


@pytest.mark.parametrize("source", ["random", "photos"])
def test_byol_loss_matches_float64_loop(source: str, request: pytest.FixtureRequest) -> None:
    if source == "random":
        rng = np.random.default_rng(0)
        p, z = rng.normal(size=(9, 7)), rng.normal(size=(9, 7))
    else:  # pixel vectors of two crops of the same real photos
        img = request.getfixturevalue("photos").astype(np.float64) / 255.0 - 0.5
        p, z = img[:9, :16, :16].reshape(9, -1), img[:9, 8:24, 8:24].reshape(9, -1)
    loss = byol_loss(torch.from_numpy(p), torch.from_numpy(z))
    assert loss.item() == pytest.approx(_loop_byol(p, z), rel=1e-6)  # computed in float32


def test_byol_loss_bounds_and_stop_gradient() -> None:
    torch.manual_seed(0)
    p = torch.randn(5, 4, requires_grad=True)
    z = torch.randn(5, 4, requires_grad=True)
    assert byol_loss(p, 3 * p.detach()).item() == pytest.approx(0.0, abs=1e-6)
    assert byol_loss(p, -p.detach()).item() == pytest.approx(4.0, abs=1e-6)
    byol_loss(p, z).backward()
    assert p.grad is not None and p.grad.abs().sum() > 0
    assert z.grad is None  # sg(z'): the target side never receives a gradient


# --- the method -------------------------------------------------------------------------

N, S = 8, 16


def _tiny(**kw: object) -> BYOL:
    cfg = TrainConfig(
        method="byol", batch_size=N, image_size=S, small_stem=False, proj_hidden_dim=32,
        proj_out_dim=16, pred_hidden_dim=32, optimizer="sgd", base_lr=0.5, **kw,
    )  # fmt: skip
    torch.manual_seed(0)
    return BYOL(cfg)


def test_byol_step_no_gradient_into_target_and_ema_with_cosine_tau() -> None:
    method = _tiny()
    method.train()
    g = torch.Generator().manual_seed(1)
    x_a, x_b = torch.randn(N, 3, S, S, generator=g), torch.randn(N, 3, S, S, generator=g)
    target = list(method.target_encoder.parameters()) + list(method.target_projector.parameters())
    online = list(method.encoder.parameters()) + list(method.projector.parameters())
    assert target and not any(p.requires_grad for p in target)
    target_before = [p.detach().clone() for p in target]

    loss = method.training_step(x_a, x_b)
    with torch.no_grad():  # reference: predictions vs the other view's target projection, both orders
        p = method.predictor(method.projector(method.encoder(torch.cat([x_a, x_b]))))
        z = method.target_projector(method.target_encoder(torch.cat([x_a, x_b])))
        cos = lambda u, v: F.cosine_similarity(u.double(), v.double(), dim=1)
        expected = ((2 - 2 * cos(p[:N], z[N:])).mean() + (2 - 2 * cos(p[N:], z[:N])).mean()) / 2
    assert loss.item() == pytest.approx(expected.item(), rel=1e-5)

    optimizer = build_optimizer(method, method.cfg)
    optimizer.zero_grad()
    loss.backward()
    assert all(p.grad is None for p in target)
    assert all(p.grad is not None for p in online + list(method.predictor.parameters()))
    optimizer.step()
    assert all(torch.equal(p, p0) for p, p0 in zip(target, target_before, strict=True))

    step, total = 3, 10
    tau = 1 - (1 - 0.996) * (math.cos(math.pi * step / total) + 1) / 2
    expected_t = [tau * t.double() + (1 - tau) * o.detach().double() for o, t in zip(online, target, strict=True)]
    method.on_after_optimizer_step(step, total)
    for p_t, e in zip(target, expected_t, strict=True):
        torch.testing.assert_close(p_t.double(), e, rtol=1e-6, atol=1e-7)
    assert any(not torch.equal(p, p0) for p, p0 in zip(target, target_before, strict=True))


@pytest.mark.parametrize(("image_size", "blur"), [(32, False), (96, True)])
def test_byol_asymmetric_views(image_size: int, blur: bool) -> None:
    method = BYOL(
        TrainConfig(method="byol", image_size=image_size, batch_size=8, proj_hidden_dim=16, pred_hidden_dim=16)
    )
    view_a, view_b = method.views_augment()
    assert (view_a.blur, view_a.blur_prob, view_a.solarize_prob) == (blur, 1.0, 0.0)
    assert (view_b.blur, view_b.blur_prob, view_b.solarize_prob) == (blur, 0.1, 0.2)
    assert view_a.model_copy(update={"blur_prob": 0.1, "solarize_prob": 0.2}) == view_b  # nothing else differs


def test_byol_explicit_probabilities_win_over_the_asymmetric_pair() -> None:
    cfg = TrainConfig(method="byol", batch_size=8, proj_hidden_dim=16, pred_hidden_dim=16,
                      augment={"blur_prob": 0.3, "view_b_solarize_prob": 0.5})  # fmt: skip
    view_a, view_b = BYOL(cfg).views_augment()
    assert (view_a.blur_prob, view_a.solarize_prob) == (0.3, 0.0)  # explicit; BYOL's view a default
    assert (view_b.blur_prob, view_b.solarize_prob) == (0.3, 0.5)  # view a's blur; explicit view b


@pytest.mark.slow
def test_byol_engine_run_on_digits_lowers_its_loss(digits_path: Path, tmp_path: Path) -> None:
    cfg = TrainConfig(
        method="byol", image_size=16, small_stem=False, batch_size=32, epochs=1, max_steps=12, num_workers=0,
        warmup_epochs=0, optimizer="sgd", base_lr=0.5, proj_hidden_dim=64, pred_hidden_dim=64, log_every_steps=1,
    )  # fmt: skip
    result = train(cfg, digits_path, tmp_path)
    losses = [r["loss"] for r in map(json.loads, (tmp_path / "metrics.jsonl").read_text().splitlines()) if "loss" in r]
    assert result.step == 12 and len(losses) == 12
    assert sum(losses[-3:]) / 3 < 0.9 * sum(losses[:3]) / 3, losses
    encoder, _, _ = load_encoder(tmp_path)  # what export takes: the online f alone
    assert isinstance(encoder, Encoder)
