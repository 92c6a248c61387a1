"""A corpus of hostile images, generated here, sent to every route that takes images.

Broken data (truncated, empty, wrong magic, bad CRC), decompression bombs (huge declared
dimensions in tiny files: PNG, GIF logical screen, JPEG, TIFF, BMP), hostile metadata
(thousands of tEXt chunks, a zTXt bomb, 200 KB iTXt, a JPEG with a maximal EXIF and more APP
segments, an EXIF IFD that points at itself) and valid oddities (palette + tRNS, palette + per-entry alpha, LA, 1-bit,
animated GIF/WebP/APNG, 16-bit PNG, CMYK JPEG, TIFF with LZW/PackBits/Deflate/Group 4, EXIF
rotation). Each must get its documented 4xx (service/api/deps.py) or a correct 200, never a
5xx, through /embed (multipart and JSON base64), /items and /search (multipart), and the server
must answer /healthz after every image. The subprocess variant sends the corpus to uvicorn and
checks the process is still alive.
"""

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
from service.contract.imaging import decode_image
from tests.hardening.conftest import LIMITS, hardened_settings, noise, seed_items
from tests.service.conftest import MODEL_A, direct_ort, live_server

OK = "ok"  # a valid image: 200 with the right vector
BROKEN = {(422, "corrupt_image"), (415, "unsupported_format")}  # either is a correct answer for garbage
BOMB = {(413, "image_too_large")}


def _save(img: Image.Image, fmt: str, **params: object) -> bytes:
    buf = io.BytesIO()
    img.save(buf, format=fmt, **params)
    return buf.getvalue()


def _rgb(size: int = 24, seed: int = 0) -> Image.Image:
    return Image.fromarray(noise(size, size, seed))


def _chunk(kind: bytes, data: bytes) -> bytes:
    return struct.pack(">I", len(data)) + kind + data + struct.pack(">I", zlib.crc32(kind + data))


def _png_with(chunks: list[bytes], width: int = 8, height: int = 8) -> bytes:
    """A valid 8x8 greyscale PNG with `chunks` inserted before its pixel data."""
    ihdr = _chunk(b"IHDR", struct.pack(">IIBBBBB", width, height, 8, 0, 0, 0, 0))
    idat = _chunk(b"IDAT", zlib.compress(b"".join(b"\0" + bytes(range(width)) for _ in range(height))))
    return b"\x89PNG\r\n\x1a\n" + ihdr + b"".join(chunks) + idat + _chunk(b"IEND", b"")


def png_bomb() -> bytes:
    """100000 x 100000 declared; 70-odd bytes."""
    ihdr = _chunk(b"IHDR", struct.pack(">IIBBBBB", 100_000, 100_000, 8, 0, 0, 0, 0))
    return b"\x89PNG\r\n\x1a\n" + ihdr + _chunk(b"IDAT", zlib.compress(b"\0" * 64)) + _chunk(b"IEND", b"")


def gif_bomb() -> bytes:
    """A 65535 x 65535 logical screen holding a 1x1 frame."""
    frame = _save(Image.new("P", (1, 1)), "GIF")
    return frame[:6] + struct.pack("<HH", 65535, 65535) + frame[10:]


def jpeg_bomb() -> bytes:
    """A real JPEG whose SOF0 says 65000 x 65000."""
    data = bytearray(_save(_rgb(16), "JPEG"))
    sof = data.index(b"\xff\xc0")
    data[sof + 5 : sof + 9] = struct.pack(">HH", 65000, 65000)
    return bytes(data)


def tiff_bomb() -> bytes:
    data = bytearray(_save(Image.new("L", (8, 8)), "TIFF"))
    ifd = struct.unpack("<I", data[4:8])[0]
    for n in range(struct.unpack("<H", data[ifd : ifd + 2])[0]):
        entry = ifd + 2 + 12 * n
        tag, kind = struct.unpack("<HH", data[entry : entry + 4])
        if tag in (256, 257):  # ImageWidth, ImageLength
            fmt = "<H" if kind == 3 else "<I"
            data[entry + 8 : entry + 8 + struct.calcsize(fmt)] = struct.pack(fmt, 60000)
    return bytes(data)


def bmp_bomb() -> bytes:
    data = bytearray(_save(Image.new("RGB", (4, 4)), "BMP"))
    data[18:26] = struct.pack("<ii", 70000, 70000)
    return bytes(data)


def png_many_text() -> bytes:
    return _png_with([_chunk(b"tEXt", b"key%d\0value" % i) for i in range(5000)])


def png_ztxt_bomb() -> bytes:
    """One zTXt chunk of ~50 KB that inflates to 50 MB."""
    return _png_with([_chunk(b"zTXt", b"bomb\0\0" + zlib.compress(b"A" * 50_000_000, 9))])


