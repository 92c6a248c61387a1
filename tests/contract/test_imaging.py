"""Decoding user images to 8-bit RGB and the server's resize policy."""

from __future__ import annotations

import io
import struct
import zlib

import numpy as np
import pytest
from PIL import Image, features

from service.contract.imaging import ImageDecodeError, ResizePolicy, decode_image, load_image_file


def _rgb(data: bytes) -> np.ndarray:
    img = decode_image(data)
    assert img.mode == "RGB"
    return np.asarray(img)


# --- formats ----------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("fmt", "params", "max_err"),
    [
        ("PNG", {}, 0),
        ("BMP", {}, 0),
        ("TIFF", {}, 0),
        ("WEBP", {"lossless": True}, 0),
        ("JPEG", {"quality": 95}, 40),
        ("GIF", {}, 80),  # 256-colour palette
    ],
)
def test_formats_decode_to_the_same_photo(photo, encode, fmt, params, max_err):
    if fmt == "WEBP" and not features.check("webp"):
        pytest.skip("this Pillow build has no WebP codec")
    out = _rgb(encode(Image.fromarray(photo), fmt, **params))
    assert out.shape == photo.shape
    err = np.abs(out.astype(int) - photo.astype(int))
    assert err.max() <= max_err and err.mean() <= max(max_err / 10, 0)


def test_animated_gif_gives_first_frame(encode):
    frames = [Image.new("RGB", (8, 6), colour) for colour in ((200, 0, 0), (0, 200, 0), (0, 0, 200))]
    data = encode(frames[0], "GIF", save_all=True, append_images=frames[1:], duration=50, loop=0)
    assert Image.open(io.BytesIO(data)).n_frames == 3
    assert (_rgb(data) == (200, 0, 0)).all()


def test_grayscale_becomes_equal_channels(photo, encode):
    gray = np.asarray(Image.fromarray(photo).convert("L"))
    out = _rgb(encode(Image.fromarray(gray), "PNG"))
    assert (out == gray[:, :, None]).all()


def test_rgba_composited_on_white(encode):
    rgba = np.zeros((4, 5, 4), np.uint8)
    rgba[..., :3] = (10, 100, 250)
    rgba[..., 3] = np.array([0, 64, 128, 200, 255], np.uint8)[None, :]
    out = _rgb(encode(Image.fromarray(rgba, "RGBA"), "PNG")).astype(float)
    alpha = rgba[..., 3:].astype(np.float64) / 255.0
    expected = rgba[..., :3] * alpha + 255.0 * (1.0 - alpha)  # float64 reference
    assert np.abs(out - expected).max() <= 1.0
    assert (out[:, 0] == 255).all() and (out[:, 4] == (10, 100, 250)).all()


def test_palette_with_transparency(encode):
    pal = Image.new("P", (6, 4), 1)
    pal.putpalette([0, 0, 0, 30, 60, 90, 250, 10, 10] + [0] * (253 * 3))
    pal.putpixel((0, 0), 0)
    pal.putpixel((5, 3), 2)
    out = _rgb(encode(pal, "PNG", transparency=0))
    assert (out[0, 0] == 255).all()  # the transparent index becomes white, not black
    assert (out[3, 5] == (250, 10, 10)).all() and (out[1, 1] == (30, 60, 90)).all()


@pytest.mark.parametrize("mode", ["L", "RGB"])
def test_colour_key_transparency(encode, mode):
    """tRNS on greyscale/truecolour PNGs: the keyed colour is transparent -> white."""
    key = 10 if mode == "L" else (1, 2, 3)
    img = Image.new(mode, (4, 3), key)
    img.putpixel((1, 1), 40 if mode == "L" else (40, 50, 60))
    out = _rgb(encode(img, "PNG", transparency=key))
    assert (out[0, 0] == 255).all()
    assert (out[1, 1] == ((40, 40, 40) if mode == "L" else (40, 50, 60))).all()


