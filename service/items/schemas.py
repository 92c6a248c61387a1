"""Request and response models of /items and /search, and the rules for ids and metadata."""

from __future__ import annotations

import json
from datetime import UTC, datetime
from typing import Any

from pydantic import BaseModel, ConfigDict, Field, model_validator

from service.items.errors import InvalidItemRequestError

MAX_ID_CHARS = 256
MAX_METADATA_BYTES = 16 * 1024
MAX_K = 1000
MAX_QUERIES = 100


def validate_item_id(item_id: str) -> str:
    """1-256 printable characters; '/' only between non-empty parts, as in the relative paths
    bulk indexing makes ids of (`/items/{id}` takes the whole rest of the URL path), and not
    ending in `/image` (that is `/items/{id}/image`)."""
    bad_slash = item_id.startswith("/") or item_id.endswith("/") or "//" in item_id or item_id.endswith("/image")
    if not 1 <= len(item_id) <= MAX_ID_CHARS or not item_id.isprintable() or bad_slash:
        raise InvalidItemRequestError(
            f"item ids must be 1-{MAX_ID_CHARS} printable characters, '/' only between non-empty parts and "
            "not ending in '/image'; "
            f"got {item_id[:40]!r}",
            code="invalid_item_id",
        )
    return item_id


def parse_metadata(text: str | None) -> dict[str, Any] | None:
    """A `metadata` part: a JSON object of at most MAX_METADATA_BYTES, or empty for none."""
    if text is None or not text.strip():
        return None
    if len(text.encode()) > MAX_METADATA_BYTES:
        raise InvalidItemRequestError(
            f"metadata is larger than {MAX_METADATA_BYTES} bytes of JSON", code="metadata_too_large"
        )
    try:
        value = json.loads(text)
    except ValueError as exc:
        raise InvalidItemRequestError(f"metadata is not valid JSON: {exc}", code="invalid_metadata") from exc
    if not isinstance(value, dict):
        raise InvalidItemRequestError('metadata must be a JSON object, e.g. {"label": "cat"}', code="invalid_metadata")
    return value


class ItemOut(BaseModel):
    id: str
    metadata: dict[str, Any] | None
    created: datetime
    content_type: str
    models: list[str] = Field(description="models this item has a vector under")
    image_url: str = Field(description="the original image: GET it for the bytes")

    @classmethod
    def of(cls, item: Any) -> ItemOut:
        from urllib.parse import quote

        return cls(
            id=item.id,
            metadata=item.metadata,
            created=datetime.fromtimestamp(item.created, UTC),
            content_type=item.content_type,
            models=item.models,
            image_url=f"/items/{quote(item.id, safe='')}/image",
        )


class ItemPage(BaseModel):
    items: list[ItemOut]
    total: int
    offset: int
    limit: int
    next_offset: int | None = Field(description="offset of the next page; null on the last one")


class ItemsAdded(BaseModel):
    ids: list[str]
    count: int


class SearchRequest(BaseModel):
    """Exactly one of `vector`, `item_id`, `vectors` or `item_ids` (the plural ones search
    several queries in one pass and answer one result list per query)."""

    model_config = ConfigDict(extra="forbid")

    vector: list[float] | None = Field(None, min_length=1, max_length=65536)
    item_id: str | None = Field(None, min_length=1, max_length=MAX_ID_CHARS)
    vectors: list[list[float]] | None = Field(None, min_length=1, max_length=MAX_QUERIES)
    item_ids: list[str] | None = Field(None, min_length=1, max_length=MAX_QUERIES)
    k: int = Field(10, ge=1, le=MAX_K)
    filter: dict[str, Any] | None = Field(
        None, description='metadata conditions, AND: {"shop": "a", "label": {"in": [1, 3]}, "n": {"gte": 2}}'
    )
    min_score: float | None = Field(None, ge=-1.0, le=1.0, description="leave out hits scoring below this")
    exclude_self: bool = Field(False, description="search by item id: leave the item itself out of its results")

    @model_validator(mode="after")
    def _one_query(self) -> SearchRequest:
        given = [name for name in ("vector", "item_id", "vectors", "item_ids") if getattr(self, name) is not None]
        if len(given) != 1:
            raise ValueError(
                "give exactly one of 'vector', 'item_id', 'vectors' or 'item_ids' (or send an image as multipart 'file')"
            )
        if self.exclude_self and self.item_id is None and self.item_ids is None:
            raise ValueError("'exclude_self' applies to a search by 'item_id' or 'item_ids'")
        return self

    @property
    def batched(self) -> bool:
        return self.vectors is not None or self.item_ids is not None


class ItemPatch(BaseModel):
    """`PATCH /items/{id}`: merge `metadata` into the item's (a key set to null is removed),
    or replace it whole with `replace: true` (null clears it)."""

    model_config = ConfigDict(extra="forbid")

    metadata: dict[str, Any] | None
    replace: bool = False


class SearchHit(BaseModel):
    id: str
    score: float = Field(description="inner product with the query (cosine similarity: vectors are unit length)")
    metadata: dict[str, Any] | None


class SearchResponse(BaseModel):
    model_id: str
    results: list[SearchHit] = Field(description="best first")


class BatchSearchResponse(BaseModel):
    model_id: str
    results: list[list[SearchHit]] = Field(description="one list per query, in order, each best first")
