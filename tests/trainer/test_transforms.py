"""trainer.transforms: the paper's T, checked op by op against torchvision and by its statistics."""

from __future__ import annotations

import math

import numpy as np
import pytest
import torch
from torchvision.transforms.v2 import functional as TF

from service.contract.encoder_io import PIXEL_MEAN, PIXEL_STD
from service.contract.train_config import AugmentConfig
from trainer.transforms import (
    JITTER_OPS,
    SimCLRAugment,
    adjust_brightness,
    adjust_contrast,
    adjust_hue,
    adjust_saturation,
    blur_kernel_size,
    gaussian_blur,
)

S = 16
OFF = dict(hflip_prob=0.0, color_jitter_prob=0.0, grayscale_prob=0.0, blur=False, solarize_prob=0.0)
MEAN = torch.tensor(PIXEL_MEAN).view(1, 3, 1, 1)
STD = torch.tensor(PIXEL_STD).view(1, 3, 1, 1)


def _aug(**fields: object) -> AugmentConfig:
    """An AugmentConfig with the paper's crop scale and colour strength unless given."""
    return AugmentConfig.model_validate({"crop_min_scale": 0.08, "color_strength": 1.0, **fields})


def _images(n: int, seed: int = 0, size: int = S) -> torch.Tensor:
    g = torch.Generator().manual_seed(seed)
    return torch.randint(0, 256, (n, 3, size, size), generator=g, dtype=torch.uint8)


def _unnormalise(y: torch.Tensor) -> torch.Tensor:
    return y * STD + MEAN


def _within_5_sigma(count: int, n: int, p: float) -> bool:
    return abs(count - n * p) <= 5 * math.sqrt(n * p * (1 - p)) + 1e-9


def test_parameter_statistics_match_the_config() -> None:
    aug_cfg = _aug(
        crop_min_scale=0.08,
        hflip_prob=0.5,
        color_strength=0.5,
        color_jitter_prob=0.8,
        grayscale_prob=0.2,
        blur=True,
        blur_prob=0.5,
        solarize_prob=0.3,
    )
    n = 20_000
    p = SimCLRAugment(aug_cfg, 32).sample_params(n, generator=torch.Generator().manual_seed(0))
    for flag, prob in ((p.flip, 0.5), (p.jitter, 0.8), (p.grayscale, 0.2), (p.blur, 0.5), (p.solarize, 0.3)):
        assert _within_5_sigma(int(flag.sum()), n, prob), (int(flag.sum()), prob)

    x0, y0, w, h = p.crop.double().unbind(1)
    area = w * h / (32 * 32)
    assert area.min() >= 0.08 - 1e-6 and area.max() <= 1.0 + 1e-6
    assert (w / h).min() >= 3 / 4 - 1e-6 and (w / h).max() <= 4 / 3 + 1e-6
    assert (x0 >= 0).all() and (y0 >= 0).all() and (x0 + w <= 32 + 1e-4).all() and (y0 + h <= 32 + 1e-4).all()
    # torchvision's rejection sampling, worked out: on a square, area a fits with probability
    # 1 for a <= 3/4, else ln(1/a) / ln(4/3); q = P(a try fits); an accepted area has density
    # proportional to the fit probability, so P(area < 1/2) = (1 - (1 - q)^10) (0.42 / 0.92) / q.
    fit_high = (0.25 + 0.75 * math.log(0.75)) / math.log(4 / 3)  # integral over [3/4, 1]
    q = (0.75 - 0.08 + fit_high) / 0.92
    expected = (1 - (1 - q) ** 10) * (0.5 - 0.08) / 0.92 / q
    assert _within_5_sigma(int((area < 0.5).sum()), n, expected)
    # Jitter factors: [1 - 0.8s, 1 + 0.8s] for s = 0.5, hue within 0.2s, filling the range.
    for factor in (p.brightness, p.contrast, p.saturation):
        assert 0.6 <= factor.min() < 0.62 and 1.38 < factor.max() <= 1.4
    assert -0.1 <= p.hue.min() < -0.098 and 0.098 < p.hue.max() <= 0.1
    assert p.blur_sigma.min() >= 0.1 and p.blur_sigma.max() <= 2.0
    # Random order per image: each row a permutation, each op first a quarter of the time.
    assert (p.jitter_order.sort(dim=1).values == torch.arange(4)).all()
    for op in range(len(JITTER_OPS)):
        assert _within_5_sigma(int((p.jitter_order[:, 0] == op).sum()), n, 0.25)


