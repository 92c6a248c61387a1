"""Training and evaluation data: a folder tree of images or an `.npz` of arrays.

Every pixel goes through `service.contract.imaging` (decode, then `ResizePolicy`), the same
code the server runs on a request, so the encoder is trained and evaluated on exactly the
pixels it will be served.

Sources
* Folder: every image file under the root (`.jpg .jpeg .png .webp .bmp .gif .tif .tiff`,
  hidden entries ignored), decoded lazily in `__getitem__` (so DataLoader workers do the
  work). Labels are the first-level subfolder names when every image lies in a subfolder;
  otherwise the set is unlabeled. A root whose only subfolders include `train/` and `test/`
  is a split layout: `split` picks one.
* `.npz`: the layout of ../shared/data (`x_train`, `x_test` uint8 [N, H, W, C], C in
  {1, 3, 4}, `y_train`, `y_test`, `classes`), or any `.npz` holding one uint8 [N, H, W(, C)]
  array with optional 1-D integer labels of length N. Resized once, held in memory.

Two views of the same images:

* evaluation (`image`, `__getitem__`, `to_array`): `ResizePolicy`, the S x S centre crop the
  server applies, so offline metrics see the served pixels;
* training (`training_frames()`): the whole decoded frame, aspect kept, at a bounded working
  size (longer side at most WORKING_SCALE x S, never enlarged), on a fixed canvas with each
  image's own height and width beside it, so that the batched augmentation
  (trainer/transforms.py) cuts its random resized crops from the whole image, as the paper
  does, rather than from the centre square. docs/architecture.md says why a canvas.

Unreadable files (empty, not an image, a format we refuse) are found when the folder is
opened, skipped and counted in `.skipped`, with a warning naming a few. A file whose header
is fine but whose pixels are truncated fails only when decoded: the training frames then
serve a masked slot (a blank canvas flagged not `ok`, which the methods leave out of the
loss), so an epoch keeps its length and no image is served twice; the engine counts these
slots from the batches, whichever loader worker decoded them. Evaluation serves the next
readable image instead and `labeled_arrays` drops the slot.

Fingerprint (sha256, hex): for a folder, over the sorted relative paths, sizes and sha256 of
the content of every readable image, so renaming, editing or adding a file changes it and
copying the folder elsewhere (new mtimes) does not; reading every byte once costs about as
much as one epoch's file reads. For `.npz`, over the dtype, shape and bytes of the chosen
split's images and labels. The resize size is not part of it: it identifies the data.
"""

from __future__ import annotations

import hashlib
import io
import os
import warnings
import zipfile
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch
from PIL import Image, UnidentifiedImageError
from torch.utils.data import Dataset

from service.contract.imaging import (
    ALLOWED_FORMATS,
    DEFAULT_MAX_PIXELS,
    ImageDecodeError,
    ResizePolicy,
    load_image_file,
    read_image_file,
    to_rgb,
)

# Training frames keep the whole image with its longer side at most WORKING_SCALE x S: the
# median crop (about half the area) is then cut at or above S, and the batched bilinear
# resize never shrinks by more than this factor along a side.
WORKING_SCALE = 2
IMAGE_EXTENSIONS = frozenset({".jpg", ".jpeg", ".png", ".webp", ".bmp", ".gif", ".tif", ".tiff"})
SPLITS = ("train", "test")
_WARN_EXAMPLES = 5


class DatasetError(ValueError):
    """A dataset that cannot be used; `code` is stable (the API maps it to a 4xx)."""

    def __init__(self, code: str, message: str) -> None:
        super().__init__(message)
        self.code = code


class SkippedImagesWarning(UserWarning):
    """Some files of a folder could not be read and were left out."""


@dataclass(frozen=True)
class SkippedFile:
    path: str  # relative to the dataset root
    code: str  # ImageDecodeError code
    message: str


