"""trainer.data: folders of every image kind users have, .npz arrays, skipping, fingerprints."""

from __future__ import annotations

import io
import shutil
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image

from service.contract.imaging import ResizePolicy
from trainer.data import DatasetError, SkippedImagesWarning, load_split, open_dataset

S = 16
RED, BLUE = (230, 20, 20), (20, 20, 230)


def _save(img: Image.Image, path: Path, fmt: str, **kw: object) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    img.save(path, fmt, **kw)


def _halves(w: int, h: int) -> Image.Image:
    """Left half red, right half blue."""
    arr = np.empty((h, w, 3), np.uint8)
    arr[:, : w // 2], arr[:, w // 2 :] = RED, BLUE
    return Image.fromarray(arr)


@pytest.fixture()
def image_tree(tmp_path: Path) -> Path:
    """Class a: JPEG, PNG, WebP, BMP, 2-frame GIF; class b: L, RGBA, CMYK, 16-bit, EXIF-rotated;
    plus a corrupt .jpg, a zero-byte .png and a text file that is not an image."""
    root = tmp_path / "imgs"
    rgb = _halves(24, 20)
    _save(rgb, root / "a/photo.jpg", "JPEG", quality=95)
    _save(rgb, root / "a/photo.png", "PNG")
    _save(rgb, root / "a/photo.webp", "WEBP", lossless=True)
    _save(rgb, root / "a/photo.bmp", "BMP")
    frames = [Image.new("RGB", (20, 20), RED), Image.new("RGB", (20, 20), BLUE)]
    frames[0].save(root / "a/anim.gif", "GIF", save_all=True, append_images=frames[1:])
    _save(Image.new("L", (20, 30), 77), root / "b/gray.png", "PNG")
    _save(Image.new("RGBA", (20, 20), (0, 0, 0, 0)), root / "b/clear.png", "PNG")
    _save(Image.new("CMYK", (20, 20), (0, 255, 255, 0)), root / "b/cmyk.jpg", "JPEG", quality=95)
    _save(Image.fromarray(np.full((20, 20), 32768, np.uint16)), root / "b/deep.png", "PNG")
    exif = Image.Exif()
    exif[0x0112] = 6  # orientation: rotate 90 degrees clockwise to display
    _save(_halves(40, 20), root / "b/rotated.jpg", "JPEG", quality=95, exif=exif.tobytes())
    (root / "a/corrupt.jpg").write_bytes(b"\xff\xd8 this is not a jpeg" * 10)
    (root / "b/empty.png").write_bytes(b"")
    (root / "b/notes.txt").write_text("not an image")
    return root


def _pixels(data, name: str) -> np.ndarray:
    index = [p.name for p in data.files].index(name)
    image, _ = data[index]
    return image.permute(1, 2, 0).numpy().astype(int)  # [S, S, 3]


def test_folder_decodes_every_kind_and_skips_unreadable(image_tree: Path) -> None:
    with pytest.warns(
        SkippedImagesWarning, match=r"skipped 2 .*corrupt\.jpg.*empty\.png|skipped 2 .*empty\.png.*corrupt\.jpg"
    ):
        data = open_dataset(image_tree, S)
    assert len(data) == data.num_images == 10
    assert data.skipped == 2
    assert {(s.path, s.code) for s in data.skipped_files} == {
        ("a/corrupt.jpg", "unsupported_format"),
        ("b/empty.png", "empty_image"),
    }
    assert data.classes == ["a", "b"]
    assert data.labels.dtype == np.int64
    assert [data.label(i) for i in range(10)] == [0] * 5 + [1] * 5
    for i in range(len(data)):
        image, label = data[i]
        assert image.dtype == torch.uint8 and image.shape == (3, S, S) and label == data.labels[i]

    anim = _pixels(data, "anim.gif")  # first frame, not the blue second one
    assert (np.abs(anim - RED) <= 3).all()
    assert (_pixels(data, "clear.png") == 255).all()  # transparent -> composited on white
    gray = _pixels(data, "gray.png")
    assert (gray == 77).all()
    deep = _pixels(data, "deep.png")  # 32768 / 65535 of the 16-bit range -> 128 of 8 bits
    assert (deep == 128).all()
    cmyk = _pixels(data, "cmyk.jpg")  # C=0, M=Y=255 is red
    assert (cmyk[..., 0] > 200).all() and (cmyk[..., 1:] < 60).all()
    # Stored landscape (red left, blue right), displayed portrait: red on top, blue below.
    rotated = _pixels(data, "rotated.jpg")
    assert rotated[1, S // 2, 0] > 180 and rotated[1, S // 2, 2] < 80
    assert rotated[S - 2, S // 2, 2] > 180 and rotated[S - 2, S // 2, 0] < 80
    # The lossless formats agree exactly with the server's decode + resize policy.
    png = _pixels(data, "photo.png")
    assert (png == ResizePolicy(S).apply(_halves(24, 20))).all()
    assert (_pixels(data, "photo.webp") == png).all() and (_pixels(data, "photo.bmp") == png).all()


def test_truncated_pixels_are_replaced_and_counted(tmp_path: Path) -> None:
    """A header that parses but pixels that do not: caught on decode, never fatal."""
    buf = io.BytesIO()
    Image.fromarray(np.random.default_rng(0).integers(0, 255, (64, 64, 3), np.uint8)).save(buf, "PNG")
    (tmp_path / "0_truncated.png").write_bytes(buf.getvalue()[: len(buf.getvalue()) // 2])
    _save(Image.new("RGB", (20, 20), BLUE), tmp_path / "1_good.png", "PNG")
    data = open_dataset(tmp_path, S)
    assert len(data) == 2 and data.skipped == 0 and data.labels is None
    with pytest.warns(SkippedImagesWarning, match="0_truncated.png"):
        image, label = data[0]
    assert label == -1
    assert (image.permute(1, 2, 0).numpy() == BLUE).all()  # the next readable image
    assert data.skipped == 1


def test_evaluation_arrays_drop_images_that_fail_to_decode(tmp_path: Path) -> None:
    buf = io.BytesIO()
    Image.fromarray(np.random.default_rng(0).integers(0, 255, (64, 64, 3), np.uint8)).save(buf, "PNG")
    for split in ("train", "test"):
        _save(Image.new("RGB", (20, 20), RED), tmp_path / split / "red" / "0.png", "PNG")
        _save(Image.new("RGB", (20, 20), BLUE), tmp_path / split / "blue" / "0.png", "PNG")
    (tmp_path / "test" / "blue" / "1_truncated.png").write_bytes(buf.getvalue()[: len(buf.getvalue()) // 2])
    with pytest.warns(SkippedImagesWarning, match="1_truncated.png"):
        images, labels = load_split(tmp_path, "test", S)
    assert labels.tolist() == [0, 1] and (images[0] == BLUE).all() and (images[1] == RED).all()


def test_folder_errors(tmp_path: Path) -> None:
    with pytest.raises(DatasetError) as err:
        open_dataset(tmp_path / "missing", S)
    assert err.value.code == "dataset_not_found"
    with pytest.raises(DatasetError) as err:
        open_dataset(tmp_path, S)
    assert err.value.code == "no_readable_images"
    (tmp_path / "bad.png").write_bytes(b"\x89PNG garbage")
    with pytest.warns(SkippedImagesWarning), pytest.raises(DatasetError) as err:
        open_dataset(tmp_path, S)
    assert err.value.code == "no_readable_images" and "1 unreadable" in str(err.value)
    (tmp_path / "x.csv").write_text("1,2")
    with pytest.raises(DatasetError) as err:
        open_dataset(tmp_path / "x.csv", S)
    assert err.value.code == "unsupported_dataset"
    with pytest.raises(DatasetError) as err:
        open_dataset(tmp_path, S, split="val")
    assert err.value.code == "unknown_split"


def test_split_folder_layout(tmp_path: Path) -> None:
    for split, n in (("train", 3), ("test", 2)):
        for cls, colour in (("red", RED), ("blue", BLUE)):
            for i in range(n):
                _save(Image.new("RGB", (10, 10), colour), tmp_path / split / cls / f"{i}.png", "PNG")
    train = open_dataset(tmp_path, S)
    test = open_dataset(tmp_path, S, split="test")
    assert (len(train), len(test), train.split, test.split) == (6, 4, "train", "test")
    assert train.classes == test.classes == ["blue", "red"]
    images, labels = load_split(tmp_path, "test", S)
    assert images.shape == (4, S, S, 3) and images.dtype == np.uint8
    assert labels.tolist() == [0, 0, 1, 1]
    assert (images[labels == 0] == BLUE).all() and (images[labels == 1] == RED).all()
    with pytest.raises(DatasetError) as err:
        load_split(tmp_path / "train" / "red", "train", S)  # images with no class folders
    assert err.value.code == "unlabeled_dataset"
    with pytest.raises(DatasetError) as err:
        open_dataset(tmp_path / "train", S, split="test")
    assert err.value.code == "unknown_split"


def test_folder_fingerprint(image_tree: Path, tmp_path: Path) -> None:
    with pytest.warns(SkippedImagesWarning):
        first = open_dataset(image_tree, S).fingerprint
        again = open_dataset(image_tree, 2 * S).fingerprint
        copy = shutil.copytree(image_tree, tmp_path / "copy")  # new place, new mtimes
        copied = open_dataset(copy, S).fingerprint
    assert len(first) == 64 and first == again == copied
    png = copy / "a/photo.png"
    raw = bytearray(png.read_bytes())
    raw[-20] ^= 1  # same size, different content (a skipped-but-readable check would miss it)
    png.write_bytes(bytes(raw))
    with pytest.warns(SkippedImagesWarning):
        edited = open_dataset(copy, S).fingerprint
    shutil.copy(copy / "a/photo.bmp", copy / "a/photo2.bmp")
    with pytest.warns(SkippedImagesWarning):
        added = open_dataset(copy, S).fingerprint
    assert len({first, edited, added}) == 3


def test_folder_decodes_in_dataloader_workers(image_tree: Path) -> None:
    with pytest.warns(SkippedImagesWarning):
        data = open_dataset(image_tree, S)
    loader = torch.utils.data.DataLoader(data, batch_size=10, num_workers=1)
    images, labels = next(iter(loader))
    assert images.shape == (10, 3, S, S) and images.dtype == torch.uint8
    assert torch.equal(images, torch.stack([data[i][0] for i in range(10)]))
    assert labels.tolist() == data.labels.tolist()


@pytest.mark.parametrize("shape", [(5, 8, 8, 1), (4, 7, 11, 3), (3, 12, 10, 4), (6, S, S, 3), (2, 9, 9)])
def test_npz_any_shape(tmp_path: Path, shape: tuple[int, ...]) -> None:
    rng = np.random.default_rng(1)
    x = rng.integers(0, 256, shape, dtype=np.uint8)
    path = tmp_path / "arr.npz"
    np.savez(path, x_train=x, x_test=x[:2], y_train=np.arange(shape[0]) % 2, y_test=np.array([1, 0]))
    data = open_dataset(path, S)
    assert len(data) == shape[0] and data.labels.tolist() == (np.arange(shape[0]) % 2).tolist()
    assert data.classes == ["0", "1"]
    image, label = data[shape[0] - 1]
    assert image.shape == (3, S, S) and image.dtype == torch.uint8 and label == (shape[0] - 1) % 2
    hwc = x[-1] if x.ndim == 4 else x[-1][..., None]
    if hwc.shape == (S, S, 3):
        assert (image.permute(1, 2, 0).numpy() == hwc).all()  # no resize: pixels untouched
    if hwc.shape[2] == 1:
        assert (image[0] == image[1]).all() and (image[1] == image[2]).all()
    assert len(open_dataset(path, S, split="test")) == 2


def test_npz_plain_array_and_errors(tmp_path: Path) -> None:
    x = np.random.default_rng(2).integers(0, 256, (7, 9, 9, 3), dtype=np.uint8)
    np.savez(tmp_path / "plain.npz", images=x, labels=np.arange(7) % 3)
    data = open_dataset(tmp_path / "plain.npz", S)
    assert len(data) == 7 and data.labels.tolist() == [0, 1, 2, 0, 1, 2, 0]
    np.savez(tmp_path / "unlabeled.npz", pics=x)
    assert open_dataset(tmp_path / "unlabeled.npz", S).labels is None

    bad = {
        "split": ("unlabeled.npz", "test", "unknown_split"),
        "float": ("float.npz", "train", "invalid_dataset"),
        "labels": ("mismatch.npz", "train", "invalid_dataset"),
        "not_zip": ("garbage.npz", "train", "invalid_dataset"),
        "two": ("two.npz", "train", "invalid_dataset"),
        "empty": ("empty.npz", "train", "no_readable_images"),
    }
    np.savez(tmp_path / "float.npz", x_train=x.astype(np.float32), y_train=np.zeros(7, np.int64))
    np.savez(tmp_path / "mismatch.npz", x_train=x, y_train=np.zeros(5, np.int64))
    (tmp_path / "garbage.npz").write_bytes(b"PK not really")
    np.savez(tmp_path / "two.npz", a=x, b=x)
    np.savez(tmp_path / "empty.npz", x_train=x[:0])
    for name, split, code in bad.values():
        with pytest.raises(DatasetError) as err:
            open_dataset(tmp_path / name, S, split=split)
        assert err.value.code == code, name


def test_npz_fingerprint(tmp_path: Path) -> None:
    x = np.random.default_rng(3).integers(0, 256, (6, 8, 8, 3), dtype=np.uint8)
    y = np.arange(6)
    np.savez(tmp_path / "a.npz", x_train=x, x_test=x, y_train=y, y_test=y)
    a = open_dataset(tmp_path / "a.npz", S)
    assert a.fingerprint == open_dataset(tmp_path / "a.npz", 2 * S).fingerprint
    x2 = x.copy()
    x2[3, 4, 4, 1] ^= 1
    np.savez(tmp_path / "b.npz", x_train=x2, x_test=x, y_train=y, y_test=y)
    y2 = y.copy()
    y2[0] = 5
    np.savez(tmp_path / "c.npz", x_train=x, x_test=x, y_train=y2, y_test=y)
    prints = {
        a.fingerprint,
        open_dataset(tmp_path / "b.npz", S).fingerprint,
        open_dataset(tmp_path / "c.npz", S).fingerprint,
    }
    assert len(prints) == 3
    assert a.describe() == {
        "fingerprint": a.fingerprint,
        "num_images": 6,
        "skipped": 0,
        "classes": [str(i) for i in range(6)],
    }


def test_real_digits(digits_path: Path) -> None:
    train = open_dataset(digits_path, 32)
    test = open_dataset(digits_path, 32, split="test")
    assert (len(train), len(test)) == (1437, 360)
    assert train.classes == [str(i) for i in range(10)] and set(train.labels.tolist()) == set(range(10))
    image, label = train[0]
    assert image.shape == (3, 32, 32) and label == int(train.labels[0])
    with np.load(digits_path) as raw:
        native = raw["x_train"][0, :, :, 0]
    # An 8x8 digit upscaled 4x: each 4x4 block's mean follows the native pixel.
    blocks = image[0].numpy().astype(float).reshape(8, 4, 8, 4).mean(axis=(1, 3))
    assert np.corrcoef(blocks.ravel(), native.ravel())[0, 1] > 0.95
    assert train.fingerprint != test.fingerprint


def test_real_colour_photos_are_passed_through(photos_path: Path) -> None:
    data = open_dataset(photos_path, 32)
    assert len(data) == 384 and data.classes == ["china", "flower"]
    with np.load(photos_path) as raw:
        x, y = raw["x_train"], raw["y_train"]
    assert (data.images == x).all() and (data.labels == y).all()
    image, _ = data[383]
    assert (image.permute(1, 2, 0).numpy() == x[383]).all()
