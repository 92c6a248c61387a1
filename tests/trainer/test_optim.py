"""LARS against a hand-computed float64 step, parameter groups, and the warm-up cosine schedule."""

from __future__ import annotations

import math

import pytest
import torch
from torch import nn

from service.contract.train_config import TrainConfig
from trainer.methods import build_method
from trainer.optim import LARS, build_optimizer, build_scheduler, param_groups, warmup_cosine


def _norm(values: list[float]) -> float:
    return math.sqrt(sum(v * v for v in values))


def reference_lars(w, grads, lrs, momentum, wd, eta, exclude):
    """Plain-float LARS (SimCLR's TF code) over several steps; w and each g are flat lists."""
    w, v = list(w), [0.0] * len(w)
    for g, lr in zip(grads, lrs):
        d = list(g) if exclude else [gi + wd * wi for gi, wi in zip(g, w)]
        ratio = 1.0
        if not exclude and _norm(w) > 0 and _norm(d) > 0:
            ratio = eta * _norm(w) / _norm(d)
        v = [momentum * vi + lr * ratio * di for vi, di in zip(v, d)]
        w = [wi - vi for wi, vi in zip(w, v)]
    return w


def test_lars_matches_hand_computed_steps() -> None:
    g = torch.Generator().manual_seed(0)
    layer = nn.Linear(4, 3).double()
    w0, b0 = layer.weight.detach().clone(), layer.bias.detach().clone()
    grads = [
        (torch.randn(3, 4, generator=g, dtype=torch.float64), torch.randn(3, generator=g, dtype=torch.float64))
        for _ in range(3)
    ]
    lrs = [0.5, 2.0, 1.0]  # the rate changes between steps, as under a schedule
    momentum, wd, eta = 0.9, 0.1, 0.001
    opt = LARS(param_groups(layer, wd), lr=lrs[0], momentum=momentum, eta=eta)
    for (gw, gb), lr in zip(grads, lrs):
        for group in opt.param_groups:
            group["lr"] = lr
        layer.weight.grad, layer.bias.grad = gw.clone(), gb.clone()
        opt.step()
    expected_w = reference_lars(
        w0.flatten().tolist(), [gw.flatten().tolist() for gw, _ in grads], lrs, momentum, wd, eta, False
    )
    expected_b = reference_lars(b0.tolist(), [gb.tolist() for _, gb in grads], lrs, momentum, wd, eta, True)
    torch.testing.assert_close(
        layer.weight.flatten(), torch.tensor(expected_w, dtype=torch.float64), rtol=1e-12, atol=1e-14
    )
    torch.testing.assert_close(layer.bias, torch.tensor(expected_b, dtype=torch.float64), rtol=1e-12, atol=1e-14)
    # The adapted weight moved much less than lr * g: the trust ratio is in effect.
    assert (layer.weight - w0).abs().max() < 0.05 * (layer.bias - b0).abs().max()


def test_lars_trust_ratio_is_one_for_a_zero_weight() -> None:
    p = nn.Parameter(torch.zeros(2, 2, dtype=torch.float64))
    opt = LARS([p], lr=0.1, momentum=0.0, weight_decay=0.5)
    p.grad = torch.full((2, 2), 2.0, dtype=torch.float64)
    opt.step()
    torch.testing.assert_close(p.detach(), torch.full((2, 2), -0.2, dtype=torch.float64))


@pytest.mark.parametrize("name", ["lars", "sgd", "adamw"])
def test_build_optimizer_excludes_biases_and_bn(name: str) -> None:
    cfg = TrainConfig(optimizer=name, image_size=16, batch_size=512, weight_decay=1e-4).resolved(num_images=5000)
    method = build_method(cfg)
    opt = build_optimizer(method, cfg)
    weights, excluded = opt.param_groups
    bn_and_bias = {
        id(p)
        for m in method.modules()
        for p in m.parameters(recurse=False)
        if isinstance(m, nn.modules.batchnorm._BatchNorm) or p.ndim == 1
    }
    assert {id(p) for p in excluded["params"]} == bn_and_bias
    assert excluded["lars_exclude"] and excluded["weight_decay"] == 0.0
    assert not weights["lars_exclude"] and weights["weight_decay"] == 1e-4
    assert len(weights["params"]) + len(excluded["params"]) == len(list(method.parameters()))
    # Each optimiser's default rate and rule: SimCLR's square-root rule for LARS below a batch of
    # 4096, MoCo v2's 0.03 x B/256 for SGD, DINO's 5e-4 x B/256 for AdamW.
    expected = {"lars": 0.075 * 512**0.5, "sgd": 0.03 * 512 / 256, "adamw": 5e-4 * 512 / 256}[name]
    assert weights["lr"] == pytest.approx(expected)
    assert type(opt).__name__ == {"lars": "LARS", "sgd": "SGD", "adamw": "AdamW"}[name]


def test_warmup_cosine_values() -> None:
    total, warmup = 10, 2
    assert [warmup_cosine(s, total, warmup) for s in (0, 1, 2)] == [0.5, 1.0, 1.0]
    assert warmup_cosine(6, total, warmup) == pytest.approx(0.5)  # half-way through the decay
    assert warmup_cosine(4, total, warmup) == pytest.approx(0.5 * (1 + math.cos(math.pi * 2 / 8)))
    assert warmup_cosine(10, total, warmup) == pytest.approx(0.0, abs=1e-15)
    assert warmup_cosine(0, total, 0) == 1.0  # no warm-up: start at the peak


def test_scheduler_drives_the_optimizer_per_step() -> None:
    p = nn.Parameter(torch.zeros(1))
    opt = torch.optim.SGD([p], lr=0.4)
    sched = build_scheduler(opt, total_steps=6, warmup_steps=2)
    lrs = []
    for _ in range(6):
        lrs.append(opt.param_groups[0]["lr"])
        opt.step()
        sched.step()
    expected = [0.4 * warmup_cosine(s, 6, 2) for s in range(6)]
    assert lrs == pytest.approx(expected)
    assert lrs[:3] == pytest.approx([0.2, 0.4, 0.4])