class ImageDataset(Dataset):
    """Images as (uint8 tensor [3, S, S], label) pairs; label is -1 for unlabeled sets."""

    path: Path
    split: str | None
    policy: ResizePolicy
    classes: list[str]
    labels: np.ndarray | None  # int64 [N]
    fingerprint: str
    skipped_files: list[SkippedFile]
    failed_on_decode: frozenset[int] | set[int] = frozenset()  # indices whose pixels turned out unreadable here

    @property
    def image_size(self) -> int:
        return self.policy.size

    @property
    def num_images(self) -> int:
        return len(self)

    @property
    def skipped(self) -> int:
        return len(self.skipped_files)

    def label(self, index: int) -> int:
        return -1 if self.labels is None else int(self.labels[index])

    def __len__(self) -> int:
        raise NotImplementedError

    def image(self, index: int) -> np.ndarray:
        """uint8 [S, S, 3] of image `index`."""
        raise NotImplementedError

    def __getitem__(self, index: int) -> tuple[torch.Tensor, int]:
        hwc = self.image(index)  # [S, S, 3]
        return torch.from_numpy(np.ascontiguousarray(hwc.transpose(2, 0, 1))), self.label(index)

    @property
    def canvas(self) -> tuple[int, int]:
        """(height, width) of the training frames' canvas."""
        raise NotImplementedError

    def frame(self, index: int) -> np.ndarray:
        """The whole image `index` at its working size, uint8 [h, w, 3] (h, w within `canvas`);
        raises ImageDecodeError when its pixels cannot be decoded."""
        raise NotImplementedError

    def training_frames(self) -> TrainingFrames:
        """The dataset the training loader reads: whole frames on a canvas, with their sizes."""
        return TrainingFrames(self)

    def to_array(self, num_threads: int = 4) -> np.ndarray:
        """Every image decoded, uint8 [N, S, S, 3] (for evaluation; PIL decodes without the GIL)."""
        out = np.empty((len(self), self.image_size, self.image_size, 3), dtype=np.uint8)
        with ThreadPoolExecutor(max_workers=max(1, num_threads)) as pool:
            for i, img in enumerate(pool.map(self.image, range(len(self)), chunksize=64)):
                out[i] = img
        return out

    def describe(self) -> dict[str, object]:
        """What a run directory records about its data."""
        return {
            "fingerprint": self.fingerprint,
            "num_images": self.num_images,
            "skipped": self.skipped,
            "classes": list(self.classes),
        }


class TrainingFrames(Dataset):
    """Training items of an ImageDataset: (uint8 [3, Hc, Wc] canvas with the frame at its
    top-left, int64 [2] frame (height, width), bool `ok`); a frame that fails to decode is a
    blank canvas with `ok` False, size 1 x 1, and a warning."""

    def __init__(self, images: ImageDataset) -> None:
        self.images = images

    def __len__(self) -> int:
        return len(self.images)

    def __getitem__(self, index: int) -> tuple[torch.Tensor, torch.Tensor, bool]:
        height, width = self.images.canvas
        canvas = torch.zeros(3, height, width, dtype=torch.uint8)  # [3, Hc, Wc]
        try:
            hwc = self.images.frame(index)  # [h, w, 3]
        except ImageDecodeError as exc:
            warnings.warn(
                f"image {index} ({exc.code}: {exc}) could not be decoded; its slot in the batch is masked",
                SkippedImagesWarning,
                stacklevel=2,
            )
            return canvas, torch.tensor([1, 1]), False
        h, w = hwc.shape[:2]
        canvas[:, :h, :w] = torch.from_numpy(np.ascontiguousarray(hwc.transpose(2, 0, 1)))
        return canvas, torch.tensor([h, w]), True


def working_size(width: int, height: int, image_size: int) -> tuple[int, int]:
    """(width, height) of a training frame: the whole image, longer side at most WORKING_SCALE x S."""
    scale = min(1.0, WORKING_SCALE * image_size / max(width, height))
    return max(1, round(width * scale)), max(1, round(height * scale))


def fit_frame(img: Image.Image, image_size: int) -> np.ndarray:
    """RGB image -> uint8 [h, w, 3] at its working size (bicubic, antialiased, as ResizePolicy)."""
    size = working_size(*img.size, image_size)
    if size != img.size:
        img = img.resize(size, Image.Resampling.BICUBIC)
    return np.asarray(img.convert("RGB") if img.mode != "RGB" else img, dtype=np.uint8)


class ArrayDataset(ImageDataset):
    """Images held in memory: `images` uint8 [N, S, S, 3] resized by the policy (evaluation)
    and `frames` uint8 [N, h, w, 3] the whole images at their working size (training); the two
    are one array when the images are S x S already."""

    def __init__(
        self,
        path: Path,
        split: str | None,
        images: np.ndarray,
        labels: np.ndarray | None,
        classes: list[str],
        fingerprint: str,
        policy: ResizePolicy,
        frames: np.ndarray,
    ) -> None:
        self.path, self.split, self.policy = path, split, policy
        self.images, self.frames = images, frames
        self.labels, self.classes, self.fingerprint = labels, classes, fingerprint
        self.skipped_files = []

    def __len__(self) -> int:
        return len(self.images)

    def image(self, index: int) -> np.ndarray:
        return self.images[index]

    @property
    def canvas(self) -> tuple[int, int]:
        return self.frames.shape[1], self.frames.shape[2]

    def frame(self, index: int) -> np.ndarray:
        return self.frames[index]

    def to_array(self, num_threads: int = 4) -> np.ndarray:
        return self.images


