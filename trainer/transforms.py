"""The SimCLR augmentation T (Chen et al. 2020, arXiv:2002.05709, Appendix A), batched.

    random resized crop (area in [crop_min_scale, crop_max_scale], aspect ratio in [3/4, 4/3])
    -> horizontal flip (p) -> colour jitter of strength s, applied with p = 0.8:
       brightness 0.8s, contrast 0.8s, saturation 0.8s, hue 0.2s, in a random order per image
       (as torchvision's ColorJitter draws a permutation per call, i.e. per image)
    -> grayscale (p) -> Gaussian blur (p, kernel ~10% of the side, sigma ~ U(0.1, 2.0); only
       when `aug.blur`, off for small images as the paper does on CIFAR)
    -> solarisation (p, threshold 0.5; BYOL, Grill et al. 2020) -> normalise with PIXEL_MEAN/STD.

The input is a batch of whole frames on one canvas [N, 3, Hc, Wc] with each frame's own
(height, width) (trainer/data.py `training_frames`): each crop box is drawn inside its own
frame, so crops cover the whole image, aspect kept, and the sampling grid is clamped to the
frame, so no padding of the canvas ever reaches a view. Without sizes, each image fills the
canvas.

Everything runs on whole batches of tensors on the input's device (CPU or GPU): the crop and
the flip are one affine grid per image through `F.affine_grid` + `F.grid_sample` (bilinear),
colour ops are elementwise with per-image factors, the blur is one grouped separable
convolution with a kernel per image. Parameters are drawn on the CPU (from `generator` or the
global RNG), so a seed gives the same views on every device; `sample_params` exposes them.

Departures from torchvision, on purpose: crop boxes are continuous (sub-pixel) rather than
integer, and when 10 tries find no box inside the image the fallback is a square box of the
drawn area (torchvision falls back to the whole image, which can exceed crop_max_scale).
"""

from __future__ import annotations

import math
from dataclasses import dataclass, fields

import torch
import torch.nn.functional as F
from torch import nn

from service.contract.train_config import AugmentConfig
from trainer.models import normalize_pixels

GRAY_WEIGHTS = (0.2989, 0.587, 0.114)  # ITU-R 601-2 luma, as torchvision's rgb_to_grayscale
CROP_RATIO = (3.0 / 4.0, 4.0 / 3.0)
CROP_TRIES = 10
JITTER_OPS = ("brightness", "contrast", "saturation", "hue")


@dataclass
class AugmentParams:
    """Per-image draws for a batch of n images (CPU tensors)."""

    crop: torch.Tensor  # float [n, 4]: x0, y0, w, h in input pixels (continuous), inside the frame
    frame: torch.Tensor  # float [n, 2]: height, width of each image's frame on the canvas
    flip: torch.Tensor  # bool [n]
    jitter: torch.Tensor  # bool [n]: colour jitter applied
    brightness: torch.Tensor  # float [n] multiplicative factors (1 = unchanged)
    contrast: torch.Tensor  # float [n]
    saturation: torch.Tensor  # float [n]
    hue: torch.Tensor  # float [n] shift in turns, |hue| <= 0.5
    jitter_order: torch.Tensor  # long [n, 4]: JITTER_OPS indices in the order applied
    grayscale: torch.Tensor  # bool [n]
    blur: torch.Tensor  # bool [n]
    blur_sigma: torch.Tensor  # float [n], pixels
    solarize: torch.Tensor  # bool [n]

    def select(self, index: torch.Tensor) -> AugmentParams:
        """The params of a subset of images (for tests comparing one image at a time)."""
        return AugmentParams(**{f.name: getattr(self, f.name)[index] for f in fields(self)})


def _gray(x: torch.Tensor) -> torch.Tensor:
    """[m, 3, H, W] -> luma [m, 1, H, W]."""
    r, g, b = x.unbind(1)
    return (GRAY_WEIGHTS[0] * r + GRAY_WEIGHTS[1] * g + GRAY_WEIGHTS[2] * b).unsqueeze(1)


def _blend(x: torch.Tensor, other: torch.Tensor, factor: torch.Tensor) -> torch.Tensor:
    return (factor * x + (1.0 - factor) * other).clamp_(0.0, 1.0)


