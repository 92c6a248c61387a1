"""Where the int8 variant's error comes from: weights or activations, simulated in torch.

The trained encoder with its BatchNorms folded into the convolutions (as ONNX Runtime's
quantiser sees it), then each source of rounding alone and together, as the exported variant
quantises: per output channel symmetric weights on ONNX Runtime's grids (+-64 levels with
`reduce_range`, the published variant; +-127 for comparison), and uint8 per-tensor activations
with min-max ranges calibrated on 256 train images at the tensors the QDQ graph quantises (every
convolution's input, the two branches of each residual Add, the pooled feature map). The rows
with per-channel activation ranges (which ONNX Runtime's integer convolutions cannot take) are
the limit of any function-preserving channel rescaling (cross-layer equalisation, SmoothQuant):
every channel on a grid of its own range. Error = mean (1 - cosine) of the unit-norm embedding
against fp32 on 1,000 other train images; the last row is ONNX Runtime's int8 variant of the
same run on the same images, exported as `export_run` does.

    .venv/bin/python bench/int8_error_budget.py --run RUN --threads 2
"""

from __future__ import annotations

import argparse
import copy
import json
import sys
import tempfile
from collections.abc import Callable
from pathlib import Path

import numpy as np
import torch
from torch import nn
from torch.nn.utils.fusion import fuse_conv_bn_eval

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))
sys.path.insert(0, str(REPO / "bench"))

from int8_quality import embed

from service.contract.registry import ModelRegistry
from service.contract.variants import INT8
from trainer.data import labeled_arrays, open_labeled
from trainer.export import export_run, load_encoder, reference_embed, reference_input

SHARED = REPO.parent / "shared" / "data"


def fold_batchnorms(module: nn.Module) -> None:
    """conv -> bn pairs of a torchvision ResNet folded in place (eval statistics), bn -> Identity."""
    for child in module.children():
        fold_batchnorms(child)
    for conv_name, bn_name in (("conv1", "bn1"), ("conv2", "bn2"), ("0", "1")):
        conv, bn = getattr(module, conv_name, None), getattr(module, bn_name, None)
        if isinstance(conv, nn.Conv2d) and isinstance(bn, nn.BatchNorm2d):
            fused = fuse_conv_bn_eval(conv, bn)
            conv.weight.data, conv.bias = fused.weight.data, fused.bias
            setattr(module, bn_name, nn.Identity())


# ONNX Runtime's symmetric int8 weight grids: integers in [-64, 64] with reduce_range (7 bits,
# the published variant), [-127, 127] without (onnxruntime.quantization.quant_utils).
REDUCED, FULL = 64, 127


def quantise_weight(w: torch.Tensor, levels: int) -> torch.Tensor:
    """Symmetric per-output-channel rounding to integers in [-levels, levels], back to float."""
    scale = w.abs().amax(dim=tuple(range(1, w.dim())), keepdim=True) / levels
    return torch.round(w / scale).clamp(-levels, levels) * scale


def quantise_uint8(x: torch.Tensor, lo: torch.Tensor, hi: torch.Tensor) -> torch.Tensor:
    """Asymmetric uint8 over [min(lo, 0), max(hi, 0)] (per tensor, or per channel when the
    ranges are [1, C, 1, 1]), back to float."""
    lo, hi = lo.clamp(max=0.0), hi.clamp(min=0.0)
    scale = (hi - lo).clamp(min=1e-12) / 255
    zero = torch.round(-lo / scale)
    return (torch.clamp(torch.round(x / scale) + zero, 0, 255) - zero) * scale