def test_cmyk_jpeg(encode):
    cmyk = Image.new("CMYK", (16, 16), (0, 255, 0, 0))  # magenta
    cmyk.paste((255, 0, 0, 0), (0, 0, 8, 16))  # cyan left half
    out = _rgb(encode(cmyk, "JPEG", quality=95)).astype(int)
    assert np.abs(out[4, 2] - (0, 255, 255)).max() <= 4
    assert np.abs(out[4, 13] - (255, 0, 255)).max() <= 4


def test_16bit_png_scaled_not_clipped(encode):
    values = np.linspace(0, 65535, 64).round().astype(np.uint16).reshape(8, 8)
    img = Image.fromarray(values)
    assert img.mode == "I;16"
    out = _rgb(encode(img, "PNG"))[..., 0].astype(int)
    expected = np.round(values.astype(np.float64) * 255.0 / 65535.0)  # float64 reference
    assert np.abs(out - expected).max() <= 1
    assert out.max() == 255 and len(np.unique(out)) == 64  # clipping would flatten the top
    dark = Image.fromarray(np.full((4, 4), 1000, np.uint16))  # dim, not stretched per image
    assert (_rgb(encode(dark, "PNG")) == 4).all()


def _upright() -> np.ndarray:
    """A 20x30 image with a red block at top-left and a blue one at bottom-right."""
    img = np.full((20, 30, 3), 128, np.uint8)
    img[:5, :5] = (255, 0, 0)
    img[-5:, -5:] = (0, 0, 255)
    return img


@pytest.mark.parametrize(
    ("orientation", "stored_rot90"),
    [(3, 2), (6, 1), (8, -1)],  # stored = rot90(upright, k): 6 = display after a 90 deg clockwise turn
)
@pytest.mark.parametrize("fmt", ["PNG", "JPEG"])
def test_exif_orientation_applied(encode, orientation, stored_rot90, fmt):
    upright = _upright()
    stored = Image.fromarray(np.ascontiguousarray(np.rot90(upright, stored_rot90)))
    exif = Image.Exif()
    exif[0x0112] = orientation
    out = _rgb(encode(stored, fmt, exif=exif, **({"quality": 95} if fmt == "JPEG" else {}))).astype(int)
    assert out.shape == upright.shape
    tol = 0 if fmt == "PNG" else 40
    assert np.abs(out[1, 1] - (255, 0, 0)).max() <= tol  # red stays top-left
    assert np.abs(out[-2, -2] - (0, 0, 255)).max() <= tol
    assert np.abs(out[1, -2] - 128).max() <= tol and np.abs(out[-2, 1] - 128).max() <= tol


@pytest.mark.filterwarnings("ignore:Corrupt EXIF data")
def test_malformed_exif_is_ignored(encode):
    img = Image.fromarray(_upright())
    data = encode(img, "JPEG", quality=95, exif=b"Exif\x00\x00MM\x00*\x00\x00\x00\x08\x00\xff\xff")
    assert _rgb(data).shape == (20, 30, 3)


# --- refusals -------------------------------------------------------------------------------


def _png_header(width: int, height: int) -> bytes:
    """A tiny PNG that claims `width` x `height` (a decompression bomb's header)."""

    def chunk(kind: bytes, body: bytes) -> bytes:
        return struct.pack(">I", len(body)) + kind + body + struct.pack(">I", zlib.crc32(kind + body))

    ihdr = struct.pack(">IIBBBBB", width, height, 8, 2, 0, 0, 0)
    return (
        b"\x89PNG\r\n\x1a\n" + chunk(b"IHDR", ihdr) + chunk(b"IDAT", zlib.compress(b"\x00" * 64)) + chunk(b"IEND", b"")
    )


