"""A masked slot (an image whose pixels failed to decode) takes no part in any method's loss:
each loss with a mask equals the loss of the other images alone; a run over a folder with such
a file keeps its epoch length and reports the masked slots in its progress."""

from __future__ import annotations

import io
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image

from service.contract.train_config import TrainConfig
from trainer.engine import train
from trainer.losses import byol_loss, info_nce_loss, nt_xent_loss


def _rows(n: int = 8, d: int = 5) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    g = torch.Generator().manual_seed(0)
    z_a = torch.randn(n, d, generator=g, dtype=torch.float64)
    z_b = z_a + 0.5 * torch.randn(n, d, generator=g, dtype=torch.float64)
    valid = torch.tensor([True, False, True, True, False, True, True, True])
    return z_a, z_b, valid


def test_each_loss_with_a_mask_is_the_loss_without_the_masked_images() -> None:
    z_a, z_b, valid = _rows()
    torch.testing.assert_close(nt_xent_loss(z_a, z_b, 0.2, valid=valid), nt_xent_loss(z_a[valid], z_b[valid], 0.2))
    torch.testing.assert_close(byol_loss(z_a, z_b, valid), byol_loss(z_a[valid], z_b[valid]))
    queue = torch.nn.functional.normalize(torch.randn(16, 5, dtype=torch.float64), dim=1)
    torch.testing.assert_close(
        info_nce_loss(z_a, z_b, queue, 0.2, valid), info_nce_loss(z_a[valid], z_b[valid], queue, 0.2)
    )
    # A masked image's rows receive no gradient.
    z_a.requires_grad_(True)
    nt_xent_loss(z_a, z_b, 0.2, valid=valid).backward()
    assert z_a.grad is not None and float(z_a.grad[~valid].abs().max()) == 0.0
    # Every slot masked: a zero loss that still backpropagates.
    none = torch.zeros(8, dtype=torch.bool)
    assert float(nt_xent_loss(z_a, z_b, 0.2, valid=none)) == 0.0


@pytest.mark.parametrize("method", ["simclr", "moco_v2", "byol"])
def test_a_run_over_an_unreadable_file_masks_its_slot_and_reports_it(method: str, tmp_path: Path) -> None:
    data = tmp_path / "images"
    data.mkdir()
    rng = np.random.default_rng(0)
    for i in range(15):
        Image.fromarray(rng.integers(0, 255, (20, 24, 3), np.uint8)).save(data / f"{i:02d}.png")
    buf = io.BytesIO()
    Image.fromarray(rng.integers(0, 255, (64, 64, 3), np.uint8)).save(buf, "PNG")
    (data / "99_truncated.png").write_bytes(buf.getvalue()[: len(buf.getvalue()) // 2])
    cfg = TrainConfig(method=method, image_size=16, small_stem=False, batch_size=8, epochs=2, num_workers=1,
                      log_every_steps=1)  # fmt: skip
    progress: list[dict] = []
    result = train(cfg, data, tmp_path / "run", on_progress=progress.append)  # the worker warns, on stderr
    assert result.step == 4 and result.loss is not None and np.isfinite(result.loss)  # 16 images, 2 epochs
    assert progress[-1]["masked_images"] == 2  # once an epoch, counted from the batches, not in the worker