def adjust_brightness(x: torch.Tensor, f: torch.Tensor) -> torch.Tensor:
    return _blend(x, torch.zeros_like(x), f)


def adjust_contrast(x: torch.Tensor, f: torch.Tensor) -> torch.Tensor:
    return _blend(x, _gray(x).mean(dim=(1, 2, 3), keepdim=True), f)


def adjust_saturation(x: torch.Tensor, f: torch.Tensor) -> torch.Tensor:
    return _blend(x, _gray(x), f)


def rgb_to_hsv(x: torch.Tensor) -> torch.Tensor:
    """[m, 3, H, W] RGB in [0, 1] -> HSV with hue in turns [0, 1)."""
    r, g, b = x.unbind(1)
    maxc, _ = x.max(dim=1)
    minc, _ = x.min(dim=1)
    chroma = maxc - minc
    gray = chroma == 0
    safe_chroma = torch.where(gray, torch.ones_like(chroma), chroma)
    s = chroma / torch.where(gray, torch.ones_like(maxc), maxc)
    rc, gc, bc = (maxc - r) / safe_chroma, (maxc - g) / safe_chroma, (maxc - b) / safe_chroma
    is_r = maxc == r
    is_g = (maxc == g) & ~is_r
    h = torch.where(is_r, bc - gc, torch.where(is_g, 2.0 + rc - bc, 4.0 + gc - rc))
    h = torch.where(gray, torch.zeros_like(h), h)
    h = torch.remainder(h / 6.0, 1.0)
    return torch.stack((h, s, maxc), dim=1)


def hsv_to_rgb(x: torch.Tensor) -> torch.Tensor:
    """Inverse of rgb_to_hsv: [m, 3, H, W] HSV -> RGB in [0, 1]."""
    h, s, v = x.unbind(1)
    h6 = h * 6.0
    i = torch.floor(h6)
    f = h6 - i
    sector = i.long().remainder(6).unsqueeze(1)  # [m, 1, H, W]
    p = (v * (1.0 - s)).clamp(0.0, 1.0)
    q = (v * (1.0 - s * f)).clamp(0.0, 1.0)
    t = (v * (1.0 - s * (1.0 - f))).clamp(0.0, 1.0)
    # Per sector (0..5) the (r, g, b) picked from (v, t, p, q): the standard HSV hexcone.
    table = torch.stack(
        (
            torch.stack((v, t, p), 1),
            torch.stack((q, v, p), 1),
            torch.stack((p, v, t), 1),
            torch.stack((p, q, v), 1),
            torch.stack((t, p, v), 1),
            torch.stack((v, p, q), 1),
        ),
        dim=1,
    )  # [m, 6, 3, H, W]
    return table.gather(1, sector.unsqueeze(1).expand(-1, 1, 3, -1, -1)).squeeze(1)


def adjust_hue(x: torch.Tensor, f: torch.Tensor) -> torch.Tensor:
    hsv = rgb_to_hsv(x)
    hsv[:, 0] = torch.remainder(hsv[:, 0] + f.view(-1, 1, 1), 1.0)
    return hsv_to_rgb(hsv)


_JITTER_FNS = (adjust_brightness, adjust_contrast, adjust_saturation, adjust_hue)


def gaussian_blur(x: torch.Tensor, sigma: torch.Tensor, kernel_size: int) -> torch.Tensor:
    """Separable Gaussian blur with one sigma per image, reflect padding: [m, C, H, W] -> same."""
    m, c, height, width = x.shape
    taps = torch.arange(kernel_size, device=x.device, dtype=x.dtype) - (kernel_size - 1) / 2
    kernel = torch.exp(-(taps**2) / (2.0 * sigma.to(x).view(-1, 1) ** 2))  # [m, K]
    kernel = (kernel / kernel.sum(dim=1, keepdim=True)).repeat_interleave(c, dim=0)  # [m*C, K]
    pad = kernel_size // 2
    y = x.reshape(1, m * c, height, width)
    y = F.conv2d(F.pad(y, (pad, pad, 0, 0), mode="reflect"), kernel.view(m * c, 1, 1, kernel_size), groups=m * c)
    y = F.conv2d(F.pad(y, (0, 0, pad, pad), mode="reflect"), kernel.view(m * c, 1, kernel_size, 1), groups=m * c)
    return y.view(m, c, height, width)