def test_crop_scale_range_and_blur_switch() -> None:
    cfg = _aug(crop_min_scale=0.3, crop_max_scale=0.6, blur=False, blur_prob=1.0)
    p = SimCLRAugment(cfg, 24).sample_params(5000, generator=torch.Generator().manual_seed(1))
    area = p.crop[:, 2] * p.crop[:, 3] / 24**2
    assert area.min() >= 0.3 - 1e-5 and area.max() <= 0.6 + 1e-5
    assert not p.blur.any()  # blur off (small-image default): never applied whatever blur_prob


def test_output_shape_dtype_and_normalisation() -> None:
    x = _images(6, size=20)
    aug = SimCLRAugment(_aug(crop_min_scale=1.0, **OFF), S)
    same = SimCLRAugment(_aug(crop_min_scale=1.0, **OFF), 20)
    y = aug(x)
    assert y.shape == (6, 3, S, S) and y.dtype == torch.float32
    # Whole-image crop at the input size is the identity: only the normalisation remains.
    expected = (x.double() / 255 - MEAN.double()) / STD.double()
    assert torch.allclose(same(x).double(), expected, atol=1e-5)
    with pytest.raises(ValueError, match="uint8"):
        aug(x.float())
    with pytest.raises(ValueError, match="resolved"):
        SimCLRAugment(AugmentConfig(), S)


def test_forced_flip_equals_torch_flip() -> None:
    x = _images(5)
    y = SimCLRAugment(_aug(crop_min_scale=1.0, **{**OFF, "hflip_prob": 1.0}), S)(x)
    expected = (torch.flip(x, dims=[3]).double() / 255 - MEAN.double()) / STD.double()
    assert torch.allclose(y.double(), expected, atol=1e-5)


def test_crop_matches_torchvision_resized_crop() -> None:
    """Integer boxes, compared with TF.resized_crop (bilinear, no antialias) away from the
    box edge, where grid_sample reads the image beyond the box and resize clamps inside it."""
    x = _images(3, seed=4, size=32)
    aug = SimCLRAugment(_aug(**OFF), S)
    p = aug.sample_params(3, 32, 32, generator=torch.Generator().manual_seed(0))
    boxes = [(3, 5, 12, 10), (0, 0, 20, 26), (10, 2, 22, 16)]  # x0, y0, w, h
    p.crop = torch.tensor(boxes, dtype=torch.float32)
    y = _unnormalise(aug.apply_params(x, p))
    for i, (left, top, w, h) in enumerate(boxes):
        ref = TF.resized_crop(x[i].float() / 255, top, left, h, w, [S, S], antialias=False)
        assert torch.allclose(y[i, :, 1:-1, 1:-1], ref[:, 1:-1, 1:-1], atol=1e-5)


def test_colour_ops_match_torchvision() -> None:
    g = torch.Generator().manual_seed(5)
    x = torch.rand(6, 3, 10, 10, generator=g)
    factors = torch.rand(6, generator=g) * 1.8
    hues = torch.rand(6, generator=g) - 0.5
    for ours, theirs in (
        (adjust_brightness, TF.adjust_brightness),
        (adjust_contrast, TF.adjust_contrast),
        (adjust_saturation, TF.adjust_saturation),
    ):
        out = ours(x.clone(), factors.view(-1, 1, 1, 1))
        ref = torch.stack([theirs(x[i], float(factors[i])) for i in range(6)])
        assert torch.allclose(out, ref, atol=1e-6), ours.__name__
    ref = torch.stack([TF.adjust_hue(x[i], float(hues[i])) for i in range(6)])
    assert torch.allclose(adjust_hue(x.clone(), hues), ref, atol=1e-5)
    sigma = torch.rand(6, generator=g) * 1.9 + 0.1
    ref = torch.stack([TF.gaussian_blur(x[i], [5, 5], [float(sigma[i])] * 2) for i in range(6)])
    assert torch.allclose(gaussian_blur(x, sigma, 5), ref, atol=1e-6)
    assert blur_kernel_size(0.1, 224) == 23 and blur_kernel_size(0.1, 32) == 3 and blur_kernel_size(0.1, 96) == 9


