"""Routes: search. `POST /search` by vector or item id (JSON), or by image (multipart `file`
part and a `k` field); answers from the served model's index, best first."""

from __future__ import annotations

import json

from fastapi import APIRouter, Depends, Request
from fastapi.exceptions import RequestValidationError
from pydantic import ValidationError
from starlette.concurrency import run_in_threadpool

from service.api.deps import SettingsDep, read_images, require_read_key
from service.api.errors import ApiError, error_responses
from service.api.routes.items import ItemsDep
from service.items.schemas import MAX_K, SearchHit, SearchRequest, SearchResponse

router = APIRouter(tags=["search"])

_OPENAPI = {
    "requestBody": {
        "required": True,
        "content": {
            "application/json": {"schema": SearchRequest.model_json_schema()},
            "multipart/form-data": {
                "schema": {
                    "type": "object",
                    "required": ["file"],
                    "additionalProperties": False,
                    "properties": {
                        "file": {"type": "string", "format": "binary"},
                        "k": {"type": "integer", "minimum": 1, "maximum": MAX_K, "default": 10},
                    },
                }
            },
        },
    }
}


def _k_field(values: list[str] | None) -> int:
    if values is not None and len(values) != 1:
        raise ApiError(422, "invalid_request", f"send one `k` field, not {len(values)}")
    try:
        return SearchRequest.model_validate({"k": (values or ["10"])[0], "item_id": "_"}).k
    except ValidationError as exc:
        raise RequestValidationError([{**e, "loc": ("k",)} for e in exc.errors()]) from exc


@router.post(
    "/search",
    response_model=SearchResponse,
    openapi_extra=_OPENAPI,
    dependencies=[Depends(require_read_key)],
    responses=error_responses(401, 404, 413, 415, 422, 503),
)
async def search(request: Request, items: ItemsDep, settings: SettingsDep) -> SearchResponse:
    content_type = request.headers.get("content-type", "").split(";")[0].strip().lower()
    if content_type == "multipart/form-data":
        async with read_images(request, settings, file_field="file") as upload:
            if len(upload.images) != 1:
                raise ApiError(422, "one_image", "search by image takes exactly one `file` part")
            if unexpected := sorted(set(upload.fields) - {"k"}):
                # e.g. an `item_id` beside the image: which query was meant is ambiguous, so say so.
                raise ApiError(
                    422,
                    "unexpected_fields",
                    "search by image takes a `file` part and an optional `k` field; "
                    f"unexpected: {', '.join(unexpected)}",
                )
            model_id, hits = await items.search_image(upload.encoded, _k_field(upload.fields.get("k")))
    else:
        if content_type != "application/json":
            raise ApiError(
                415, "unsupported_media_type", 'send JSON {"vector"|"item_id", "k"} or multipart with a `file` part'
            )
        try:
            body = json.loads(await request.body())
        except (ValueError, UnicodeDecodeError) as exc:
            raise ApiError(422, "malformed_json", f"the body is not valid JSON: {exc}") from exc
        try:
            query = SearchRequest.model_validate(body)
        except ValidationError as exc:
            raise RequestValidationError(exc.errors()) from exc
        if query.item_id is not None:
            model_id, hits = await run_in_threadpool(items.search_item, query.item_id, query.k)
        else:
            model_id, hits = await run_in_threadpool(items.search_vector, query.vector, query.k)
    return SearchResponse(
        model_id=model_id, results=[SearchHit(id=h.id, score=h.score, metadata=h.metadata) for h in hits]
    )