def png_huge_itxt() -> bytes:
    return _png_with([_chunk(b"iTXt", b"big\0\0\0en\0big\0" + b"x" * 200_000)])


def jpeg_huge_exif_and_app_segments() -> bytes:
    """A maximal EXIF (about 64 KB of UserComment) and 3 more 60 KB APP segments."""
    exif = Image.Exif()
    exif[0x9286] = b"ASCII\0\0\0" + b"c" * 65000  # UserComment
    data = _save(_rgb(16), "JPEG", exif=exif.tobytes())
    extra = b"".join(b"\xff" + bytes([0xE2 + i]) + struct.pack(">H", 60002) + b"\0" * 60000 for i in range(3))
    return data[:2] + extra + data[2:]


def jpeg_exif_ifd_loop() -> bytes:
    """EXIF whose Exif sub-IFD pointer (0x8769) points back at IFD0: a cycle."""
    ifd = struct.pack("<H", 2) + struct.pack("<HHII", 0x0112, 3, 1, 6) + struct.pack("<HHII", 0x8769, 4, 1, 8)
    tiff = b"II*\x00" + struct.pack("<I", 8) + ifd + struct.pack("<I", 8)  # next IFD -> itself too
    return _save(_rgb(16), "JPEG", exif=b"Exif\x00\x00" + tiff)


def png_bad_crc() -> bytes:
    data = bytearray(_save(_rgb(16), "PNG"))
    data[29] ^= 0xFF  # IHDR's CRC
    return bytes(data)


def animated(fmt: str) -> bytes:
    frames = [_rgb(24, s) for s in range(3)]
    if fmt == "GIF":
        frames = [f.quantize(64) for f in frames]
    return _save(frames[0], fmt, save_all=True, append_images=frames[1:], duration=50, loop=0)


def exif_rotated_jpeg() -> bytes:
    exif = Image.Exif()
    exif[0x0112] = 8
    return _save(Image.fromarray(noise(16, 40, 3)), "JPEG", exif=exif.tobytes(), quality=95)


def palette_with_transparency() -> bytes:
    img = _rgb(24).quantize(16)
    return _save(img, "PNG", transparency=3)


def tiff(compression: str, mode: str = "RGB") -> Callable[[], bytes]:
    return lambda: _save(_rgb(24).convert(mode), "TIFF", compression=compression)


CORPUS: dict[str, tuple[Callable[[], bytes], str | set[tuple[int, str]]]] = {
    # broken
    "zero bytes": (lambda: b"", {(422, "empty_image")}),
    "truncated png": (lambda: _save(_rgb(), "PNG")[:200], BROKEN),
    "truncated jpeg": (lambda: _save(_rgb(), "JPEG")[:300], BROKEN),
    "truncated gif": (lambda: animated("GIF")[:100], BROKEN),
    "header only png": (lambda: _save(_rgb(), "PNG")[:8], BROKEN),
    "png magic, jpeg body": (lambda: b"\x89PNG\r\n\x1a\n" + _save(_rgb(), "JPEG")[2:], BROKEN),
    "jpeg magic, random body": (lambda: b"\xff\xd8\xff" + bytes(noise(32, 32).tobytes()), BROKEN),
    "random bytes": (lambda: noise(64, 64).tobytes(), BROKEN),
    "png with bad crc": (png_bad_crc, BROKEN | {(200, OK)}),
    "svg (not accepted)": (
        lambda: b'<svg xmlns="http://www.w3.org/2000/svg" width="9" height="9"/>',
        {(415, "unsupported_format")},
    ),
    "ico (not accepted)": (lambda: _save(_rgb(16), "ICO"), {(415, "unsupported_format")}),
    # decompression bombs
    "png 100000x100000": (png_bomb, BOMB),
    "gif 65535x65535 screen": (gif_bomb, BOMB),
    "jpeg 65000x65000": (jpeg_bomb, BOMB),
    "tiff 60000x60000": (tiff_bomb, BOMB),
    "bmp 70000x70000": (bmp_bomb, BOMB),
    # hostile metadata
    "png 5000 tEXt chunks": (png_many_text, OK),
    "png zTXt bomb": (png_ztxt_bomb, {(422, "corrupt_image"), (200, OK)}),  # PIL refuses text over 1 MB
    "png 200 KB iTXt": (png_huge_itxt, OK),
    "jpeg huge exif + APP segments": (jpeg_huge_exif_and_app_segments, OK),
    "jpeg exif ifd loop": (jpeg_exif_ifd_loop, OK),
    # valid oddities
    "palette + tRNS": (palette_with_transparency, OK),
    "LA": (lambda: _save(_rgb().convert("LA"), "PNG"), OK),
    "palette + alpha table": (lambda: _save(_rgb().quantize(16), "PNG", transparency=bytes(range(0, 256, 16))), OK),
    "1-bit": (lambda: _save(_rgb().convert("1"), "PNG"), OK),
    "16-bit png": (lambda: _save(Image.fromarray(noise(24, 24, 5, 1)[..., 0].astype(np.uint16) * 257), "PNG"), OK),
    "cmyk jpeg": (lambda: _save(_rgb().convert("CMYK"), "JPEG"), OK),
    "animated gif": (lambda: animated("GIF"), OK),
    "animated webp": (lambda: animated("WEBP"), OK),
    "apng": (lambda: animated("PNG"), OK),
    "tiff lzw": (tiff("tiff_lzw"), OK),
    "tiff packbits": (tiff("packbits"), OK),
    "tiff deflate": (tiff("tiff_adobe_deflate"), OK),
    "tiff group4 1-bit": (tiff("group4", "1"), OK),
    "exif-rotated jpeg": (exif_rotated_jpeg, OK),
}
NAMES = list(CORPUS)


