"""Process groups and the collectives the methods need.

One process per GPU (NCCL) or `cpu_processes` processes on CPU (gloo), spawned by the engine
or started by torchrun (see `torchrun_launch`). Everything here is a no-op for a single
process, so the same code runs with and without a process group.
"""

from __future__ import annotations

import os
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from typing import Any

import torch
import torch.distributed as dist

# What torchrun (and torch.distributed's other launchers) put in each worker's environment.
LAUNCHER_ENV = ("RANK", "WORLD_SIZE", "LOCAL_RANK", "MASTER_ADDR", "MASTER_PORT")


@dataclass(frozen=True)
class Launch:
    """This process's place in a group that a launcher started: global and per-node rank."""

    rank: int
    world: int
    local_rank: int
    local_world: int
    restart: int  # how many times the launcher has restarted the group; 0 on the first attempt


def torchrun_launch() -> Launch | None:
    """The launch torchrun describes in the environment, or None when no launcher started us.

    Under torchrun the processes and the rendezvous already exist: the engine must join them
    (init_method env://) instead of spawning its own.
    """
    env = os.environ
    if not all(env.get(key) for key in LAUNCHER_ENV):
        return None
    world = int(env["WORLD_SIZE"])
    return Launch(
        rank=int(env["RANK"]),
        world=world,
        local_rank=int(env["LOCAL_RANK"]),
        local_world=int(env.get("LOCAL_WORLD_SIZE", world)),
        restart=int(env.get("TORCHELASTIC_RESTART_COUNT", 0)),
    )


def is_initialized() -> bool:
    return dist.is_available() and dist.is_initialized()


def world_size() -> int:
    return dist.get_world_size() if is_initialized() else 1


def rank() -> int:
    return dist.get_rank() if is_initialized() else 0


@contextmanager
def process_group(rank_: int, world: int, backend: str, init_method: str) -> Iterator[None]:
    """Join the group for the block; the CUDA device of a rank is its local index.

    On a normal exit from the block every rank waits for all (a barrier) before leaving: gloo's
    worker threads drop the last collective's tensors after its wait has returned, which needs
    the GIL, and a process that has begun to exit by then aborts ("terminate called without an
    active exception": 1 exit in about 30 of the two-rank test here). The barrier's wait
    releases the GIL until every rank arrives, and those threads finish (0 aborts in 200 runs
    under load). A rank leaving on an exception does not wait: the others may never arrive.
    A single process (`world` 1) joins nothing.
    """
    if world == 1:
        yield
        return
    if backend == "nccl":
        torch.cuda.set_device(int(os.environ.get("LOCAL_RANK", rank_)))
    dist.init_process_group(backend, init_method=init_method, rank=rank_, world_size=world)
    try:
        yield
    except BaseException:
        dist.destroy_process_group()
        raise
    dist.barrier()
    dist.destroy_process_group()


def main_first(work: Callable[[], None]) -> None:
    """Run `work` on rank 0 while the other ranks wait; a ValueError it raises is raised on all.

    For run-directory set-up that only rank 0 may do but every rank must see done (or failed)
    before it goes on: a rank that raised alone would leave the others blocked in a collective.
    """
    error: ValueError | None = None
    if rank() == 0:
        try:
            work()
        except ValueError as exc:
            error = exc
    if world_size() > 1:
        message = [None if error is None else str(error)]
        dist.broadcast_object_list(message, src=0)
        if error is None and message[0] is not None:
            error = ValueError(message[0])
    if error is not None:
        raise error


class _GatherWithGrad(torch.autograd.Function):
    """all_gather whose backward hands each rank the gradient of its own slice, summed over ranks.

    Every rank's loss depends on every rank's rows, so the gradient of row block r is the
    sum over all ranks' losses: all_reduce(SUM), then take block r (as lightly's GatherLayer;
    keeping only the local block, without the sum, drops the other ranks' terms).
    """

    @staticmethod
    def forward(ctx: Any, x: torch.Tensor) -> torch.Tensor:  # x: [N, ...] -> [N * world, ...]
        parts = [torch.empty_like(x) for _ in range(dist.get_world_size())]
        dist.all_gather(parts, x.contiguous())
        ctx.n = x.shape[0]
        return torch.cat(parts)

    @staticmethod
    def backward(ctx: Any, grad: torch.Tensor) -> torch.Tensor:  # [N * world, ...] -> [N, ...]
        grad = grad.contiguous()
        dist.all_reduce(grad, op=dist.ReduceOp.SUM)
        start = dist.get_rank() * ctx.n
        return grad[start : start + ctx.n]


def gather_with_grad(x: torch.Tensor) -> torch.Tensor:
    """Concatenate `x` [N, ...] from all ranks in rank order -> [N * world, ...], differentiably."""
    if world_size() == 1:
        return x
    return _GatherWithGrad.apply(x)


def all_reduce_mean(value: torch.Tensor) -> torch.Tensor:
    """The mean of `value` over ranks (a detached copy)."""
    value = value.detach().clone()
    if world_size() > 1:
        dist.all_reduce(value, op=dist.ReduceOp.SUM)
        value /= world_size()
    return value


def broadcast_flag(flag: bool, device: torch.device) -> bool:
    """Rank 0's `flag` on every rank."""
    if world_size() == 1:
        return flag
    t = torch.tensor([int(flag)], device=device)
    dist.broadcast(t, src=0)
    return bool(t.item())