class FolderDataset(ImageDataset):
    """Image files under a folder, decoded on access."""

    def __init__(
        self,
        path: Path,
        split: str | None,
        files: list[Path],
        labels: np.ndarray | None,
        classes: list[str],
        fingerprint: str,
        skipped_files: list[SkippedFile],
        policy: ResizePolicy,
        max_side: int,
    ) -> None:
        self.path, self.split, self.policy = path, split, policy
        self.files = files
        side = max(working_size(max_side, max_side, policy.size))  # the largest frame's longer side
        self._canvas = (side, side)  # square: EXIF orientation may turn any frame
        self.labels, self.classes, self.fingerprint = labels, classes, fingerprint
        self.skipped_files = skipped_files
        self.failed_on_decode: set[int] = set()

    def __len__(self) -> int:
        return len(self.files)

    @property
    def skipped(self) -> int:
        return len(self.skipped_files) + len(self.failed_on_decode)

    @property
    def canvas(self) -> tuple[int, int]:
        return self._canvas

    def frame(self, index: int) -> np.ndarray:
        return fit_frame(load_image_file(self.files[index]), self.policy.size)

    def image(self, index: int) -> np.ndarray:
        n = len(self.files)
        for step in range(n):
            i = (index + step) % n
            if i in self.failed_on_decode:
                continue
            try:
                return self.policy.decode(read_image_file(self.files[i]))
            except ImageDecodeError as exc:
                self.failed_on_decode.add(i)
                warnings.warn(
                    f"{self.files[i]}: {exc} ({exc.code}); serving the next readable image instead",
                    SkippedImagesWarning,
                    stacklevel=2,
                )
        raise DatasetError("no_readable_images", f"no image under {self.path} could be decoded")


def open_dataset(path: str | Path, image_size: int, split: str = "train") -> ImageDataset:
    """A folder tree or `.npz` -> dataset of uint8 [3, S, S] images at `image_size`.

    `split` picks `x_<split>` of a split `.npz` or `<split>/` of a folder with train/ and
    test/; other sources have only "train". Raises DatasetError (with a `code`) for a missing
    path, an unknown split, a malformed `.npz` or a folder with no readable image.
    """
    if split not in SPLITS:
        raise DatasetError("unknown_split", f"split must be one of {SPLITS}, not {split!r}")
    policy = ResizePolicy(int(image_size))
    root = Path(path)
    if root.is_dir():
        return _open_folder(root, split, policy)
    if root.is_file():
        if root.suffix.lower() != ".npz":
            raise DatasetError(
                "unsupported_dataset", f"{root} is a file but not an .npz; give a folder of images or an .npz"
            )
        return _open_npz(root, split, policy)
    raise DatasetError("dataset_not_found", f"{root} does not exist")


def open_labeled(path: str | Path, split: str, image_size: int) -> ImageDataset:
    """open_dataset for evaluation: raises DatasetError("unlabeled_dataset") without labels."""
    data = open_dataset(path, image_size, split=split)
    if data.labels is None:
        raise DatasetError(
            "unlabeled_dataset",
            f"{path} ({split}) has no labels; evaluation needs an .npz with y_{split} or one subfolder per class",
        )
    return data


def labeled_arrays(data: ImageDataset) -> tuple[np.ndarray, np.ndarray]:
    """(uint8 [N, S, S, 3], int64 [N]) of a labeled dataset, without the images whose pixels
    failed to decode (their slot would hold a neighbour's image under the wrong label)."""
    images, labels = data.to_array(), data.labels
    if labels is None:
        raise DatasetError("no_labels", f"{data.path} has no labels")
    keep = np.array([i not in data.failed_on_decode for i in range(len(data))], dtype=bool)
    return (images, labels) if keep.all() else (images[keep], labels[keep])


def load_split(path: str | Path, split: str, image_size: int) -> tuple[np.ndarray, np.ndarray]:
    """A labeled split for evaluation: (uint8 [N, S, S, 3], int64 labels [N])."""
    return labeled_arrays(open_labeled(path, split, image_size))