@pytest.fixture(scope="module")
def corpus() -> dict[str, bytes]:
    built = {name: make() for name, (make, _) in CORPUS.items()}
    too_big = {n: len(b) for n, b in built.items() if len(b) > LIMITS["max_upload_bytes"] // 2}
    assert not too_big, f"corpus entries must stay under the upload limit: {too_big}"
    return built


@pytest.fixture(scope="module")
def api(hardened_dir: Path) -> Iterator[TestClient]:
    with TestClient(create_app(hardened_settings(hardened_dir)), raise_server_exceptions=False) as client:
        seed_items(client.post)
        yield client


def _send(api: httpx.Client | TestClient, route: str, name: str, data: bytes) -> httpx.Response:
    part = ("h.bin", data, "application/octet-stream")
    if route == "embed multipart":
        return api.post("/embed", files=[("files", part)])
    if route == "embed json":
        return api.post("/embed", json={"images": [base64.b64encode(data).decode()]})
    if route == "items multipart":
        return api.post("/items", files=[("files", part)], data={"ids": [f"hostile {name}"]}, params={"replace": True})
    return api.post("/search", files=[("file", part)], data={"k": "3"})


ROUTES = ["embed multipart", "embed json", "items multipart", "search multipart"]


@pytest.mark.parametrize("name", NAMES)
def test_hostile_image_on_every_route(api: TestClient, corpus: dict[str, bytes], hardened_dir: Path, name: str) -> None:
    data, expected = corpus[name], CORPUS[name][1]
    for route in ROUTES:
        r = _send(api, route, name, data)
        assert r.status_code < 500, f"{route}: {r.status_code} {r.text}"
        if r.status_code < 300:
            assert expected == OK or (200, OK) in expected, f"{route}: accepted {name!r}: {r.text[:200]}"
            if route == "embed multipart":  # the right vector: ORT alone on the decoder's pixels
                want = direct_ort(hardened_dir, MODEL_A, [decode_image(data, max_pixels=LIMITS["max_image_pixels"])])
                got = np.asarray(r.json()["embeddings"], dtype=np.float64).astype(np.float32)
                np.testing.assert_allclose(got, want, atol=1e-6)
            if route == "search multipart":
                assert len(r.json()["results"]) == 3
        else:
            error = r.json()["error"]
            assert expected != OK and (r.status_code, error["code"]) in expected, f"{route}: {r.status_code} {error}"
        assert api.get("/healthz").status_code == 200
    if expected == OK:
        assert api.get(f"/items/hostile {name}").status_code == 200


@pytest.mark.integration
def test_uvicorn_survives_the_corpus(data_dir: Path, corpus: dict[str, bytes]) -> None:
    """The whole corpus over real HTTP to `simclr-embed serve`: no 5xx, the process stays up."""
    env = {f"SIMCLR_EMBED_{k.upper()}": str(v) for k, v in LIMITS.items()}
    with live_server(data_dir, **env) as server, httpx.Client(base_url=server.url, timeout=30) as http:
        statuses = {}
        for name, data in corpus.items():
            for route in ("embed multipart", "search multipart"):
                statuses[name, route] = _send(http, route, name, data).status_code
            assert server.proc.poll() is None, f"server died on {name!r}"
            assert http.get("/healthz").status_code == 200
        assert all(s < 500 for s in statuses.values()), {k: s for k, s in statuses.items() if s >= 500}
        ok = {n for n, (_, e) in CORPUS.items() if e == OK}
        assert all(statuses[n, "embed multipart"] == 200 for n in ok), {n: statuses[n, "embed multipart"] for n in ok}
