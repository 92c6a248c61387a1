"""Image decoding and the resize policy: one implementation for training data, offline
evaluation and the server, so offline metrics and served embeddings see the same pixels.

Decoding normalises whatever a user's folder holds to 8-bit RGB: EXIF orientation applied,
first frame of animations, palette/alpha/CMYK/16-bit/greyscale converted (alpha composited
on white), and decompression bombs refused by pixel count before the pixels are decoded.
"""

from __future__ import annotations

import io
import json
import struct
import warnings
from collections.abc import Iterator, Sequence
from contextlib import contextmanager
from dataclasses import asdict, dataclass
from pathlib import Path

import numpy as np
from PIL import Image, ImageOps, UnidentifiedImageError

DEFAULT_MAX_PIXELS = 64_000_000
# Formats the decoder accepts; anything else PIL might open (EPS, PSD, ...) is refused.
ALLOWED_FORMATS = frozenset({"JPEG", "PNG", "WEBP", "BMP", "GIF", "TIFF", "MPO"})
MEDIA_TYPES = {
    "JPEG": "image/jpeg",
    "MPO": "image/jpeg",
    "PNG": "image/png",
    "WEBP": "image/webp",
    "BMP": "image/bmp",
    "GIF": "image/gif",
    "TIFF": "image/tiff",
}
# Leading bytes of the accepted formats: such data that PIL cannot identify is a broken image
# ("corrupt_image"), not another format ("unsupported_format").
_MAGIC = (b"\x89PNG\r\n\x1a\n", b"\xff\xd8\xff", b"GIF87a", b"GIF89a", b"BM", b"II*\x00", b"MM\x00*")


class ImageDecodeError(ValueError):
    """An image that cannot be used; `code` is stable, `str()` says what to do."""

    def __init__(self, code: str, message: str) -> None:
        super().__init__(message)
        self.code = code


@dataclass(frozen=True)
class ImageHeader:
    """What an image's header says, read without decoding a pixel."""

    format: str  # PIL's name: JPEG, PNG, ...
    width: int
    height: int

    @property
    def pixels(self) -> int:
        return self.width * self.height

    @property
    def media_type(self) -> str:
        return MEDIA_TYPES.get(self.format, "application/octet-stream")


@contextmanager
def _decode_errors(data: bytes) -> Iterator[None]:
    """PIL's many failure types -> ImageDecodeError with a stable code."""
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("error", Image.DecompressionBombWarning)
            yield
    except ImageDecodeError:
        raise
    except (Image.DecompressionBombError, Image.DecompressionBombWarning) as exc:
        raise ImageDecodeError("image_too_large", f"the image is too large to decode safely: {exc}") from exc
    except UnidentifiedImageError as exc:
        if data.startswith(_MAGIC) or (data.startswith(b"RIFF") and data[8:12] == b"WEBP"):
            raise ImageDecodeError(
                "corrupt_image", "the data starts like an image but its header is cut short or broken"
            ) from exc
        raise ImageDecodeError(
            "unsupported_format", "the data is not an image in a known format (JPEG, PNG, WebP, BMP, GIF, TIFF)"
        ) from exc
    except (OSError, SyntaxError, ValueError, EOFError, IndexError, struct.error, MemoryError) as exc:
        raise ImageDecodeError("corrupt_image", f"the image could not be decoded ({exc}); it may be truncated") from exc


def _open_checked(data: bytes, max_pixels: int, allowed_formats: frozenset[str]) -> Image.Image:
    """Open (header only) and refuse what must not be decoded: empty, other formats, bombs."""
    if not data:
        raise ImageDecodeError("empty_image", "the image is empty (0 bytes); send the file's contents")
    img = Image.open(io.BytesIO(data))
    fmt = img.format or "unknown"
    if fmt not in allowed_formats:
        raise ImageDecodeError(
            "unsupported_format",
            f"image format {fmt} is not accepted; send one of {', '.join(sorted(allowed_formats))}",
        )
    width, height = img.size
    if width < 1 or height < 1:
        raise ImageDecodeError("corrupt_image", "the image has no pixels")
    if width * height > max_pixels:
        raise ImageDecodeError(
            "image_too_large", f"the image is {width}x{height} = {width * height} pixels; the limit is {max_pixels}"
        )
    return img