@pytest.mark.parametrize(
    ("make", "code"),
    [
        (lambda photo, enc: b"", "empty_image"),
        (lambda photo, enc: b"hello, this is not an image at all", "unsupported_format"),
        (lambda photo, enc: enc(Image.fromarray(photo), "PPM"), "unsupported_format"),  # PIL reads it; we do not
        (lambda photo, enc: enc(Image.fromarray(photo), "PNG")[:300], "corrupt_image"),
        (lambda photo, enc: enc(Image.fromarray(photo), "JPEG")[:400], "corrupt_image"),
        (lambda photo, enc: enc(Image.fromarray(photo), "PNG")[:30], "corrupt_image"),
        (lambda photo, enc: _png_header(100_000, 100_000), "image_too_large"),  # PIL's own bomb error
        (lambda photo, enc: _png_header(10_000, 9_500), "image_too_large"),  # PIL's bomb warning
        (lambda photo, enc: _png_header(9_000, 8_000), "image_too_large"),  # over our 64 MP limit
    ],
    ids=[
        "empty",
        "text",
        "ppm",
        "truncated-png",
        "truncated-jpeg",
        "header-only",
        "bomb-huge",
        "bomb-warn",
        "over-limit",
    ],
)
def test_bad_images_get_the_right_code(photo, encode, make, code):
    data = make(photo, encode)
    with pytest.raises(ImageDecodeError) as err:
        decode_image(data)
    assert err.value.code == code and str(err.value)
    assert len(data) < 20_000


def test_pixel_limit_is_a_parameter(photo, encode):
    data = encode(Image.fromarray(photo), "PNG")
    with pytest.raises(ImageDecodeError, match="40x56|56x40") as err:
        decode_image(data, max_pixels=1000)
    assert err.value.code == "image_too_large"
    assert decode_image(data, max_pixels=40 * 56).size == (56, 40)


def test_load_image_file(tmp_path, photo, encode):
    (tmp_path / "a.png").write_bytes(encode(Image.fromarray(photo), "PNG"))
    assert (np.asarray(load_image_file(tmp_path / "a.png")) == photo).all()
    with pytest.raises(ImageDecodeError) as err:
        load_image_file(tmp_path / "missing.png")
    assert err.value.code == "unreadable_file"


# --- resize policy ----------------------------------------------------------------------------


def test_crop_without_resize_is_exact_and_centred():
    """Shorter side already S: a pure crop whose offset is the float64 centre, floored."""
    rng = np.random.default_rng(0)
    for h, w in ((32, 50), (32, 51), (50, 32), (51, 32), (32, 33)):
        arr = rng.integers(0, 256, (h, w, 3), dtype=np.uint8)
        out = ResizePolicy(32).apply(Image.fromarray(arr))
        top, left = int(np.floor((h - 32) / 2.0)), int(np.floor((w - 32) / 2.0))
        assert (out == arr[top : top + 32, left : left + 32]).all(), (h, w)


