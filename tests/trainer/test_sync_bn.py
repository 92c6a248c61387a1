"""Global BatchNorm over gloo: two processes holding half a batch each normalise, learn and
track statistics exactly as one process holding the whole batch; and a 2-process run builds
its model with global BatchNorm by default."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch
import torch.distributed as dist
import torch.multiprocessing as mp
from torch import nn
from torch.nn.modules.batchnorm import _BatchNorm
from torch.nn.parallel import DistributedDataParallel

from service.contract.defaults import RunShape, resolve
from service.contract.ports import free_port
from service.contract.train_config import TrainConfig
from trainer import distributed, engine
from trainer.data import open_dataset
from trainer.sync_bn import GlobalBatchNorm, convert_sync_batchnorm

N, C, H = 8, 3, 4


def _problem() -> tuple[nn.Module, torch.Tensor, torch.Tensor]:
    """A conv + BatchNorm2d + BatchNorm1d net, its input [N, C, H, H] and a fixed read-out."""
    torch.manual_seed(0)
    net = nn.Sequential(
        nn.Conv2d(C, 5, 3, padding=1), nn.BatchNorm2d(5), nn.Flatten(1), nn.Linear(5 * H * H, 6), nn.BatchNorm1d(6)
    ).double()
    with torch.no_grad():
        for m in net.modules():
            if isinstance(m, _BatchNorm):
                m.weight.uniform_(0.5, 1.5)
                m.bias.uniform_(-0.5, 0.5)
    x = 2.0 + 3.0 * torch.randn(N, C, H, H, dtype=torch.float64)  # far from zero mean, unit variance
    readout = torch.randn(N, 6, dtype=torch.float64)
    return net, x, readout


def _bn_rank(rank: int, world: int, init_method: str, out: str) -> None:
    with distributed.process_group(rank, world, "gloo", init_method):
        net, x, readout = _problem()
        net = convert_sync_batchnorm(net, cuda=False)
        ddp = DistributedDataParallel(net)
        rows = slice(rank * N // world, (rank + 1) * N // world)
        xr = x[rows].clone().requires_grad_(True)
        loss = (ddp(xr) * readout[rows]).sum(1).mean()  # this rank's mean over its rows
        loss.backward()
        torch.save(
            {
                "kinds": sorted({type(m).__name__ for m in net.modules() if isinstance(m, _BatchNorm)}),
                "x_grad": xr.grad,
                "grads": {k: p.grad for k, p in net.named_parameters()},
                "buffers": dict(net.named_buffers()),
            },
            Path(out) / f"rank{rank}.pt",
        )


@pytest.mark.integration
@pytest.mark.slow
def test_two_gloo_ranks_normalise_with_the_global_batch(tmp_path: Path) -> None:
    world = 2
    init_method = f"tcp://127.0.0.1:{free_port()}"
    mp.start_processes(_bn_rank, args=(world, init_method, str(tmp_path)), nprocs=world, start_method="spawn")
    ranks = [torch.load(tmp_path / f"rank{r}.pt", weights_only=True) for r in range(world)]

    net, x, readout = _problem()  # the reference: plain BatchNorm, one process, the whole batch
    x = x.clone().requires_grad_(True)
    ((net(x) * readout).sum(1).mean()).backward()
    grads = {k: p.grad for k, p in net.named_parameters()}
    for r, got in enumerate(ranks):
        assert got["kinds"] == ["GlobalBatchNorm"]
        rows = slice(r * N // world, (r + 1) * N // world)
        # Input gradients are not averaged by DDP: each rank holds world x its slice of the global one.
        torch.testing.assert_close(got["x_grad"] / world, x.grad[rows], rtol=1e-9, atol=1e-12)
        for k, g in grads.items():  # after DDP's average, the global gradients
            torch.testing.assert_close(got["grads"][k], g, rtol=1e-9, atol=1e-12, msg=k)
        for k, b in net.named_buffers():  # running statistics of the global batch (unbiased variance)
            torch.testing.assert_close(got["buffers"][k].to(b.dtype), b, rtol=1e-9, atol=1e-12, msg=k)


def _engine_rank(rank: int, world: int, init_method: str, data: str, out: str) -> None:
    """Build the engine's trainer for a 2-process run of the default config, report its BatchNorm
    layers, and train one step with them."""
    with distributed.process_group(rank, world, "gloo", init_method):
        cfg = TrainConfig(image_size=16, small_stem=False, batch_size=8, epochs=1, max_steps=1, num_workers=0)
        dataset = open_dataset(data, cfg.image_size)
        resolution = resolve(cfg, RunShape(len(dataset), world))
        if rank == 0:
            engine._prepare_run_dir(resolution, data, dataset, Path(out), resume=False)
        dist.barrier()
        trainer = engine._Trainer(rank, world, False, resolution.config, dataset, None, Path(out), None, None)
        layers = [type(m).__name__ for m in trainer.method.modules() if isinstance(m, _BatchNorm)]
        result = trainer.run()
        Path(out, f"rank{rank}.json").write_text(
            json.dumps({"sync_bn": resolution.config.sync_bn, "layers": layers, "step": result.step})
        )


@pytest.mark.integration
@pytest.mark.slow
def test_a_two_process_run_builds_global_batchnorm_by_default(tiny_npz: Path, tmp_path: Path) -> None:
    world = 2
    init_method = f"tcp://127.0.0.1:{free_port()}"
    args = (world, init_method, str(tiny_npz), str(tmp_path))
    mp.start_processes(_engine_rank, args=args, nprocs=world, start_method="spawn")
    for r in range(world):
        got = json.loads((tmp_path / f"rank{r}.json").read_text())
        assert got["sync_bn"] is True and got["step"] == 1
        # Every BatchNorm of the built model (encoder and head): a ResNet-18 has 20, the head 1.
        assert len(got["layers"]) == 21 and set(got["layers"]) == {"GlobalBatchNorm"}
    assert isinstance(convert_sync_batchnorm(nn.BatchNorm2d(3), cuda=True), nn.SyncBatchNorm)
    assert isinstance(convert_sync_batchnorm(nn.BatchNorm2d(3), cuda=False), GlobalBatchNorm)
    # One process: nothing to synchronise, and the default says so.
    assert TrainConfig(batch_size=8).resolved(num_images=48, world_size=1).sync_bn is False
