"""Two gloo processes holding half a batch each == one process holding the whole batch;
rank-0-first set-up that the other ranks wait for, and whose failure they share."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch
import torch.multiprocessing as mp
from torch import nn
from torch.nn.parallel import DistributedDataParallel

from service.contract.ports import free_port
from trainer import distributed
from trainer.losses import nt_xent_loss

N, D_IN, D_OUT, T = 8, 6, 5, 0.3


def _problem() -> tuple[nn.Linear, torch.Tensor, torch.Tensor]:
    """The same small model and inputs on every rank: a linear map of two views of N samples."""
    g = torch.Generator().manual_seed(0)
    model = nn.Linear(D_IN, D_OUT).double()
    with torch.no_grad():
        model.weight.copy_(torch.randn(D_OUT, D_IN, generator=g, dtype=torch.float64))
        model.bias.copy_(torch.randn(D_OUT, generator=g, dtype=torch.float64))
    x_a = torch.randn(N, D_IN, generator=g, dtype=torch.float64)
    x_b = x_a + 0.3 * torch.randn(N, D_IN, generator=g, dtype=torch.float64)
    return model, x_a, x_b


def _refuse() -> None:
    raise ValueError("refused on rank 0")


def _rank(rank: int, world: int, init_method: str, out: str) -> None:
    with distributed.process_group(rank, world, "gloo", init_method):
        marker = Path(out) / "set-up-by-rank-0"
        distributed.main_first(lambda: marker.write_text(str(distributed.rank())))
        set_up = marker.read_text()  # every rank returns only once rank 0 is done
        try:
            distributed.main_first(_refuse)
            refused = ""
        except ValueError as exc:
            refused = str(exc)
        model, x_a, x_b = _problem()
        ddp = DistributedDataParallel(model)  # averages parameter gradients over ranks
        rows = slice(rank * N // world, (rank + 1) * N // world)
        z = ddp(torch.cat([x_a[rows], x_b[rows]]))  # [2n, D_OUT]
        z.retain_grad()
        loss = nt_xent_loss(*z.chunk(2), T)
        loss.backward()
        torch.save(
            {
                "loss": distributed.all_reduce_mean(loss),
                "weight_grad": model.weight.grad,
                "bias_grad": model.bias.grad,
                "z_grad": z.grad,
                "gathered": distributed.gather_with_grad(x_a[rows]),
                "set_up": set_up,
                "refused": refused,
            },
            Path(out) / f"rank{rank}.pt",
        )


@pytest.mark.integration
@pytest.mark.slow
def test_two_gloo_ranks_equal_one_process(tmp_path: Path) -> None:
    world = 2
    init_method = f"tcp://127.0.0.1:{free_port()}"
    mp.start_processes(_rank, args=(world, init_method, str(tmp_path)), nprocs=world, start_method="spawn")
    ranks = [torch.load(tmp_path / f"rank{r}.pt", weights_only=True) for r in range(world)]

    model, x_a, x_b = _problem()
    z = model(torch.cat([x_a, x_b]))  # one process, the whole batch
    z.retain_grad()
    loss = nt_xent_loss(*z.chunk(2), T)
    loss.backward()

    for r, got in enumerate(ranks):
        assert got["set_up"] == "0" and got["refused"] == "refused on rank 0"
        assert torch.equal(got["gathered"], x_a)  # rank order preserved
        torch.testing.assert_close(got["loss"], loss.detach(), rtol=1e-5, atol=1e-7)
        # Each rank's loss reaches the other rank's rows through the gathered candidates;
        # after DDP's average the parameter gradients must be the global ones.
        torch.testing.assert_close(got["bias_grad"], model.bias.grad, rtol=1e-5, atol=1e-7)
        torch.testing.assert_close(got["weight_grad"], model.weight.grad, rtol=1e-5, atol=1e-7)
        # Input gradients are not averaged by DDP: each rank holds world x its slice of the global one.
        rows = slice(r * N // world, (r + 1) * N // world)
        expected = torch.cat([z.grad[:N][rows], z.grad[N:][rows]])
        torch.testing.assert_close(got["z_grad"] / world, expected, rtol=1e-5, atol=1e-7)