# --- folders ---------------------------------------------------------------------------


def _visible_children(root: Path) -> list[Path]:
    return sorted(p for p in root.iterdir() if not p.name.startswith("."))


def _split_root(root: Path, split: str) -> tuple[Path, str | None]:
    children = _visible_children(root)
    dirs = {p.name for p in children if p.is_dir()}
    loose_images = any(p.is_file() and p.suffix.lower() in IMAGE_EXTENSIONS for p in children)
    if set(SPLITS) <= dirs and not loose_images:
        return root / split, split
    if split != "train":
        raise DatasetError("unknown_split", f"{root} has no {split}/ subfolder beside train/; it has one split only")
    return root, None


def _image_files(root: Path) -> list[Path]:
    found: list[Path] = []
    for dirpath, dirnames, filenames in os.walk(root):
        dirnames[:] = sorted(d for d in dirnames if not d.startswith("."))
        found.extend(
            Path(dirpath, f) for f in filenames if not f.startswith(".") and Path(f).suffix.lower() in IMAGE_EXTENSIONS
        )
    return sorted(found, key=lambda p: p.relative_to(root).as_posix())


def _probe(data: bytes) -> int:
    """Cheap header check (no pixel decoding): the longer side; raises ImageDecodeError as
    decode_image would."""
    if not data:
        raise ImageDecodeError("empty_image", "the file is empty (0 bytes)")
    try:
        with Image.open(io.BytesIO(data)) as img:
            if img.format not in ALLOWED_FORMATS:
                raise ImageDecodeError("unsupported_format", f"image format {img.format} is not accepted")
            w, h = img.size
    except UnidentifiedImageError as exc:
        raise ImageDecodeError("unsupported_format", "not an image in a known format") from exc
    except (OSError, SyntaxError, ValueError, EOFError) as exc:
        raise ImageDecodeError("corrupt_image", f"the header could not be read ({exc})") from exc
    if w < 1 or h < 1 or w * h > DEFAULT_MAX_PIXELS:
        raise ImageDecodeError("image_too_large" if w * h else "corrupt_image", f"unusable size {w}x{h}")
    return max(w, h)


def _open_folder(root: Path, split: str, policy: ResizePolicy) -> FolderDataset:
    base, chosen = _split_root(root, split)
    digest = hashlib.sha256(b"simclr-embed/folder/v1\n")
    files: list[Path] = []
    skipped: list[SkippedFile] = []
    max_side = 1
    for file in _image_files(base):
        rel = file.relative_to(base).as_posix()
        try:
            try:
                data = file.read_bytes()
            except OSError as exc:
                raise ImageDecodeError("unreadable_file", f"cannot read the file: {exc}") from exc
            max_side = max(max_side, _probe(data))
        except ImageDecodeError as exc:
            skipped.append(SkippedFile(rel, exc.code, str(exc)))
            continue
        files.append(file)
        digest.update(f"{rel}\0{len(data)}\0{hashlib.sha256(data).hexdigest()}\n".encode())
    if skipped:
        examples = "; ".join(f"{s.path}: {s.code}" for s in skipped[:_WARN_EXAMPLES])
        more = f" and {len(skipped) - _WARN_EXAMPLES} more" if len(skipped) > _WARN_EXAMPLES else ""
        warnings.warn(
            f"{base}: skipped {len(skipped)} unreadable file(s): {examples}{more}", SkippedImagesWarning, stacklevel=3
        )
    if not files:
        raise DatasetError(
            "no_readable_images",
            f"{base} holds no readable image ({len(skipped)} unreadable); expected "
            f"{', '.join(sorted(IMAGE_EXTENSIONS))} files, optionally one subfolder per class",
        )
    rel_parts = [f.relative_to(base).parts for f in files]
    labels: np.ndarray | None = None
    classes: list[str] = []
    if all(len(parts) > 1 for parts in rel_parts):
        classes = sorted({parts[0] for parts in rel_parts})
        index = {name: i for i, name in enumerate(classes)}
        labels = np.array([index[parts[0]] for parts in rel_parts], dtype=np.int64)
    return FolderDataset(base, chosen, files, labels, classes, digest.hexdigest(), skipped, policy, max_side)


# --- arrays ----------------------------------------------------------------------------