def blur_kernel_size(fraction: float, image_size: int) -> int:
    """Odd kernel side, about `fraction` of the image side (23 for 224 px), at least 3."""
    k = int(fraction * image_size)
    return max(3, k + 1 - k % 2)


class SimCLRAugment(nn.Module):
    """T: uint8 frames [N, 3, H, W] on any device (with per-image frame sizes [N, 2], or filling
    the canvas) -> normalised float32 views [N, 3, S, S].

    One independent draw per image per call; call twice for SimCLR's two views. `aug` must be
    resolved (no field None: see TrainConfig.resolved()).
    """

    def __init__(self, aug: AugmentConfig, image_size: int) -> None:
        super().__init__()
        undecided = [k for k in ("blur", "crop_min_scale", "color_strength") if getattr(aug, k) is None]
        if undecided:
            raise ValueError(f"AugmentConfig.{undecided[0]} is None: pass TrainConfig.resolved().augment")
        self.aug = aug
        self.image_size = int(image_size)
        self.blur_kernel = blur_kernel_size(aug.blur_kernel_fraction, self.image_size)

    def sample_params(
        self,
        n: int,
        height: int | torch.Tensor | None = None,
        width: int | torch.Tensor | None = None,
        generator: torch.Generator | None = None,
    ) -> AugmentParams:
        """Draw the parameters of n images on the CPU; `height`, `width`: one size for all (default
        image_size) or each image's own (tensors [n])."""
        a = self.aug
        assert a.crop_min_scale is not None and a.color_strength is not None  # checked in __init__
        height = (
            torch.as_tensor(self.image_size if height is None else height, dtype=torch.float32).expand(n).reshape(n, 1)
        )  # [n, 1]
        width = (
            torch.as_tensor(self.image_size if width is None else width, dtype=torch.float32).expand(n).reshape(n, 1)
        )  # [n, 1]

        def uniform(lo: float, hi: float, *shape: int) -> torch.Tensor:
            return lo + (hi - lo) * torch.rand(*shape, generator=generator)

        def bernoulli(p: float) -> torch.Tensor:
            return torch.rand(n, generator=generator) < p

        # RandomResizedCrop: first of CROP_TRIES (area, ratio) draws whose box fits.
        area = uniform(a.crop_min_scale, a.crop_max_scale, n, CROP_TRIES) * (height * width)
        ratio = torch.exp(uniform(math.log(CROP_RATIO[0]), math.log(CROP_RATIO[1]), n, CROP_TRIES))
        w, h = torch.sqrt(area * ratio), torch.sqrt(area / ratio)
        fits = (w <= width) & (h <= height)
        first = fits.int().argmax(dim=1, keepdim=True)  # [n, 1]
        side = torch.minimum(torch.sqrt(area[:, :1]), torch.minimum(height, width))
        w = torch.where(fits.any(1, keepdim=True), w.gather(1, first), side).squeeze(1)
        h = torch.where(fits.any(1, keepdim=True), h.gather(1, first), side).squeeze(1)
        x0 = torch.rand(n, generator=generator) * (width.squeeze(1) - w)
        y0 = torch.rand(n, generator=generator) * (height.squeeze(1) - h)
        flip = bernoulli(a.hflip_prob)

        s = a.color_strength
        jitter = bernoulli(a.color_jitter_prob)
        brightness = uniform(max(0.0, 1 - 0.8 * s), 1 + 0.8 * s, n)
        contrast = uniform(max(0.0, 1 - 0.8 * s), 1 + 0.8 * s, n)
        saturation = uniform(max(0.0, 1 - 0.8 * s), 1 + 0.8 * s, n)
        hue_max = min(0.5, 0.2 * s)
        hue = uniform(-hue_max, hue_max, n)
        order = torch.rand(n, len(JITTER_OPS), generator=generator).argsort(dim=1)
        grayscale = bernoulli(a.grayscale_prob)
        blur = bernoulli(a.blur_prob) & bool(a.blur)
        sigma = uniform(a.blur_sigma_min, a.blur_sigma_max, n)
        solarize = bernoulli(a.solarize_prob)
        return AugmentParams(
            crop=torch.stack((x0, y0, w, h), dim=1),
            frame=torch.cat((height, width), dim=1),
            flip=flip,
            jitter=jitter,
            brightness=brightness,
            contrast=contrast,
            saturation=saturation,
            hue=hue,
            jitter_order=order,
            grayscale=grayscale,
            blur=blur,
            blur_sigma=sigma,
            solarize=solarize,
        )

    @torch.no_grad()
    def apply_params(self, x: torch.Tensor, p: AugmentParams) -> torch.Tensor:
        """Apply given params: uint8 [N, 3, H, W] -> float32 normalised [N, 3, S, S]."""
        n, _, height, width = x.shape
        dev = x.device

        def rows(mask: torch.Tensor) -> torch.Tensor | None:
            idx = mask.nonzero().squeeze(1)  # CPU mask: no device sync
            return idx.to(dev, non_blocking=True) if idx.numel() else None

        # Crop + flip as one affine map from output to input coords (align_corners=False):
        # x_in = cx + sx * x_out, sx = +-w/W, cx = box centre in [-1, 1].
        x0, y0, w, h = p.crop.unbind(1)
        theta = torch.zeros(n, 2, 3)
        theta[:, 0, 0] = torch.where(p.flip, -w / width, w / width)
        theta[:, 0, 2] = (2 * x0 + w) / width - 1
        theta[:, 1, 1] = h / height
        theta[:, 1, 2] = (2 * y0 + h) / height - 1
        grid = F.affine_grid(theta.to(dev), [n, 3, self.image_size, self.image_size], align_corners=False)
        # Keep every sample inside its frame (pixel centres 0.5 .. side - 0.5): the canvas's
        # padding never blends into an edge, as padding_mode="border" does for a full canvas.
        canvas = torch.tensor([width, height], dtype=torch.float32)
        low = (1.0 / canvas - 1.0).expand(n, 2)  # [n, 2] (x, y)
        high = (2.0 * p.frame.flip(1) - 1.0) / canvas - 1.0  # [n, 2] (x, y)
        grid = torch.maximum(torch.minimum(grid, high.to(dev).view(n, 1, 1, 2)), low.to(dev).view(n, 1, 1, 2))
        img = x.float().div_(255.0)  # [N, 3, H, W] in [0, 1]
        img = F.grid_sample(img, grid, mode="bilinear", padding_mode="border", align_corners=False)  # [N, 3, S, S]

        factors = torch.stack((p.brightness, p.contrast, p.saturation, p.hue), dim=1).to(dev, non_blocking=True)
        for pos in range(len(JITTER_OPS)):
            for op, fn in enumerate(_JITTER_FNS):
                idx = rows(p.jitter & (p.jitter_order[:, pos] == op))
                if idx is not None:
                    f = factors[idx, op]
                    img[idx] = fn(img[idx], f if op == 3 else f.view(-1, 1, 1, 1))
        idx = rows(p.grayscale)
        if idx is not None:
            img[idx] = _gray(img[idx]).expand(-1, 3, -1, -1)
        idx = rows(p.blur)
        if idx is not None:
            img[idx] = gaussian_blur(img[idx], p.blur_sigma.to(dev)[idx], self.blur_kernel)
        idx = rows(p.solarize)
        if idx is not None:
            sel = img[idx]
            img[idx] = torch.where(sel < 0.5, sel, 1.0 - sel)
        return normalize_pixels(img)

    def forward(
        self,
        x: torch.Tensor,
        sizes: torch.Tensor | None = None,
        generator: torch.Generator | None = None,
        return_params: bool = False,
    ) -> torch.Tensor | tuple[torch.Tensor, AugmentParams]:
        """`x` uint8 [N, 3, H, W]; `sizes` int [N, 2] (height, width) of each frame on the canvas
        (CPU), or None when every image fills it."""
        if x.dtype != torch.uint8 or x.ndim != 4 or x.shape[1] != 3:
            raise ValueError(f"expected uint8 images [N, 3, H, W], got {x.dtype} {tuple(x.shape)}")
        heights, widths = (x.shape[2], x.shape[3]) if sizes is None else sizes.cpu().unbind(1)
        params = self.sample_params(x.shape[0], heights, widths, generator=generator)
        out = self.apply_params(x, params)
        return (out, params) if return_params else out
