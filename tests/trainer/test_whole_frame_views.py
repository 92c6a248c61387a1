"""Training views are cut from the whole image, through `open_dataset` and the training loader:
the borders of a non-square photo reach the views (a centre crop would never show them), the
canvas padding never does, and the crop boxes follow torchvision's RandomResizedCrop sampling
on the same frame. A frame that fails to decode is a masked slot, never a second image."""

from __future__ import annotations

import io
import math
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image
from scipy.stats import ks_2samp
from torchvision.transforms import RandomResizedCrop

from service.contract.train_config import TrainConfig
from trainer.data import WORKING_SCALE, SkippedImagesWarning, open_dataset
from trainer.engine import training_loader
from trainer.models import PIXEL_MEAN, PIXEL_STD
from trainer.transforms import CROP_RATIO, SimCLRAugment

S = 16
# A 2:1 photo: red and blue bands on the outer fifth of each side, green and yellow bands on the
# outer eighth of the top and bottom, grey between. The S x S centre crop of the evaluation
# policy keeps the middle half of the width: it never shows red or blue.
RED, BLUE, GREEN, YELLOW, GREY = (230, 20, 20), (20, 20, 230), (20, 200, 20), (230, 230, 20), (128, 128, 128)


def _banded(width: int = 400, height: int = 200) -> Image.Image:
    img = np.empty((height, width, 3), np.uint8)
    img[:] = GREY
    band_x, band_y = width // 5, height // 8
    img[:band_y], img[-band_y:] = GREEN, YELLOW
    img[:, :band_x], img[:, -band_x:] = RED, BLUE
    return Image.fromarray(img)


def _views_of(cfg: TrainConfig, data: Path, batches: int) -> tuple[torch.Tensor, list[torch.Tensor]]:
    """Views [M, 3, S, S] in 0..255 of `batches` epochs of the training loader, and its sizes."""
    dataset = open_dataset(data, cfg.image_size)
    loader, sampler = training_loader(dataset, cfg)
    aug = SimCLRAugment(cfg.augment, cfg.image_size)
    mean, std = torch.tensor(PIXEL_MEAN).view(1, 3, 1, 1), torch.tensor(PIXEL_STD).view(1, 3, 1, 1)
    views, sizes = [], []
    for epoch in range(batches):
        sampler.set_epoch(epoch)
        for frames, size, ok in loader:
            assert ok.all()
            views.append((aug(frames, size) * std + mean) * 255)
            sizes.append(size)
    return torch.cat(views), sizes


def _share_near(views: torch.Tensor, colour: tuple[int, int, int], tol: float = 12.0) -> float:
    """Share of the pixels of `views` [M, 3, S, S] within `tol` of `colour` on every channel."""
    target = torch.tensor(colour, dtype=torch.float32).view(1, 3, 1, 1)
    return float(((views - target).abs() <= tol).all(dim=1).float().mean())


def test_the_borders_of_a_non_square_image_reach_the_views(tmp_path: Path) -> None:
    _banded().save(tmp_path / "photo.png")
    Image.new("RGB", (120, 300), GREY).save(tmp_path / "tall.png")  # another size: the canvas pads
    # Geometry only: no colour jitter, grayscale or flip, so colours stay what the photo holds.
    cfg = TrainConfig(image_size=S, batch_size=2, epochs=3, num_workers=0, augment={"color_jitter_prob": 0.0,
                      "grayscale_prob": 0.0, "hflip_prob": 0.0}).resolved(num_images=2)  # fmt: skip
    assert cfg.augment.crop_min_scale == 0.2
    views, sizes = _views_of(cfg, tmp_path, batches=150)
    # The frames: the whole images, the longer side at WORKING_SCALE x S, on one square canvas.
    assert {tuple(s.tolist()) for b in sizes for s in b} == {(16, 32), (32, 13)}
    photo = views[torch.cat([(b[:, 1] == 32) for b in sizes])]  # the 2:1 photo's views
    for colour in (RED, BLUE, GREEN, YELLOW):
        assert _share_near(photo, colour) > 0.02, colour  # each band takes ~10-20% of the frame
    # The centre-crop policy (evaluation, serving) never shows the side bands.
    centre = torch.from_numpy(open_dataset(tmp_path, S).image(0).copy()).permute(2, 0, 1)[None].float()
    assert _share_near(centre, RED) == 0 and _share_near(centre, BLUE) == 0
    # The canvas's padding (black) never blends in: every view of the uniform tall image is its grey.
    tall = views[torch.cat([(b[:, 1] == 13) for b in sizes])]
    assert len(tall) == 150 and float((tall - 128).abs().max()) < 0.5


