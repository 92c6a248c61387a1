"""Global BatchNorm (SimCLR Sec. 2.2): every BatchNorm layer normalises with the statistics of
the whole global batch, over all training processes, not of each process's share.

On CUDA this is torch's `nn.SyncBatchNorm`. torch's version refuses CPU tensors (and DDP
refuses it on CPU modules), so CPU runs over gloo get `GlobalBatchNorm`: the same
computation with two differentiable all-reduces per layer (the global mean, then the global
mean squared deviation; two passes for the accuracy of the variance), whose backward sums the
gradients of the statistics over the ranks, as torch's CUDA kernel does.
"""

from __future__ import annotations

from typing import Any, TypeVar, cast

import torch
import torch.distributed as dist
from torch import nn
from torch.nn.modules.batchnorm import _BatchNorm

M = TypeVar("M", bound=nn.Module)


class _AllReduceSum(torch.autograd.Function):
    """Sum over ranks whose backward sums the gradients over ranks (every rank's loss used it)."""

    @staticmethod
    def forward(ctx: Any, x: torch.Tensor) -> torch.Tensor:
        out = x.detach().clone()
        dist.all_reduce(out)
        return out

    @staticmethod
    def backward(ctx: Any, grad: torch.Tensor) -> torch.Tensor:
        out = grad.contiguous().clone()
        dist.all_reduce(out)
        return out


def _all_reduce_sum(x: torch.Tensor) -> torch.Tensor:
    out: torch.Tensor = _AllReduceSum.apply(x)
    return out


class GlobalBatchNorm(_BatchNorm):
    """BatchNorm over all ranks for CPU processes: input [N, C, *] -> same; the state dict is
    BatchNorm's, so an encoder trained with it loads into a plain one."""

    def _check_input_dim(self, input: torch.Tensor) -> None:
        if input.dim() < 2:
            raise ValueError(f"expected at least 2D input, got {input.dim()}D")

    def forward(self, input: torch.Tensor) -> torch.Tensor:
        if not (self.training and dist.is_available() and dist.is_initialized() and dist.get_world_size() > 1):
            return super().forward(input)
        self._check_input_dim(input)
        dims = [d for d in range(input.dim()) if d != 1]
        shape = [1, -1] + [1] * (input.dim() - 2)
        count = _all_reduce_sum(torch.tensor([input.numel() / input.shape[1]], dtype=input.dtype))  # [1]
        mean = _all_reduce_sum(input.sum(dims)) / count  # [C]
        centred = input - mean.view(shape)
        var = _all_reduce_sum(centred.pow(2).sum(dims)) / count  # [C], biased, as BatchNorm normalises
        tracked = self.num_batches_tracked
        if (
            self.track_running_stats
            and self.running_mean is not None
            and self.running_var is not None
            and tracked is not None
        ):
            with torch.no_grad():
                tracked.add_(1)
                m = self.momentum if self.momentum is not None else 1.0 / float(tracked)
                unbiased = var * count / (count - 1).clamp(min=1)
                self.running_mean.mul_(1 - m).add_(mean.detach(), alpha=m)
                self.running_var.mul_(1 - m).add_(unbiased.detach(), alpha=m)
        out = centred * torch.rsqrt(var + self.eps).view(shape)
        if self.affine:
            out = out * self.weight.view(shape) + self.bias.view(shape)
        return out


SYNC_BATCHNORM_TYPES: tuple[type[nn.Module], ...] = (nn.SyncBatchNorm, GlobalBatchNorm)


def _to_global(module: nn.Module) -> nn.Module:
    """Every BatchNorm layer under `module` replaced by a GlobalBatchNorm holding its state."""
    if isinstance(module, _BatchNorm) and not isinstance(module, SYNC_BATCHNORM_TYPES):
        like = next(iter(module.parameters()), module.running_mean)
        new = GlobalBatchNorm(
            module.num_features,
            module.eps,
            module.momentum,
            module.affine,
            module.track_running_stats,
            device=None if like is None else like.device,
            dtype=None if like is None else like.dtype,
        )
        new.load_state_dict(module.state_dict())
        new.train(module.training)
        return new
    for name, child in module.named_children():
        module.add_module(name, _to_global(child))
    return module


def convert_sync_batchnorm(module: M, cuda: bool) -> M:
    """`module` with global BatchNorm layers: torch's SyncBatchNorm on CUDA, GlobalBatchNorm on CPU."""
    converted = nn.SyncBatchNorm.convert_sync_batchnorm(module) if cuda else _to_global(module)
    return cast(M, converted)  # the same module, its BatchNorm children replaced (a new one for a lone layer)