def probe_image(
    data: bytes, *, max_pixels: int = DEFAULT_MAX_PIXELS, allowed_formats: frozenset[str] = ALLOWED_FORMATS
) -> ImageHeader:
    """The header of an encoded image, checked as `decode_image` checks it, no pixel decoded."""
    with _decode_errors(data), _open_checked(data, max_pixels, allowed_formats) as img:
        return ImageHeader(img.format or "unknown", *img.size)


def decode_image(
    data: bytes,
    *,
    max_pixels: int = DEFAULT_MAX_PIXELS,
    allowed_formats: frozenset[str] = ALLOWED_FORMATS,
    min_side: int | None = None,
) -> Image.Image:
    """Bytes of an encoded image -> 8-bit RGB PIL image, upright, first frame.

    `min_side`: a JPEG is decoded at the coarsest DCT scale (1/2, 1/4 or 1/8, libjpeg's
    scaled decoding) that keeps both sides at least `min_side`; a 24 MP photo meant for a
    224-pixel crop then costs 1/64 of its full decode in time and memory.
    """
    with _decode_errors(data):
        img = _open_checked(data, max_pixels, allowed_formats)
        if min_side is not None and img.format == "JPEG":
            img.draft(None, (min_side, min_side))
        img.seek(0)
        img.load()
        return to_rgb(img)


def to_rgb(img: Image.Image) -> Image.Image:
    """Any decoded PIL image -> upright 8-bit RGB (alpha composited on white)."""
    img = ImageOps.exif_transpose(img) or img
    if img.mode in ("I;16", "I;16B", "I;16L", "I;16N", "I"):
        # 16/32-bit greyscale: scale the full range to 8 bits instead of clipping.
        arr = np.asarray(img, dtype=np.float64)
        top = 65535.0 if arr.max(initial=0) > 255 or img.mode.startswith("I;16") else 255.0
        img = Image.fromarray(np.clip(arr / top * 255.0 + 0.5, 0, 255).astype(np.uint8), "L")
    elif img.mode == "F":
        arr = np.asarray(img, dtype=np.float64)
        lo, hi = float(arr.min(initial=0)), float(arr.max(initial=1))
        img = Image.fromarray(((arr - lo) / max(hi - lo, 1e-12) * 255.0).astype(np.uint8), "L")
    if img.mode in ("P", "L", "RGB") and "transparency" in img.info:
        img = img.convert("RGBA")  # palette or colour-key (tRNS) transparency
    elif img.mode == "P":
        img = img.convert("RGB")
    if img.mode in ("RGBA", "LA", "PA", "RGBa", "La"):
        rgba = img.convert("RGBA")
        background = Image.new("RGBA", rgba.size, (255, 255, 255, 255))
        img = Image.alpha_composite(background, rgba)
    return img.convert("RGB") if img.mode != "RGB" else img


def read_image_file(path: str | Path) -> bytes:
    """A file's bytes; ImageDecodeError `unreadable_file` when it cannot be read."""
    try:
        return Path(path).read_bytes()
    except OSError as exc:
        raise ImageDecodeError("unreadable_file", f"cannot read {path}: {exc}") from exc


def load_image_file(path: str | Path, *, max_pixels: int = DEFAULT_MAX_PIXELS) -> Image.Image:
    """A file on disk -> RGB image; raises ImageDecodeError for anything unreadable."""
    return decode_image(read_image_file(path), max_pixels=max_pixels)


