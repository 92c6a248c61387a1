"""Dependencies shared by the routers: settings, the runtime, API keys, and image uploads.

Image uploads (`read_images`) are one implementation for /embed, /items and /search, so every
route accepts the same two shapes and answers bad input with the same codes:

* multipart/form-data with one or more file parts (field `files` by default);
* application/json `{"images": ["<base64>", ...]}` (a `data:image/...;base64,` prefix is allowed).

| problem | status | code |
|---|---|---|
| body over `max_upload_bytes` (checked while streaming) | 413 | `payload_too_large` |
| more than `max_images_per_request` images | 413 | `too_many_images` |
| no image in the request | 422 | `no_images` |
| content type neither multipart nor JSON | 415 | `unsupported_media_type` |
| JSON that does not parse / wrong shape / bad base64 | 422 | `malformed_json` / `invalid_request` / `invalid_base64` |
| multipart that does not parse | 422 | `malformed_multipart` |
| not an image, or a format outside JPEG/PNG/WebP/BMP/GIF/TIFF | 415 | `unsupported_format` |
| truncated or undecodable image | 422 | `corrupt_image` |
| 0-byte image | 422 | `empty_image` |
| more pixels than `max_image_pixels` (decompression bomb) | 413 | `image_too_large` |
| more pixels in all than `max_request_pixels` | 413 | `request_too_large` |
| decode budget (`decode_budget_pixels`) busy for `decode_wait_s` | 503 | `server_busy` |

Memory stays bounded whatever a client sends: headers are checked first (no pixel decoded),
then the request holds its largest image's pixel count of the process-wide `DecodeBudget`
while its images are decoded, one at a time, straight into the model's batch (`EncodedImages`).
"""

from __future__ import annotations

import base64
import binascii
import hmac
import json
from collections.abc import AsyncIterator
from contextlib import asynccontextmanager
from dataclasses import dataclass, field
from typing import Annotated, Any

from fastapi import Depends, Query, Request
from starlette.concurrency import run_in_threadpool
from starlette.datastructures import UploadFile
from starlette.exceptions import HTTPException as StarletteHTTPException

from service.api.errors import ApiError, decode_error
from service.api.limits import DecodeBudget
from service.contract.imaging import EncodedImages, ImageDecodeError, ImageHeader, probe_image
from service.runtime import RuntimeManager
from service.settings import Settings


def get_settings(request: Request) -> Settings:
    return request.app.state.settings


def get_runtime(request: Request) -> RuntimeManager:
    return request.app.state.runtime


SettingsDep = Annotated[Settings, Depends(get_settings)]
RuntimeDep = Annotated[RuntimeManager, Depends(get_runtime)]
# Pagination offset: bounded so that a huge value is a 422, never an overflow in SQLite or Redis.
Offset = Annotated[int, Query(ge=0, le=10**12, description="how many entries to skip")]


# -- API keys ---------------------------------------------------------------------------------


def _presented_key(request: Request) -> str | None:
    auth = request.headers.get("authorization", "")
    scheme, _, token = auth.partition(" ")
    if scheme.lower() == "bearer" and token.strip():
        return token.strip()
    return request.headers.get("x-api-key") or None


def _check_key(request: Request, settings: Settings) -> None:
    presented = _presented_key(request)
    challenge = {"WWW-Authenticate": "Bearer"}
    if presented is None:
        raise ApiError(
            401,
            "missing_api_key",
            "this route needs an API key: send `Authorization: Bearer <key>` or `X-API-Key: <key>`",
            headers=challenge,
        )
    given = presented.encode()
    # Compare against every key (no early exit), each in constant time.
    matched = False
    for key in settings.api_keys:
        matched |= hmac.compare_digest(given, key.get_secret_value().encode())
    if not matched:
        raise ApiError(401, "invalid_api_key", "the API key is not valid for this server", headers=challenge)


def require_write_key(request: Request, settings: SettingsDep) -> None:
    """Mutating routes: a valid key when `api_keys` is configured."""
    if settings.api_keys:
        _check_key(request, settings)


def require_read_key(request: Request, settings: SettingsDep) -> None:
    """Read routes: a valid key when `api_keys` is configured and `require_key_for_reads` is on."""
    if settings.api_keys and settings.require_key_for_reads:
        _check_key(request, settings)


# -- image uploads ----------------------------------------------------------------------------


@dataclass(frozen=True)
class UploadedImage:
    filename: str  # the part's filename, or "images[i]" for JSON
    data: bytes  # the encoded bytes as sent (the item store keeps originals)
    header: ImageHeader  # format and size, read once; the pixels are decoded by `ImageUpload.encoded`


@dataclass
class ImageUpload:
    images: list[UploadedImage]
    encoded: EncodedImages  # what the runtime decodes, one image at a time, into a model's batch
    fields: dict[str, list[str]] = field(default_factory=dict)  # multipart text fields, in order
    body: dict[str, Any] = field(default_factory=dict)  # JSON members other than the images