@pytest.mark.parametrize(
    ("w", "h", "s"),
    [(200, 100, 50), (100, 200, 50), (101, 64, 32), (64, 101, 32), (33, 20, 64), (20, 33, 64), (90, 90, 32)],
)
def test_resize_crop_geometry_against_float64_reference(w, h, s):
    """On linear ramps (which bicubic reproduces), every output pixel must sit where the ideal
    'shorter side to S, centre crop' map puts it: x_src = (w-1)/2 + (j + 1/2 - S/2) / scale."""
    xs, ys = np.meshgrid(np.arange(w, dtype=np.float64), np.arange(h, dtype=np.float64))
    ramp_x, ramp_y = xs * 255.0 / (w - 1), ys * 255.0 / (h - 1)
    arr = np.stack([ramp_x, ramp_y, np.full_like(ramp_x, 77)], axis=2).round().astype(np.uint8)
    out = ResizePolicy(s).apply(Image.fromarray(arr)).astype(np.float64)  # [s, s, 3]
    assert out.shape == (s, s, 3)
    scale = s / min(w, h)
    j = np.arange(s, dtype=np.float64)
    ideal_x = ((w - 1) / 2 + (j + 0.5 - s / 2) / scale) * 255.0 / (w - 1)  # R along a row
    ideal_y = ((h - 1) / 2 + (j + 0.5 - s / 2) / scale) * 255.0 / (h - 1)  # G along a column
    border = int(np.ceil(2 * max(scale, 1.0))) + 1  # bicubic support reaches past the edge
    inner = slice(border, s - border)
    got_x, got_y = out[inner, inner, 0].mean(axis=0), out[inner, inner, 1].mean(axis=1)
    per_px_x, per_px_y = 255.0 / (w - 1) / scale, 255.0 / (h - 1) / scale  # levels per output px
    # centring: within half a pixel of crop rounding plus a quarter of size rounding
    assert abs((got_x - ideal_x[inner]).mean() / per_px_x) <= 0.76
    assert abs((got_y - ideal_y[inner]).mean() / per_px_y) <= 0.76
    # scale: the ramp's slope across the output is the ideal one, within the rounding of the
    # longer side to whole pixels (half a pixel of it) and a little resampling error
    rel = 0.5 / (max(w, h) * scale) + 0.005
    assert np.polyfit(j[inner], got_x, 1)[0] == pytest.approx(per_px_x, rel=rel)
    assert np.polyfit(j[inner], got_y, 1)[0] == pytest.approx(per_px_y, rel=rel)
    assert np.abs(out[..., 2] - 77).max() <= 1


def test_apply_array_channels_and_dtype(photos):
    policy = ResizePolicy(32)
    assert (policy.apply_array(photos[0]) == photos[0]).all()
    gray = photos[0, :, :, 0]
    assert (policy.apply_array(gray) == gray[:, :, None]).all()
    assert (policy.apply_array(gray[:, :, None]) == gray[:, :, None]).all()
    rgba = np.concatenate([photos[0], np.zeros((32, 32, 1), np.uint8)], axis=2)
    assert (policy.apply_array(rgba) == 255).all()  # fully transparent -> white
    with pytest.raises(ValueError, match="uint8"):
        policy.apply_array(photos[0].astype(np.float32) / 255)
    with pytest.raises(ValueError, match="C in 1, 3, 4"):
        policy.apply_array(np.zeros((32, 32, 2), np.uint8))


def test_batch_from_pil_and_arrays(photos):
    policy = ResizePolicy(48)
    from_arrays = policy.batch(photos[:5])
    from_pil = policy.batch([Image.fromarray(a) for a in photos[:5]])
    assert from_arrays.shape == (5, 48, 48, 3) and from_arrays.dtype == np.uint8
    assert (from_arrays == from_pil).all()
    assert (policy.apply(Image.fromarray(photos[0]).convert("RGBA")) == from_arrays[0]).all()


@pytest.mark.parametrize("size", [1, 32, 224, 4096])
def test_policy_json_round_trip(size):
    policy = ResizePolicy(size)
    assert ResizePolicy.from_json(policy.to_json()) == policy


@pytest.mark.parametrize(
    "text",
    [
        '{"kind": "stretch", "resample": "bicubic", "size": 32}',
        '{"kind": "shorter_side_center_crop", "resample": "bilinear", "size": 32}',
        '{"kind": "shorter_side_center_crop", "resample": "bicubic", "size": 32, "pad": 1}',
        '{"kind": "shorter_side_center_crop", "resample": "bicubic"}',
        '{"kind": "shorter_side_center_crop", "resample": "bicubic", "size": 0}',
        '{"kind": "shorter_side_center_crop", "resample": "bicubic", "size": 5000}',
        '{"kind": "shorter_side_center_crop", "resample": "bicubic", "size": "32"}',
        '{"kind": "shorter_side_center_crop", "resample": "bicubic", "size": 32.5}',
        '{"kind": "shorter_side_center_crop", "resample": "bicubic", "size": true}',
        "[32]",
        "not json",
        "",
    ],
)
def test_unknown_policies_rejected(text):
    with pytest.raises(ValueError):
        ResizePolicy.from_json(text)