@dataclass(frozen=True)
class ResizePolicy:
    """What the server does to a decoded image before batching.

    `shorter_side_center_crop`: resize so the shorter side is `size` (bicubic, antialiased),
    then take the centre `size` x `size` crop. Stored as JSON in the model's metadata.
    """

    size: int
    kind: str = "shorter_side_center_crop"
    resample: str = "bicubic"

    def to_json(self) -> str:
        return json.dumps(asdict(self), sort_keys=True)

    @classmethod
    def from_json(cls, text: str) -> ResizePolicy:
        """The policy a model's metadata names; ValueError for anything this code cannot apply."""
        try:
            data = json.loads(text)
        except (TypeError, ValueError) as exc:
            raise ValueError(f"resize policy is not JSON: {text!r}") from exc
        if not isinstance(data, dict) or set(data) != {"size", "kind", "resample"}:
            raise ValueError(f"unknown resize policy {text!r}: expected keys kind, resample, size")
        if data["kind"] != "shorter_side_center_crop" or data["resample"] != "bicubic":
            raise ValueError(f"unknown resize policy {text!r}")
        size = data["size"]
        if type(size) is not int or not 1 <= size <= 4096:
            raise ValueError(f"resize policy size {size!r} is not an integer in 1..4096")
        return cls(size=size)

    def apply(self, img: Image.Image) -> np.ndarray:
        """RGB image -> uint8 [size, size, 3]."""
        s = self.size
        if img.mode != "RGB":
            img = to_rgb(img)
        w, h = img.size
        if (w, h) != (s, s):
            scale = s / min(w, h)
            nw, nh = max(s, round(w * scale)), max(s, round(h * scale))
            if (nw, nh) != (w, h):
                img = img.resize((nw, nh), Image.Resampling.BICUBIC)
            left, top = (nw - s) // 2, (nh - s) // 2
            img = img.crop((left, top, left + s, top + s))
        return np.asarray(img, dtype=np.uint8).reshape(s, s, 3)

    def decode(self, data: bytes, *, max_pixels: int = DEFAULT_MAX_PIXELS) -> np.ndarray:
        """Encoded bytes -> uint8 [size, size, 3]: the one decode-and-resize path for serving,
        re-embedding and folder datasets. JPEGs decode at a reduced DCT scale that keeps both
        sides >= 2 x size, so the final bicubic step still antialiases (`decode_image`)."""
        return self.apply(decode_image(data, max_pixels=max_pixels, min_side=2 * self.size))

    def apply_array(self, arr: np.ndarray) -> np.ndarray:
        """uint8 [H, W, C] (C = 1, 3 or 4) -> uint8 [size, size, 3]; the path for .npz data."""
        if arr.dtype != np.uint8:
            raise ValueError(f"images must be uint8 0..255, got {arr.dtype}; scale them to 8 bits first")
        if arr.ndim not in (2, 3) or (arr.ndim == 3 and arr.shape[2] not in (1, 3, 4)):
            raise ValueError(f"an image array must be [H, W] or [H, W, C] with C in 1, 3, 4; got {list(arr.shape)}")
        if arr.ndim == 2:
            arr = arr[:, :, None]
        if arr.shape[2] == 1:
            arr = np.repeat(arr, 3, axis=2)
        elif arr.shape[2] == 4:
            return self.apply(to_rgb(Image.fromarray(arr, "RGBA")))
        if arr.shape[:2] == (self.size, self.size):
            return np.ascontiguousarray(arr, dtype=np.uint8)
        return self.apply(Image.fromarray(np.ascontiguousarray(arr, dtype=np.uint8), "RGB"))

    def batch(self, images: list[Image.Image] | np.ndarray) -> np.ndarray:
        """Many images (PIL list, or uint8 [N, H, W, C]) -> uint8 [N, size, size, 3]."""
        apply = self.apply_array if isinstance(images, np.ndarray) else self.apply
        out = np.empty((len(images), self.size, self.size, 3), dtype=np.uint8)
        for i, img in enumerate(images):
            out[i] = apply(img)
        return out


class EncodedImages:
    """A request's encoded images, decoded only when a model asks, one image at a time
    straight into its batch: the decoded pixels of one image are alive at once, never all.

    `batch(policy)` caches per policy, so models sharing a resize policy decode once.
    A decode error names the image (`names[i]: ...`).
    """

    def __init__(self, datas: Sequence[bytes], names: Sequence[str], *, max_pixels: int) -> None:
        self.datas, self.names, self.max_pixels = list(datas), list(names), max_pixels
        self._batches: dict[ResizePolicy, np.ndarray] = {}

    def __len__(self) -> int:
        return len(self.datas)

    def batch(self, policy: ResizePolicy) -> np.ndarray:
        """uint8 [N, size, size, 3] under `policy`; blocking: call it off the event loop."""
        if policy not in self._batches:
            out = np.empty((len(self.datas), policy.size, policy.size, 3), dtype=np.uint8)
            for i, (name, data) in enumerate(zip(self.names, self.datas, strict=True)):
                try:
                    out[i] = policy.decode(data, max_pixels=self.max_pixels)
                except ImageDecodeError as exc:
                    raise ImageDecodeError(exc.code, f"{name}: {exc}") from exc
            self._batches[policy] = out
        return self._batches[policy]