def get_decode_budget(request: Request) -> DecodeBudget:
    return request.app.state.decode_budget


@asynccontextmanager
async def read_images(
    request: Request,
    settings: Settings,
    *,
    file_field: str = "files",
    json_field: str = "images",
    min_images: int = 1,
) -> AsyncIterator[ImageUpload]:
    """Read, limit and check the images of a request (multipart `file_field` parts or JSON
    `{json_field: [base64, ...]}`); the table in this module's docstring lists the errors.

    Use as `async with read_images(...) as upload:`; the block holds the request's share of
    the decode budget, so embed inside it. The body size limit is enforced while streaming
    by `BodyLimitMiddleware`; header checks run in a worker thread.
    """
    content_type = request.headers.get("content-type", "").split(";")[0].strip().lower()
    if content_type == "multipart/form-data":
        raw, fields = await _read_multipart(request, file_field)
        body: dict[str, Any] = {}
    elif content_type == "application/json" or content_type.endswith("+json"):
        raw, body = await _read_json(request, json_field)
        fields = {}
    else:
        raise ApiError(
            415,
            "unsupported_media_type",
            f"send images as multipart/form-data (`{file_field}` parts) or as application/json "
            f'{{"{json_field}": [base64, ...]}}; got content type {content_type or "none"!r}',
        )
    if len(raw) < min_images:
        raise ApiError(
            422, "no_images", f"the request holds no image: add `{file_field}` parts or a non-empty `{json_field}` list"
        )
    if len(raw) > settings.max_images_per_request:
        raise ApiError(
            413,
            "too_many_images",
            f"{len(raw)} images in one request; the limit is {settings.max_images_per_request} "
            "(SIMCLR_EMBED_MAX_IMAGES_PER_REQUEST): split them over several requests",
        )
    images = await run_in_threadpool(_probe_all, raw, settings.max_image_pixels)
    total = sum(u.header.pixels for u in images)
    if total > settings.max_request_pixels:
        raise ApiError(
            413,
            "request_too_large",
            f"the {len(images)} images hold {total} pixels in all; the limit is {settings.max_request_pixels} "
            "per request (SIMCLR_EMBED_MAX_REQUEST_PIXELS): send fewer or smaller images per request",
        )
    encoded = EncodedImages(
        [u.data for u in images], [u.filename for u in images], max_pixels=settings.max_image_pixels
    )
    largest = max((u.header.pixels for u in images), default=0)
    async with get_decode_budget(request).reserve(largest, settings.decode_wait_s):
        yield ImageUpload(images, encoded, fields, body)


async def _read_multipart(request: Request, file_field: str) -> tuple[list[tuple[str, bytes]], dict[str, list[str]]]:
    try:
        form = await request.form()
    except StarletteHTTPException as exc:  # Starlette turns multipart parse errors into 400
        raise ApiError(422, "malformed_multipart", f"the multipart body could not be parsed: {exc.detail}") from exc
    try:
        raw: list[tuple[str, bytes]] = []
        fields: dict[str, list[str]] = {}
        for name, value in form.multi_items():
            if name == file_field:
                if not isinstance(value, UploadFile):
                    raise ApiError(422, "invalid_request", f"`{file_field}` parts must be files (with a filename)")
                raw.append((value.filename or f"{file_field}[{len(raw)}]", await value.read()))
            elif isinstance(value, str):
                fields.setdefault(name, []).append(value)
        return raw, fields
    finally:
        await form.close()


async def _read_json(request: Request, json_field: str) -> tuple[list[tuple[str, bytes]], dict[str, Any]]:
    try:
        body = json.loads(await request.body())
    except (ValueError, UnicodeDecodeError) as exc:
        raise ApiError(422, "malformed_json", f"the body is not valid JSON: {exc}") from exc
    if not isinstance(body, dict) or not isinstance(body.get(json_field), list):
        raise ApiError(422, "invalid_request", f'expected a JSON object {{"{json_field}": [base64 strings]}}')
    raw = []
    for i, item in enumerate(body.pop(json_field)):
        name = f"{json_field}[{i}]"
        if not isinstance(item, str):
            raise ApiError(422, "invalid_request", f"{name} must be a base64 string")
        if item.startswith("data:"):
            item = item.partition(",")[2]
        try:
            raw.append((name, base64.b64decode(item, validate=True)))
        except (binascii.Error, ValueError) as exc:
            raise ApiError(422, "invalid_base64", f"{name} is not valid base64: {exc}") from exc
    return raw, body


def _probe_all(raw: list[tuple[str, bytes]], max_pixels: int) -> list[UploadedImage]:
    out = []
    for name, data in raw:
        try:
            out.append(UploadedImage(name, data, probe_image(data, max_pixels=max_pixels)))
        except ImageDecodeError as exc:
            raise decode_error(exc, name) from exc
    return out
