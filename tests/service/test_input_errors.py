"""Everything a client can get wrong gets a documented 4xx (or a correct 200), never a 500,
and the server keeps answering. Codes: the table in service/api/deps.py."""

from __future__ import annotations

import base64
import io
import struct
import zlib
from collections.abc import Callable, Iterator
from pathlib import Path

import httpx
import numpy as np
import pytest
from fastapi.testclient import TestClient
from PIL import Image

from service.app import create_app
from tests.service.conftest import MODEL_A, direct_ort, live_server, make_settings, multipart, parse_vectors, png

LIMIT = 256 * 1024


@pytest.fixture
def strict(data_dir: Path) -> Iterator[TestClient]:
    settings = make_settings(data_dir, max_upload_bytes=LIMIT, max_image_pixels=1_000_000, max_images_per_request=8)
    with TestClient(create_app(settings), raise_server_exceptions=False) as client:
        yield client


def png_bomb(width: int = 100_000, height: int = 100_000) -> bytes:
    """A valid PNG header announcing width x height greyscale pixels, with a tiny payload."""

    def chunk(kind: bytes, data: bytes) -> bytes:
        return struct.pack(">I", len(data)) + kind + data + struct.pack(">I", zlib.crc32(kind + data))

    ihdr = struct.pack(">IIBBBBB", width, height, 8, 0, 0, 0, 0)
    return b"\x89PNG\r\n\x1a\n" + chunk(b"IHDR", ihdr) + chunk(b"IDAT", zlib.compress(b"\0" * 64)) + chunk(b"IEND", b"")


def noise(h: int, w: int, seed: int = 0) -> np.ndarray:
    return np.random.default_rng(seed).integers(0, 256, (h, w, 3), dtype=np.uint8)


BAD_IMAGES: dict[str, tuple[Callable[[], bytes], int, str]] = {
    "truncated png": (lambda: png(noise(40, 40))[:300], 422, "corrupt_image"),
    "truncated jpeg": (lambda: png(noise(40, 40), format="JPEG")[:200], 422, "corrupt_image"),
    "empty": (lambda: b"", 422, "empty_image"),
    "text": (lambda: b"this is not an image at all", 415, "unsupported_format"),
    "pdf": (lambda: b"%PDF-1.4\n1 0 obj<<>>endobj\n", 415, "unsupported_format"),
    "decompression bomb": (png_bomb, 413, "image_too_large"),
    "over the pixel limit": (lambda: png(np.zeros((1001, 1000, 3), np.uint8)), 413, "image_too_large"),
}


@pytest.mark.parametrize("name", list(BAD_IMAGES))
def test_bad_images(strict: TestClient, photos: np.ndarray, name: str) -> None:
    make, status, code = BAD_IMAGES[name]
    r = strict.post("/embed", files=multipart([png(photos[0]), make()]))
    assert r.status_code == status, r.text
    error = r.json()["error"]
    assert error["code"] == code and error["message"].startswith("img1.png")
    as_json = strict.post("/embed", json={"images": [base64.b64encode(make()).decode()]})
    assert (as_json.status_code, as_json.json()["error"]["code"]) == (status, code)
    assert strict.post("/embed", files=multipart([png(photos[0])])).status_code == 200


BAD_REQUESTS: dict[str, tuple[dict[str, object], int, str]] = {
    "malformed json": (
        {"content": b'{"images": [', "headers": {"Content-Type": "application/json"}},
        422,
        "malformed_json",
    ),
    "json not an object": ({"json": ["abc"]}, 422, "invalid_request"),
    "images not a list": ({"json": {"images": "abc"}}, 422, "invalid_request"),
    "image not a string": ({"json": {"images": [3]}}, 422, "invalid_request"),
    "bad base64": ({"json": {"images": ["***"]}}, 422, "invalid_base64"),
    "no images": ({"json": {"images": []}}, 422, "no_images"),
    "wrong content type": (
        {"content": b"abc", "headers": {"Content-Type": "text/plain"}},
        415,
        "unsupported_media_type",
    ),
    "no content type": ({"content": b"abc"}, 415, "unsupported_media_type"),
    # a part never closed by its boundary is dropped by the parser: nothing usable arrived
    "unterminated multipart": (
        {
            "content": b'--xx\r\nContent-Disposition: form-data; name="files"; filename="a"\r\n\r\nabc',
            "headers": {"Content-Type": "multipart/form-data; boundary=xx"},
        },
        422,
        "no_images",
    ),
    "multipart without boundary": (
        {"content": b"abc", "headers": {"Content-Type": "multipart/form-data"}},
        422,
        "malformed_multipart",
    ),
    "field instead of file": ({"data": {"files": "abc"}, "files": {"other": ("a", b"x")}}, 422, "invalid_request"),
    "too many images": ({"files": multipart([png(noise(8, 8, i)) for i in range(9)])}, 413, "too_many_images"),
    "declared length over the limit": (
        {"content": b"x" * (LIMIT + 1), "headers": {"Content-Type": "application/json"}},
        413,
        "payload_too_large",
    ),
    "streamed body over the limit": (
        {"content": iter([b"x" * 65536] * 5), "headers": {"Content-Type": "application/json"}},
        413,
        "payload_too_large",
    ),
}


