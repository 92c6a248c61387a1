"""Routes: items, the caller's indexed images.

`POST /items` takes multipart with repeated `files` and `ids` parts and optional `metadata`
parts (one JSON object per file, in order), or JSON `{"images": [base64...], "ids": [...],
"metadata": [...]}`. An id that exists is 409 `item_exists` unless `?replace=true`, which
overwrites it (new image, metadata and vectors). A request is all or nothing.
`PATCH /items/{id}` merges or replaces an item's metadata without re-uploading it.
An id may hold '/' (bulk indexing makes ids of relative paths): `/items/{id}` takes the rest
of the URL path, and `/items/{id}/image` is matched first.
"""

from __future__ import annotations

import json
from typing import Annotated, Any

from fastapi import APIRouter, Depends, Query, Request, Response

from service.api.deps import Offset, SettingsDep, read_images, require_read_key, require_write_key
from service.api.errors import ApiError, error_responses
from service.items.schemas import ItemOut, ItemPage, ItemPatch, ItemsAdded, parse_metadata, validate_item_id
from service.items.service import ItemService

router = APIRouter(tags=["items"])


def get_items(request: Request) -> ItemService:
    items = getattr(request.app.state, "items", None)
    if items is None:
        raise ApiError(503, "items_unavailable", "the item store is not open yet; retry in a moment")
    return items


ItemsDep = Annotated[ItemService, Depends(get_items)]


def _metadata_list(raw: Any, count: int) -> list[dict[str, Any] | None]:
    """`metadata` parts (strings) or a JSON list -> one dict-or-None per image."""
    if raw is None:
        return [None] * count
    if not isinstance(raw, list) or len(raw) != count:
        raise ApiError(422, "metadata_mismatch", f"send one metadata object per image ({count}), or none at all")
    return [parse_metadata(m if isinstance(m, str) or m is None else json.dumps(m)) for m in raw]


@router.post(
    "/items",
    status_code=201,
    response_model=ItemsAdded,
    dependencies=[Depends(require_write_key)],
    responses=error_responses(401, 409, 413, 415, 422, 503),
)
async def add_items(
    request: Request,
    items: ItemsDep,
    settings: SettingsDep,
    replace: Annotated[bool, Query(description="overwrite items whose id exists instead of 409")] = False,
) -> ItemsAdded:
    async with read_images(request, settings) as upload:
        ids = upload.fields.get("ids", upload.body.get("ids"))
        if not isinstance(ids, list) or len(ids) != len(upload.images) or not all(isinstance(i, str) for i in ids):
            raise ApiError(422, "ids_mismatch", f"send one `ids` value per image ({len(upload.images)} images)")
        for item_id in ids:
            validate_item_id(item_id)
        if len(set(ids)) != len(ids):
            raise ApiError(422, "duplicate_ids", "the same id appears twice in one request")
        metadata = _metadata_list(upload.fields.get("metadata", upload.body.get("metadata")), len(ids))
        originals = [(u.data, u.header.media_type) for u in upload.images]
        stored = await items.add(ids, originals, upload.encoded, metadata, replace=replace)
    return ItemsAdded(ids=stored, count=len(stored))


@router.get(
    "/items", response_model=ItemPage, dependencies=[Depends(require_read_key)], responses=error_responses(401, 503)
)
def list_items(
    items: ItemsDep,
    offset: Offset = 0,
    limit: Annotated[int, Query(ge=1, le=1000)] = 50,
) -> ItemPage:
    page, total = items.page(offset, limit)
    nxt = offset + len(page)
    return ItemPage(
        items=[ItemOut.of(i) for i in page],
        total=total,
        offset=offset,
        limit=limit,
        next_offset=nxt if nxt < total else None,
    )


@router.get(
    "/items/{item_id:path}/image",
    response_class=Response,
    responses={
        200: {"content": {"image/*": {}}, "description": "the original bytes as uploaded"},
        **error_responses(401, 404, 503),
    },
    dependencies=[Depends(require_read_key)],
)
def get_item_image(item_id: str, items: ItemsDep) -> Response:
    data, content_type = items.original(item_id)
    return Response(data, media_type=content_type, headers={"Cache-Control": "private, max-age=3600"})


@router.api_route(
    "/items/{item_id:path}/image",
    methods=["PATCH", "DELETE"],
    include_in_schema=False,
    dependencies=[Depends(require_write_key)],  # a write without a key is 401 first, as on every route
)
def image_is_read_only(item_id: str) -> Response:
    """An original is only read: without this, `{item_id:path}` would take `<id>/image` as an id."""
    raise ApiError(405, "method_not_allowed", "an item's image is read-only: GET it", headers={"Allow": "GET"})


@router.get(
    "/items/{item_id:path}",
    response_model=ItemOut,
    dependencies=[Depends(require_read_key)],
    responses=error_responses(401, 404, 503),
)
def get_item(item_id: str, items: ItemsDep) -> ItemOut:
    return ItemOut.of(items.get(item_id))


@router.patch(
    "/items/{item_id:path}",
    response_model=ItemOut,
    dependencies=[Depends(require_write_key)],
    responses=error_responses(400, 401, 404, 422, 503),  # 400: a body that is not JSON
)
def patch_item(item_id: str, patch: ItemPatch, items: ItemsDep) -> ItemOut:
    """Merge `metadata` into the item's (null values remove keys), or replace it with
    `replace: true`; the image and vectors are untouched."""
    metadata = parse_metadata(json.dumps(patch.metadata) if patch.metadata is not None else None)
    return ItemOut.of(items.update_metadata(item_id, metadata, merge=not patch.replace))


@router.delete(
    "/items/{item_id:path}",
    status_code=204,
    dependencies=[Depends(require_write_key)],
    responses=error_responses(401, 404, 503),
)
def delete_item(item_id: str, items: ItemsDep) -> Response:
    items.delete(item_id)
    return Response(status_code=204)
