"""Encoder f and projection head g (SimCLR, Chen et al. 2020, Sec. 2.1 and B.9).

f is a torchvision ResNet built without pretrained weights; h = f(x) is the pooled feature
[N, D] (D = 512 for ResNet-18/34, 2048 for ResNet-50), the representation we keep and export.
g is the MLP that maps h to the space where the contrastive loss is applied; it is thrown
away after pretraining.
"""

from __future__ import annotations

from typing import Any

import torch
import torch.nn.functional as F
import torchvision
from torch import nn

from service.contract.encoder_io import PIXEL_MEAN, PIXEL_STD

_MEAN = torch.tensor(PIXEL_MEAN).view(1, 3, 1, 1)
_STD = torch.tensor(PIXEL_STD).view(1, 3, 1, 1)


def normalize_pixels(x: torch.Tensor) -> torch.Tensor:
    """[N, 3, S, S] in [0, 1] -> (x - PIXEL_MEAN) / PIXEL_STD: after augmentation in training,
    in evaluation and inside the exported graph (where the statistics become initializers)."""
    return (x - _MEAN.to(x.device, x.dtype)) / _STD.to(x.device, x.dtype)


_BACKBONES = {
    "resnet18": torchvision.models.resnet18,
    "resnet34": torchvision.models.resnet34,
    "resnet50": torchvision.models.resnet50,
}


class Conv2d(nn.Conv2d):
    """nn.Conv2d (same parameters and state_dict) that convolves a spatially 1x1 input with
    the centre tap only.

    With an odd kernel, padding k // 2 and no dilation, a 1x1 input gives a 1x1 output in
    which every tap but the centre sees padding, so conv(x, w) == conv(x, w[..., c:c+1, c:c+1])
    exactly, at any stride. The short form is cheaper, and it sidesteps oneDNN's bf16 weight
    gradient of a stride-2 3x3 conv on a 1x1 input, which on AMX CPUs returns uninitialised
    memory (values of 1e20 and beyond, inf, NaN) while the output and input gradient are right.
    A ResNet's layer4 sees 1x1 maps when the images are small (16 px with the standard stem).
    Only taken when a gradient is wanted; inference and export keep the plain convolution.
    """

    def __init__(self, *args: Any, **kwargs: Any) -> None:
        super().__init__(*args, **kwargs)
        kh, kw = self.kernel_size
        keeps_size = (
            kh % 2 == 1
            and kw % 2 == 1
            and self.padding == (kh // 2, kw // 2)
            and self.dilation == (1, 1)
            and self.padding_mode == "zeros"
        )
        # The centre tap's index, where the geometry allows the short form at all (fixed per layer).
        self._centre: tuple[int, int] | None = (kh // 2, kw // 2) if keeps_size else None

    def _centre_tap_applies(self, x: torch.Tensor) -> bool:
        return (
            torch.is_grad_enabled()
            and not torch.jit.is_tracing()
            and not torch.onnx.is_in_onnx_export()
            and x.shape[-2:] == (1, 1)
        )

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if self._centre is None or not self._centre_tap_applies(x):
            return super().forward(x)
        ch, cw = self._centre
        centre = self.weight[:, :, ch : ch + 1, cw : cw + 1]  # [C_out, C_in/groups, 1, 1]
        return F.conv2d(x, centre, self.bias, stride=1, groups=self.groups)  # [N, C_out, 1, 1]


def _use_centre_tap_convs(net: nn.Module) -> None:
    """Swap every nn.Conv2d in `net` for `Conv2d`, keeping its initialised weights."""
    for name, child in net.named_children():
        if type(child) is nn.Conv2d:
            conv = Conv2d(
                child.in_channels,
                child.out_channels,
                child.kernel_size,
                stride=child.stride,
                padding=child.padding,
                dilation=child.dilation,
                groups=child.groups,
                bias=child.bias is not None,
                padding_mode=child.padding_mode,
            )
            conv.load_state_dict(child.state_dict())
            setattr(net, name, conv)
        else:
            _use_centre_tap_convs(child)


class Encoder(nn.Module):
    """ResNet trunk without its classifier: images [N, 3, S, S] (normalised) -> h [N, D]."""

    def __init__(self, backbone: str = "resnet18", small_stem: bool = False) -> None:
        super().__init__()
        if backbone not in _BACKBONES:
            raise ValueError(f"unknown backbone {backbone!r}; choose from {sorted(_BACKBONES)}")
        net = _BACKBONES[backbone](weights=None)
        if small_stem:
            # CIFAR variant (paper, Appendix B.9): 3x3 stride-1 conv, no max-pool.
            net.conv1 = nn.Conv2d(3, 64, kernel_size=3, stride=1, padding=1, bias=False)
            net.maxpool = nn.Identity()
        _use_centre_tap_convs(net)
        self.feature_dim: int = net.fc.in_features
        net.fc = nn.Identity()
        self.net = net
        self.backbone = backbone
        self.small_stem = small_stem

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.net(x)  # [N, D]


class ProjectionHead(nn.Module):
    """g: Linear-BN-ReLU-...-Linear, [N, in_dim] -> [N, out_dim].

    SimCLR uses 2 layers to 128 dims; BYOL's projector and predictor are the same shape
    (hidden 4096, out 256). `last_bn` adds a BatchNorm without affine at the end (SimCLR v2).
    """

    def __init__(self, in_dim: int, hidden_dim: int, out_dim: int, num_layers: int = 2, last_bn: bool = False) -> None:
        super().__init__()
        layers: list[nn.Module] = []
        dim = in_dim
        for _ in range(num_layers - 1):
            layers += [nn.Linear(dim, hidden_dim, bias=False), nn.BatchNorm1d(hidden_dim), nn.ReLU(inplace=True)]
            dim = hidden_dim
        layers.append(nn.Linear(dim, out_dim, bias=not last_bn))
        if last_bn:
            layers.append(nn.BatchNorm1d(out_dim, affine=False))
        self.layers = nn.Sequential(*layers)

    def forward(self, h: torch.Tensor) -> torch.Tensor:
        return self.layers(h)


def build_encoder(backbone: str, small_stem: bool) -> Encoder:
    return Encoder(backbone, small_stem)