def test_crop_boxes_follow_torchvision_random_resized_crop(tmp_path: Path) -> None:
    _banded(600, 400).save(tmp_path / "a.jpg", quality=95)
    _banded(600, 400).save(tmp_path / "b.jpg", quality=95)
    cfg = TrainConfig(image_size=112, batch_size=2, num_workers=0).resolved(num_images=2)
    dataset = open_dataset(tmp_path, cfg.image_size)
    loader, _ = training_loader(dataset, cfg)
    frames, sizes, ok = next(iter(loader))  # the frame as the loader hands it on
    sizes = sizes[:1]
    height, width = sizes[0].tolist()
    assert (width, height) == (WORKING_SCALE * 112, round(WORKING_SCALE * 112 * 400 / 600)) and ok.all()
    n = 20_000
    ours = SimCLRAugment(cfg.augment, cfg.image_size).sample_params(
        n, sizes[:, 0].expand(n), sizes[:, 1].expand(n), generator=torch.Generator().manual_seed(0)
    )
    _, _, w, h = ours.crop.double().unbind(1)
    area, log_ratio = (w * h / (width * height)).numpy(), torch.log(w / h).numpy()

    frame = Image.fromarray(frames[0, :, :height, :width].permute(1, 2, 0).numpy())
    scale = (cfg.augment.crop_min_scale, cfg.augment.crop_max_scale)
    torch.manual_seed(0)
    boxes = np.array([RandomResizedCrop.get_params(frame, list(scale), list(CROP_RATIO)) for _ in range(n)])
    tv_h, tv_w = boxes[:, 2].astype(float), boxes[:, 3].astype(float)
    tv_area, tv_log_ratio = tv_w * tv_h / (width * height), np.log(tv_w / tv_h)

    # The configured ranges hold (torchvision's integer boxes may round past them by a pixel).
    assert area.min() >= scale[0] - 1e-9 and area.max() <= scale[1] + 1e-9
    assert log_ratio.min() >= math.log(CROP_RATIO[0]) - 1e-9 and log_ratio.max() <= math.log(CROP_RATIO[1]) + 1e-9
    # The same distributions: two-sample Kolmogorov-Smirnov at n = 20,000 each (the critical
    # distance at p = 0.001 is 0.0195), against an area shifted by a tenth, which must fail.
    assert ks_2samp(area, tv_area).statistic < 0.0195
    assert ks_2samp(log_ratio, tv_log_ratio).statistic < 0.0195
    assert ks_2samp(area, np.clip(tv_area * 1.1, 0, 1)).statistic > 0.0195
    # Boxes lie inside the frame, and their centres cover it from side to side.
    x0, y0 = ours.crop[:, 0].double(), ours.crop[:, 1].double()
    assert bool((x0 >= 0).all() and (x0 + w <= width + 1e-6).all() and (y0 + h <= height + 1e-6).all())
    centres = (x0 + w / 2) / width
    assert float(centres.min()) < 0.25 and float(centres.max()) > 0.75


def test_a_frame_that_fails_to_decode_is_a_masked_slot(tmp_path: Path) -> None:
    buf = io.BytesIO()
    Image.fromarray(np.random.default_rng(0).integers(0, 255, (64, 64, 3), np.uint8)).save(buf, "PNG")
    (tmp_path / "0_truncated.png").write_bytes(buf.getvalue()[: len(buf.getvalue()) // 2])
    for i, colour in enumerate((RED, BLUE, GREEN)):
        Image.new("RGB", (20, 30), colour).save(tmp_path / f"{i + 1}.png")
    dataset = open_dataset(tmp_path, S)
    cfg = TrainConfig(image_size=S, batch_size=4, num_workers=2)
    loader, _ = training_loader(dataset, cfg)
    with pytest.warns(SkippedImagesWarning):  # in the main process too (workers warn on their own)
        dataset.training_frames()[0]
    (frames, sizes, ok), *rest = list(loader)  # one batch: the epoch keeps its length
    assert not rest and ok.sum() == 3 and frames.shape[0] == 4
    masked = int((~ok).nonzero())
    assert sizes[masked].tolist() == [1, 1] and int(frames[masked].max()) == 0  # a blank slot
    firsts = {tuple(frames[i, :, 0, 0].tolist()) for i in range(4) if ok[i]}
    assert firsts == {RED, BLUE, GREEN}  # the three readable images, each once