@pytest.mark.parametrize("name", list(BAD_REQUESTS))
def test_bad_requests(strict: TestClient, photos: np.ndarray, name: str) -> None:
    kwargs, status, code = BAD_REQUESTS[name]
    r = strict.post("/embed", **kwargs)
    assert (r.status_code, r.json()["error"]["code"]) == (status, code), r.text
    assert strict.post("/embed", files=multipart([png(photos[0])])).status_code == 200


def _embed_one(client: TestClient, data: bytes) -> np.ndarray:
    r = client.post("/embed", files=multipart([data]))
    assert r.status_code == 200, r.text
    return parse_vectors(r)[0]


def _encode(img: Image.Image, **save: object) -> bytes:
    buf = io.BytesIO()
    img.save(buf, **save)
    return buf.getvalue()


def test_unusual_but_valid_images_are_embedded_correctly(
    client: TestClient, data_dir: Path, photos: np.ndarray
) -> None:
    base = photos[5]

    def expected(rgb: np.ndarray) -> np.ndarray:
        return direct_ort(data_dir, MODEL_A, [Image.fromarray(rgb)])[0]

    # RGBA fully transparent: composited on white
    rgba = np.dstack([base, np.zeros(base.shape[:2], np.uint8)])
    np.testing.assert_allclose(_embed_one(client, png(rgba)), expected(np.full_like(base, 255)), atol=1e-6)
    # EXIF orientation 6 (rotate 90 degrees clockwise to display), lossless PNG
    exif = Image.Exif()
    exif[0x0112] = 6
    tall = np.ascontiguousarray(np.concatenate([base, base[::-1]], axis=0))  # [64, 32, 3]
    rotated = _embed_one(client, _encode(Image.fromarray(tall), format="PNG", exif=exif))
    np.testing.assert_allclose(rotated, expected(np.rot90(tall, k=-1)), atol=1e-6)
    # animated GIF: the first frame
    frames = [Image.fromarray(base).quantize(64), Image.fromarray(photos[6]).quantize(64)]
    animated = _encode(frames[0], format="GIF", save_all=True, append_images=frames[1:], duration=100, loop=0)
    first = np.asarray(frames[0].convert("RGB"))
    np.testing.assert_allclose(_embed_one(client, animated), expected(first), atol=1e-6)
    # CMYK JPEG: converted to RGB the way PIL does
    cmyk = _encode(Image.fromarray(base).convert("CMYK"), format="JPEG", quality=95)
    np.testing.assert_allclose(
        _embed_one(client, cmyk), expected(np.asarray(Image.open(io.BytesIO(cmyk)).convert("RGB"))), atol=1e-6
    )
    # 16-bit greyscale PNG: full range scaled to 8 bits, replicated to 3 channels
    grey16 = (np.arange(32 * 32, dtype=np.uint32).reshape(32, 32) * 64).astype(np.uint16)
    grey8 = np.clip(grey16 / 65535.0 * 255.0 + 0.5, 0, 255).astype(np.uint8)
    np.testing.assert_allclose(
        _embed_one(client, _encode(Image.fromarray(grey16), format="PNG")), expected(np.dstack([grey8] * 3)), atol=1e-6
    )


@pytest.mark.integration
def test_real_server_survives_bad_input(data_dir: Path, photos: np.ndarray) -> None:
    """Over real HTTP: a chunked body over the limit and a bomb get 4xx, the process stays up."""
    with (
        live_server(data_dir, SIMCLR_EMBED_MAX_UPLOAD_BYTES=str(LIMIT)) as server,
        httpx.Client(base_url=server.url, timeout=30) as http,
    ):

        def chunks() -> Iterator[bytes]:
            for _ in range(64):
                yield b"x" * 65536

        big = http.post("/embed", content=chunks(), headers={"Content-Type": "application/json"})
        assert big.status_code == 413 and big.json()["error"]["code"] == "payload_too_large"
        bomb = http.post("/embed", files=multipart([png_bomb()]))
        assert bomb.status_code == 413 and bomb.json()["error"]["code"] == "image_too_large"
        ok = http.post("/embed", files=multipart([png(photos[0])]))
        assert ok.status_code == 200 and ok.json()["model_id"] == MODEL_A
        assert server.proc.poll() is None