def channel_extremes(t: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """Per-channel (min, max) of [N, C, H, W] or [N, C], shaped to broadcast against `t`."""
    dims = (0, *range(2, t.dim()))
    return t.amin(dim=dims, keepdim=True), t.amax(dim=dims, keepdim=True)


class ActivationPoints:
    """The tensors the QDQ graph quantises, as forward hooks: record ranges, then round to them."""

    def __init__(self, net: nn.Module) -> None:
        self.inputs = [m for m in net.modules() if isinstance(m, nn.Conv2d | nn.AdaptiveAvgPool2d)]
        # Outputs that feed a residual Add without passing another quantised op first.
        self.outputs = [b.conv2 for b in net.modules() if hasattr(b, "conv2")]
        self.outputs += [b.downsample[0] for b in net.modules() if getattr(b, "downsample", None) is not None]
        self.ranges: dict[tuple[str, int], tuple[torch.Tensor, torch.Tensor]] = {}  # per channel

    def _hooks(self, act: Callable[[tuple[str, int], torch.Tensor], torch.Tensor | None]) -> list:
        hooks = [
            m.register_forward_pre_hook(lambda _m, a, k=("in", i): (act(k, a[0]),)) for i, m in enumerate(self.inputs)
        ]
        hooks += [
            m.register_forward_hook(lambda _m, _a, y, k=("out", i): act(k, y)) for i, m in enumerate(self.outputs)
        ]
        return hooks

    def calibrate(self, net: nn.Module, x: torch.Tensor) -> None:
        def record(key: tuple[str, int], t: torch.Tensor) -> torch.Tensor:
            lo, hi = channel_extremes(t)
            if key in self.ranges:
                lo, hi = torch.minimum(lo, self.ranges[key][0]), torch.maximum(hi, self.ranges[key][1])
            self.ranges[key] = (lo, hi)
            return t

        hooks = self._hooks(record)
        with torch.no_grad():
            net(x)
        for h in hooks:
            h.remove()

    def rounding(self, per_channel: bool = False, straight_through: bool = False) -> list:
        """Hooks that round each point to its calibrated range; `straight_through`: the
        gradient passes the rounding unchanged (quantisation-aware training)."""

        def act(key: tuple[str, int], t: torch.Tensor) -> torch.Tensor:
            lo, hi = self.ranges[key]
            q = quantise_uint8(t, lo, hi) if per_channel else quantise_uint8(t, lo.min(), hi.max())
            return t + (q - t).detach() if straight_through else q

        return self._hooks(act)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--run", type=Path, required=True, help="a trained run directory (CIFAR-10)")
    parser.add_argument("--data", type=Path, default=SHARED / "cifar10-5k.npz")
    parser.add_argument("--threads", type=int, default=2)
    args = parser.parse_args()
    torch.set_num_threads(args.threads)
    encoder, cfg, _ = load_encoder(args.run)
    net = copy.deepcopy(encoder).eval()
    fold_batchnorms(net)
    images, _ = labeled_arrays(open_labeled(args.data, "train", cfg.image_size))  # uint8 [N, S, S, 3]
    calibration, held_out = images[:256], images[-1000:]
    reference = reference_embed(encoder.eval(), held_out)  # float64 [1000, D], unit norm

    def gap(out: np.ndarray) -> float:
        """Mean (1 - cosine) of unit-norm embeddings [1000, D] against fp32's."""
        return float(np.mean(1 - np.sum(out * reference, axis=1)))

    points = ActivationPoints(net)
    points.calibrate(net, reference_input(calibration))
    convs = [m for m in net.modules() if isinstance(m, nn.Conv2d)]
    weights = [c.weight.data.clone() for c in convs]

    def error(levels: int | None, activations: str | None) -> float:
        """`levels`: the weight grid (None: exact); `activations`: None, "tensor" or "channel"."""
        for conv, w in zip(convs, weights, strict=True):
            conv.weight.data = quantise_weight(w, levels) if levels else w.clone()
        hooks = points.rounding(activations == "channel") if activations else []
        out = reference_embed(net, held_out)
        for h in hooks:
            h.remove()
        return gap(out)

    rows = {
        "BatchNorm folded, no rounding": error(None, None),
        "7-bit weights alone": error(REDUCED, None),
        "8-bit weights alone": error(FULL, None),
        "uint8 activations alone": error(None, "tensor"),
        "7-bit weights + uint8 activations (the variant, simulated)": error(REDUCED, "tensor"),
        "8-bit weights + uint8 activations (simulated)": error(FULL, "tensor"),
        "uint8 activations per channel alone (the limit of channel equalisation)": error(None, "channel"),
        "7-bit weights + uint8 activations per channel": error(REDUCED, "channel"),
        "8-bit weights + uint8 activations per channel": error(FULL, "channel"),
    }
    with tempfile.TemporaryDirectory() as tmp:
        registry = ModelRegistry(Path(tmp) / "models")
        card = export_run(args.run, registry, model_id="budget")
        if INT8 in card.variants:
            out, _ = embed(registry.root / "budget" / "model.int8.onnx", held_out, args.threads)
            rows["ONNX Runtime int8 variant (exported)"] = gap(out)
    for name, value in rows.items():
        print(f"| {name} | {value:.2e} |")
    print(json.dumps(rows))


if __name__ == "__main__":
    main()
