"""Header probing, scaled JPEG decoding and `EncodedImages`, the bounded-memory decode path."""

from __future__ import annotations

import io

import numpy as np
import pytest
from PIL import Image

from service.contract.imaging import EncodedImages, ImageDecodeError, ResizePolicy, decode_image, probe_image


def smooth_photo(h: int, w: int) -> np.ndarray:
    """A smooth colour image (gradients and a few discs): what a DCT-scaled decode should keep."""
    yy, xx = np.mgrid[0:h, 0:w] / max(h, w)
    img = np.stack([xx, yy, 0.5 + 0.5 * np.sin(6 * xx + 4 * yy)], axis=-1)
    for cy, cx, r in ((0.3, 0.3, 0.1), (0.6, 0.7, 0.15)):
        img[(yy - cy) ** 2 + (xx - cx) ** 2 < r**2] = (0.9, 0.1, 0.2)
    return (img * 255).round().astype(np.uint8)


def encode(array: np.ndarray, fmt: str, **params: object) -> bytes:
    buf = io.BytesIO()
    Image.fromarray(array).save(buf, format=fmt, **params)
    return buf.getvalue()


def test_probe_reads_the_header_only_and_checks_like_decode() -> None:
    header = probe_image(encode(smooth_photo(30, 50), "PNG"))
    assert (header.format, header.width, header.height, header.pixels) == ("PNG", 50, 30, 1500)
    assert header.media_type == "image/png"
    with pytest.raises(ImageDecodeError) as bomb:
        probe_image(encode(smooth_photo(30, 50), "PNG"), max_pixels=1499)
    assert bomb.value.code == "image_too_large" and "50x30 = 1500" in str(bomb.value)
    with pytest.raises(ImageDecodeError) as empty:
        probe_image(b"")
    assert empty.value.code == "empty_image"


def test_jpeg_decodes_at_a_reduced_scale_keeping_both_sides_above_min_side() -> None:
    data = encode(smooth_photo(960, 1280), "JPEG", quality=95)
    assert decode_image(data).size == (1280, 960)
    assert decode_image(data, min_side=200).size == (320, 240)  # 1/4: 1/8 would give 120 < 200
    assert decode_image(data, min_side=480).size == (640, 480)
    png = encode(smooth_photo(960, 1280), "PNG")
    assert decode_image(png, min_side=100).size == (1280, 960)  # only JPEG has scaled decoding


def test_policy_decode_is_close_to_the_full_decode_and_equal_for_small_images() -> None:
    policy = ResizePolicy(64)
    big = encode(smooth_photo(960, 1280), "JPEG", quality=95)
    scaled = policy.decode(big).astype(np.float64)
    full = policy.apply(decode_image(big)).astype(np.float64)
    assert scaled.shape == (64, 64, 3)
    assert np.abs(scaled - full).mean() < 1.5 and np.abs(scaled - full).max() < 16
    small = encode(smooth_photo(100, 120), "JPEG", quality=95)  # < 2 x 64 shorter side: no scaling
    assert (policy.decode(small) == policy.apply(decode_image(small))).all()


def test_encoded_images_batch_per_policy_and_name_the_broken_one() -> None:
    pngs = [encode(np.full((40, 60, 3), v, np.uint8), "PNG") for v in (10, 200)]
    images = EncodedImages(pngs, ["a.png", "b.png"], max_pixels=10_000)
    batch = images.batch(ResizePolicy(16))
    assert batch.shape == (2, 16, 16, 3) and (batch[0] == 10).all() and (batch[1] == 200).all()
    assert images.batch(ResizePolicy(16)) is batch  # cached: decoded once per policy
    assert images.batch(ResizePolicy(8)).shape == (2, 8, 8, 3)
    broken = EncodedImages([pngs[0], pngs[1][:60]], ["a.png", "b.png"], max_pixels=10_000)
    with pytest.raises(ImageDecodeError) as exc:
        broken.batch(ResizePolicy(16))
    assert exc.value.code == "corrupt_image" and str(exc.value).startswith("b.png: ")