def test_pipeline_applies_each_image_its_own_params_in_order() -> None:
    """The batched pipeline against a per-image torchvision chain with the same draws."""
    cfg = _aug(color_strength=1.0, blur=True, blur_prob=0.5, blur_kernel_fraction=0.2, solarize_prob=0.3)
    aug = SimCLRAugment(cfg, S)
    x = _images(24, seed=6)
    y, p = aug(x, generator=torch.Generator().manual_seed(2), return_params=True)
    y = _unnormalise(y)
    tv_ops = (TF.adjust_brightness, TF.adjust_contrast, TF.adjust_saturation, TF.adjust_hue)
    for i in range(24):
        one = p.select(torch.tensor([i]))
        img = _unnormalise(aug.apply_params(x[i : i + 1], one))[0]  # crop+flip as in the batch
        assert torch.allclose(img, y[i], atol=1e-5)
        # The reference starts from the same crop with every colour op off, then runs
        # torchvision's functional ops one image at a time in the drawn order.
        plain = p.select(torch.tensor([i]))
        for flag in ("jitter", "grayscale", "blur", "solarize"):
            setattr(plain, flag, torch.zeros(1, dtype=torch.bool))
        ref = _unnormalise(aug.apply_params(x[i : i + 1], plain))[0]
        if one.jitter[0]:
            for op in one.jitter_order[0].tolist():
                factor = float((one.brightness, one.contrast, one.saturation, one.hue)[op][0])
                ref = tv_ops[op](ref, factor)
        if one.grayscale[0]:
            ref = TF.rgb_to_grayscale(ref, num_output_channels=3)
        if one.blur[0]:
            ref = TF.gaussian_blur(ref, [aug.blur_kernel] * 2, [float(one.blur_sigma[0])] * 2)
        if one.solarize[0]:
            ref = torch.where(ref < 0.5, ref, 1 - ref)
        assert torch.allclose(y[i], ref, atol=2e-5), i
    assert p.jitter.any() and p.grayscale.any() and p.blur.any() and p.solarize.any()


def test_forced_grayscale_has_equal_channels() -> None:
    cfg = _aug(**{**OFF, "grayscale_prob": 1.0, "color_jitter_prob": 1.0})
    y = _unnormalise(SimCLRAugment(cfg, S)(_images(8)))
    assert torch.allclose(y[:, 0], y[:, 1], atol=1e-6) and torch.allclose(y[:, 1], y[:, 2], atol=1e-6)


def test_seeded_generator_is_deterministic_and_draws_differ_per_image() -> None:
    aug = SimCLRAugment(_aug(blur=True), S)
    x = _images(1).expand(16, -1, -1, -1).contiguous()  # the same image 16 times
    a = aug(x, generator=torch.Generator().manual_seed(7))
    b = aug(x, generator=torch.Generator().manual_seed(7))
    c = aug(x, generator=torch.Generator().manual_seed(8))
    assert torch.equal(a, b) and not torch.equal(a, c)
    flat = a.flatten(1)
    assert all(not torch.equal(flat[i], flat[j]) for i in range(16) for j in range(i))
    torch.manual_seed(3)
    d = aug(x)
    torch.manual_seed(3)
    assert torch.equal(d, aug(x))  # no generator: the global RNG the engine seeds


@pytest.mark.gpu
def test_gpu_matches_cpu_for_the_same_draws() -> None:
    if not torch.cuda.is_available():
        pytest.skip("no CUDA device on this machine")
    aug = SimCLRAugment(_aug(blur=True, solarize_prob=0.2), 32)
    x = _images(64, size=32)
    cpu = aug(x, generator=torch.Generator().manual_seed(0))
    gpu = aug.cuda()(x.cuda(), generator=torch.Generator().manual_seed(0))
    assert gpu.device.type == "cuda"
    assert np.allclose(cpu.numpy(), gpu.cpu().numpy(), atol=1e-4)
