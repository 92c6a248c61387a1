"""The encoder's Conv2d: the centre-tap form on 1x1 inputs equals a float64 convolution, in
fp32 and under bf16 autocast (where oneDNN's own stride-2 weight gradient is wrong on AMX)."""

from __future__ import annotations

import numpy as np
import pytest
import torch
import torchvision
from torch import nn

from trainer.models import Conv2d, Encoder


def naive_conv2d(x: np.ndarray, w: np.ndarray, stride: int, padding: int) -> np.ndarray:
    """float64 convolution by explicit loops over output positions and taps: [N, C, H, W] -> [N, O, H', W']."""
    n, c, h, wd = x.shape
    o, _, kh, kw = w.shape
    xp = np.zeros((n, c, h + 2 * padding, wd + 2 * padding))
    xp[:, :, padding : padding + h, padding : padding + wd] = x
    ho = (h + 2 * padding - kh) // stride + 1
    wo = (wd + 2 * padding - kw) // stride + 1
    y = np.zeros((n, o, ho, wo))
    for i in range(ho):
        for j in range(wo):
            for a in range(kh):
                for b in range(kw):
                    y[:, :, i, j] += xp[:, :, i * stride + a, j * stride + b] @ w[:, :, a, b].T
    return y


def naive_weight_grad(x: np.ndarray, w: np.ndarray, g: np.ndarray, stride: int, padding: int) -> np.ndarray:
    """d(sum(g * conv(x, w)))/dw in float64, entry by entry through the same loops."""
    n, c, h, wd = x.shape
    _, _, kh, kw = w.shape
    xp = np.zeros((n, c, h + 2 * padding, wd + 2 * padding))
    xp[:, :, padding : padding + h, padding : padding + wd] = x
    grad = np.zeros_like(w, dtype=np.float64)
    for i in range(g.shape[2]):
        for j in range(g.shape[3]):
            for a in range(kh):
                for b in range(kw):
                    grad[:, :, a, b] += g[:, :, i, j].T @ xp[:, :, i * stride + a, j * stride + b]
    return grad


def _conv_and_grads(conv: nn.Conv2d, x: torch.Tensor, g: torch.Tensor, bf16: bool) -> tuple[np.ndarray, np.ndarray]:
    conv.zero_grad()
    with torch.autocast("cpu", dtype=torch.bfloat16, enabled=bf16):
        y = conv(x)
    (y.float() * g).sum().backward()
    assert conv.weight.grad is not None
    return y.detach().double().numpy(), conv.weight.grad.double().numpy()


def _rel(a: np.ndarray, b: np.ndarray) -> float:
    return float(np.linalg.norm(a - b) / np.linalg.norm(b))


@pytest.mark.parametrize("size", [1, 3])
@pytest.mark.parametrize("stride", [1, 2])
@pytest.mark.parametrize("bf16", [False, True])
def test_conv_matches_float64_reference(size: int, stride: int, bf16: bool) -> None:
    """Output and weight gradient against float64 loops; size 1 takes the centre-tap path,
    size 3 the plain one. bf16 inputs and weights carry ~2^-9 relative error each."""
    torch.manual_seed(size * 10 + stride)
    conv = Conv2d(64, 48, kernel_size=3, stride=stride, padding=1, bias=False)
    x = torch.randn(16, 64, size, size)
    ho = (size + 2 - 3) // stride + 1
    g = torch.randn(16, 48, ho, ho)
    y, grad = _conv_and_grads(conv, x, g, bf16)
    w64 = conv.weight.detach().double().numpy()
    y_ref = naive_conv2d(x.double().numpy(), w64, stride, 1)
    grad_ref = naive_weight_grad(x.double().numpy(), w64, g.double().numpy(), stride, 1)
    tol = 2e-2 if bf16 else 1e-5
    assert np.isfinite(grad).all()
    assert _rel(y, y_ref) < tol
    assert _rel(grad, grad_ref) < tol
    if size == 1:  # only the centre tap sees data; the rest of the kernel gets exactly zero
        outer = np.ones((3, 3), dtype=bool)
        outer[1, 1] = False
        assert (grad[:, :, outer] == 0).all()


def test_centre_tap_on_real_images_through_the_encoder() -> None:
    """16 px digits through the standard stem reach layer4 at 1x1 (the case the demo trains):
    under bf16 autocast, layer4.0.conv1's weight gradient equals the float64 loops fed with
    the input and output gradient that the layer saw."""
    from sklearn.datasets import load_digits

    digits = load_digits().images[:32] / 16.0  # [32, 8, 8] in [0, 1]
    x = torch.tensor(np.repeat(np.kron(digits, np.ones((2, 2)))[:, None], 3, axis=1), dtype=torch.float32)
    torch.manual_seed(0)
    encoder = Encoder("resnet18", small_stem=False).train()
    conv = encoder.net.layer4[0].conv1
    seen: dict[str, torch.Tensor] = {}

    def keep(module: nn.Module, inputs: tuple[torch.Tensor, ...], output: torch.Tensor) -> None:
        seen["x"] = inputs[0].detach()
        output.register_hook(lambda grad: seen.__setitem__("g", grad.detach()))

    conv.register_forward_hook(keep)
    with torch.autocast("cpu", dtype=torch.bfloat16):
        h = encoder(x)
    h.float().pow(2).sum().backward()
    assert seen["x"].shape == (32, 256, 1, 1)
    assert conv.weight.grad is not None
    grad = conv.weight.grad.double().numpy()
    w64 = conv.weight.detach().to(torch.bfloat16).double().numpy()
    grad_ref = naive_weight_grad(seen["x"].double().numpy(), w64, seen["g"].double().numpy(), 2, 1)
    assert np.isfinite(grad).all()
    assert _rel(grad, grad_ref) < 2e-2


def test_encoder_keeps_torchvision_state_dict_and_plain_inference() -> None:
    """Checkpoints stay loadable both ways, and without a gradient the convolution is the stock one."""
    encoder = Encoder("resnet18", small_stem=True)
    reference = torchvision.models.resnet18(weights=None)
    reference.conv1 = nn.Conv2d(3, 64, kernel_size=3, stride=1, padding=1, bias=False)
    reference.fc = nn.Identity()
    reference.maxpool = nn.Identity()
    assert encoder.net.state_dict().keys() == reference.state_dict().keys()
    reference.load_state_dict(encoder.net.state_dict())
    assert not any(type(m) is nn.Conv2d for m in encoder.modules())
    encoder.eval()
    reference.eval()
    x = torch.rand(4, 3, 8, 8)  # layer4 at 1x1 with the small stem
    with torch.inference_mode():
        torch.testing.assert_close(encoder(x), reference(x), rtol=1e-5, atol=1e-5)
    torch.testing.assert_close(encoder(x), reference(x), rtol=1e-5, atol=1e-5)
