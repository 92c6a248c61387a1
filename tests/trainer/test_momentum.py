"""EMA update and BYOL's cosine rate schedule against their formulas (float64)."""

from __future__ import annotations

import math

import pytest
import torch
from torch import nn

from trainer.methods.momentum import cosine_tau, ema_update, momentum_copy


def _net() -> nn.Module:
    return nn.Sequential(nn.Linear(5, 7), nn.BatchNorm1d(7), nn.ReLU(), nn.Linear(7, 3)).double()


@pytest.mark.parametrize("tau", [0.0, 0.5, 0.99, 0.999, 1.0])
def test_ema_update_matches_formula_per_parameter(tau: float) -> None:
    torch.manual_seed(0)
    online, target = _net(), _net()  # independent random inits, so every parameter differs
    before = {n: p.detach().clone() for n, p in target.named_parameters()}
    online_params = dict(online.named_parameters())
    ema_update(online, target, tau)
    for name, p_target in target.named_parameters():
        theta_q, theta_k = online_params[name].detach(), before[name]
        expected = torch.empty_like(theta_k)
        for i, (q, k) in enumerate(zip(theta_q.flatten().tolist(), theta_k.flatten().tolist(), strict=True)):
            expected.view(-1)[i] = tau * k + (1 - tau) * q
        torch.testing.assert_close(p_target, expected, rtol=0, atol=1e-14)


def test_ema_update_leaves_online_untouched_and_buffers_alone() -> None:
    torch.manual_seed(1)
    online, target = _net(), _net()
    online(torch.randn(8, 5, dtype=torch.float64))  # moves online BN running stats
    online_before = [t.clone() for t in online.state_dict().values()]
    target_buffers = [b.clone() for b in target.buffers()]
    ema_update(online, target, 0.9)
    for t, t0 in zip(online.state_dict().values(), online_before, strict=True):
        assert torch.equal(t, t0)
    for b, b0 in zip(target.buffers(), target_buffers, strict=True):
        assert torch.equal(b, b0)


def test_momentum_copy_is_equal_frozen_and_independent() -> None:
    online = _net()
    target = momentum_copy(online)
    for p, q in zip(online.parameters(), target.parameters(), strict=True):
        assert torch.equal(p, q) and p.data_ptr() != q.data_ptr()
        assert p.requires_grad and not q.requires_grad


@pytest.mark.parametrize(
    ("step", "total", "base"),
    [(0, 100, 0.996), (25, 100, 0.996), (50, 100, 0.996), (75, 100, 0.99), (100, 100, 0.996), (3, 7, 0.9)],
)
def test_cosine_tau_values(step: int, total: int, base: float) -> None:
    expected = 1 - (1 - base) * (math.cos(math.pi * step / total) + 1) / 2
    assert cosine_tau(step, total, base) == pytest.approx(expected, abs=1e-15)


def test_cosine_tau_endpoints_and_monotone() -> None:
    assert cosine_tau(0, 1000, 0.996) == pytest.approx(0.996, abs=1e-15)
    assert cosine_tau(500, 1000, 0.996) == pytest.approx(0.998, abs=1e-15)
    assert cosine_tau(1000, 1000, 0.996) == 1.0
    assert cosine_tau(5000, 1000, 0.996) == 1.0  # past the end it stays at 1
    values = [cosine_tau(k, 50, 0.996) for k in range(51)]
    assert all(a < b for a, b in zip(values, values[1:]))
