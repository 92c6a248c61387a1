"""Request and response models of /items and /search, and the rules for ids and metadata."""

from __future__ import annotations

import json
from datetime import UTC, datetime
from typing import Any

from pydantic import BaseModel, ConfigDict, Field, model_validator

from service.api.errors import ApiError

MAX_ID_CHARS = 256
MAX_METADATA_BYTES = 16 * 1024
MAX_K = 1000


def validate_item_id(item_id: str) -> str:
    """1-256 printable characters, no '/' (ids are path segments of /items/{id})."""
    if not 1 <= len(item_id) <= MAX_ID_CHARS or not item_id.isprintable() or "/" in item_id:
        raise ApiError(
            422,
            "invalid_item_id",
            f"item ids must be 1-{MAX_ID_CHARS} printable characters without '/'; got {item_id[:40]!r}",
        )
    return item_id


def parse_metadata(text: str | None) -> dict[str, Any] | None:
    """A `metadata` part: a JSON object of at most MAX_METADATA_BYTES, or empty for none."""
    if text is None or not text.strip():
        return None
    if len(text.encode()) > MAX_METADATA_BYTES:
        raise ApiError(422, "metadata_too_large", f"metadata is larger than {MAX_METADATA_BYTES} bytes of JSON")
    try:
        value = json.loads(text)
    except ValueError as exc:
        raise ApiError(422, "invalid_metadata", f"metadata is not valid JSON: {exc}") from exc
    if not isinstance(value, dict):
        raise ApiError(422, "invalid_metadata", 'metadata must be a JSON object, e.g. {"label": "cat"}')
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
    """Exactly one of `vector` or `item_id`."""

    model_config = ConfigDict(extra="forbid")

    vector: list[float] | None = Field(None, min_length=1, max_length=65536)
    item_id: str | None = Field(None, min_length=1, max_length=MAX_ID_CHARS)
    k: int = Field(10, ge=1, le=MAX_K)

    @model_validator(mode="after")
    def _one_query(self) -> SearchRequest:
        if (self.vector is None) == (self.item_id is None):
            raise ValueError("give exactly one of 'vector' or 'item_id' (or send an image as multipart 'file')")
        return self


class SearchHit(BaseModel):
    id: str
    score: float = Field(description="inner product with the query (cosine similarity: vectors are unit length)")
    metadata: dict[str, Any] | None


class SearchResponse(BaseModel):
    model_id: str
    results: list[SearchHit] = Field(description="best first")