def _read_npz(path: Path) -> dict[str, np.ndarray]:
    try:
        with np.load(path, allow_pickle=False) as npz:
            arrays: dict[str, np.ndarray] = {}
            for key in npz.files:
                try:
                    arrays[key] = npz[key]
                except ValueError:  # an object array (pickled): not data we read
                    continue
            return arrays
    except (OSError, ValueError, zipfile.BadZipFile, EOFError) as exc:
        raise DatasetError("invalid_dataset", f"{path} is not a readable .npz file ({exc})") from exc


def _pick_arrays(path: Path, arrays: dict[str, np.ndarray], split: str) -> tuple[str, np.ndarray, np.ndarray | None]:
    """(split name or None, images, labels or None) following the two accepted layouts."""
    if "x_train" in arrays or "x_test" in arrays:
        key = f"x_{split}"
        if key not in arrays:
            raise DatasetError("unknown_split", f"{path} has no {key} array (it has {sorted(arrays)})")
        return split, arrays[key], arrays.get(f"y_{split}")
    candidates = [k for k, a in arrays.items() if a.dtype == np.uint8 and a.ndim in (3, 4)]
    if len(candidates) != 1:
        raise DatasetError(
            "invalid_dataset",
            f"{path}: expected x_train/x_test arrays or exactly one uint8 [N, H, W, C] array, found {sorted(arrays)}",
        )
    if split != "train":
        raise DatasetError("unknown_split", f"{path} holds one array; it has no {split} split")
    images = arrays[candidates[0]]
    ints = {
        k: a for k, a in arrays.items() if a.ndim == 1 and np.issubdtype(a.dtype, np.integer) and len(a) == len(images)
    }
    named = [k for k in ("y", "labels", "targets", "y_train") if k in ints]
    label_key = named[0] if named else (next(iter(ints)) if len(ints) == 1 else None)
    return "train", images, None if label_key is None else ints[label_key]


def _open_npz(path: Path, split: str, policy: ResizePolicy) -> ArrayDataset:
    arrays = _read_npz(path)
    chosen, images, labels = _pick_arrays(path, arrays, split)
    if images.ndim == 3:
        images = images[..., None]  # [N, H, W] -> [N, H, W, 1]
    if images.dtype != np.uint8 or images.ndim != 4 or images.shape[3] not in (1, 3, 4):
        raise DatasetError(
            "invalid_dataset",
            f"{path}: images must be uint8 [N, H, W, C] with C in 1, 3, 4; got {images.dtype} {images.shape}",
        )
    if min(images.shape[:3]) < 1:
        raise DatasetError("no_readable_images", f"{path}: the {chosen} images array is empty {images.shape}")
    if labels is not None:
        if labels.ndim != 1 or len(labels) != len(images) or not np.issubdtype(labels.dtype, np.integer):
            raise DatasetError(
                "invalid_dataset",
                f"{path}: labels must be integers of shape [{len(images)}], got {labels.dtype} {labels.shape}",
            )
        labels = labels.astype(np.int64)
    classes = [str(c) for c in arrays["classes"].tolist()] if "classes" in arrays else []
    if labels is not None and not classes:
        classes = [str(c) for c in range(int(labels.max()) + 1)]
    digest = hashlib.sha256(b"simclr-embed/npz/v1\n")
    for name, arr in (("images", images), ("labels", labels)):
        if arr is not None:
            digest.update(f"{name}\0{arr.dtype.str}\0{arr.shape}\n".encode())
            digest.update(np.ascontiguousarray(arr).data)
    s = policy.size
    if images.shape[1:] == (s, s, 3):
        resized = frames = np.ascontiguousarray(images)
    else:
        resized, frames = policy.batch(images), _frames(images, s)
    return ArrayDataset(path, chosen, resized, labels, classes, digest.hexdigest(), policy, frames)


def _frames(images: np.ndarray, image_size: int) -> np.ndarray:
    """uint8 [N, H, W, C] (C in 1, 3, 4) -> the whole RGB images at their working size [N, h, w, 3]."""
    n, height, width, channels = images.shape
    w, h = working_size(width, height, image_size)
    if channels == 3 and (h, w) == (height, width):
        return np.ascontiguousarray(images)
    out = np.empty((n, h, w, 3), dtype=np.uint8)
    for i, arr in enumerate(images):
        mode = {1: "L", 3: "RGB", 4: "RGBA"}[channels]
        out[i] = fit_frame(
            to_rgb(Image.fromarray(np.ascontiguousarray(arr.squeeze(2) if channels == 1 else arr), mode)), image_size
        )
    return out
