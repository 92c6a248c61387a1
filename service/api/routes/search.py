"""Routes: search. `POST /search` by vector or item id, or several of either (JSON), or by
image (multipart `file` part with `k`, `filter` and `min_score` fields); answers from the
served model's index, best first, restricted to the items a metadata `filter` matches."""

from __future__ import annotations

import json

from fastapi import APIRouter, Depends, Request
from fastapi.exceptions import RequestValidationError
from pydantic import ValidationError
from starlette.concurrency import run_in_threadpool

from service.api.deps import SettingsDep, read_images, require_read_key
from service.api.errors import ApiError, error_responses
from service.api.routes.items import ItemsDep
from service.items.filters import parse_filter
from service.items.schemas import MAX_K, BatchSearchResponse, SearchHit, SearchRequest, SearchResponse
from service.items.service import Hit, SearchOptions

router = APIRouter(tags=["search"])
FORM_FIELDS = {"k", "filter", "min_score"}

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
                        "filter": {"type": "string", "description": "a JSON filter object, as in the JSON body"},
                        "min_score": {"type": "number", "minimum": -1, "maximum": 1},
                    },
                }
            },
        },
    }
}


def _form_value(fields: dict[str, list[str]], name: str) -> str | None:
    values = fields.get(name)
    if values is not None and len(values) != 1:
        raise ApiError(422, "invalid_request", f"send one `{name}` field, not {len(values)}")
    return values[0] if values else None


def _form_query(fields: dict[str, list[str]]) -> tuple[int, SearchOptions]:
    """The `k`, `filter` (JSON) and `min_score` fields of a search by image."""
    raw: dict[str, object] = {"item_id": "_"}
    for name in ("k", "min_score"):
        if (value := _form_value(fields, name)) is not None:
            raw[name] = value
    if (text := _form_value(fields, "filter")) is not None:
        try:
            raw["filter"] = json.loads(text)
        except ValueError as exc:
            raise ApiError(422, "invalid_filter", f"the `filter` field is not valid JSON: {exc}") from exc
    try:
        query = SearchRequest.model_validate(raw)
    except ValidationError as exc:
        raise RequestValidationError(exc.errors()) from exc
    return query.k, _options(query)


def _options(query: SearchRequest) -> SearchOptions:
    return SearchOptions(where=parse_filter(query.filter), min_score=query.min_score)


def _hits(hits: list[Hit]) -> list[SearchHit]:
    return [SearchHit(id=h.id, score=h.score, metadata=h.metadata) for h in hits]


@router.post(
    "/search",
    response_model=SearchResponse | BatchSearchResponse,
    openapi_extra=_OPENAPI,
    dependencies=[Depends(require_read_key)],
    responses=error_responses(401, 404, 409, 413, 415, 422, 503),
)
async def search(request: Request, items: ItemsDep, settings: SettingsDep) -> SearchResponse | BatchSearchResponse:
    content_type = request.headers.get("content-type", "").split(";")[0].strip().lower()
    if content_type == "multipart/form-data":
        async with read_images(request, settings, file_field="file") as upload:
            if len(upload.images) != 1:
                raise ApiError(422, "one_image", "search by image takes exactly one `file` part")
            if unexpected := sorted(set(upload.fields) - FORM_FIELDS):
                # e.g. an `item_id` beside the image: which query was meant is ambiguous, so say so.
                raise ApiError(
                    422,
                    "unexpected_fields",
                    "search by image takes a `file` part and optional `k`, `filter` and `min_score` fields; "
                    f"unexpected: {', '.join(unexpected)}",
                )
            k, options = _form_query(upload.fields)
            model_id, hits = await items.search_image(upload.encoded, k, options)
        return SearchResponse(model_id=model_id, results=_hits(hits))
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
    options = _options(query)
    ids = query.item_ids or ([query.item_id] if query.item_id is not None else None)
    if ids is not None:
        model_id, batch = await run_in_threadpool(
            items.search_items, ids, query.k, options, exclude_self=query.exclude_self
        )
    else:
        vectors = query.vectors or [query.vector or []]
        model_id, batch = await run_in_threadpool(items.search_vectors, vectors, query.k, None, options)
    if query.batched:
        return BatchSearchResponse(model_id=model_id, results=[_hits(h) for h in batch])
    return SearchResponse(model_id=model_id, results=_hits(batch[0]))
