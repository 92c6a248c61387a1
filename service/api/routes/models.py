"""Routes: the model registry (`GET /models`, `POST /models/{model_id}/activate`)."""

from __future__ import annotations

from dataclasses import asdict
from typing import Any

from fastapi import APIRouter, Depends, Request
from pydantic import BaseModel, Field
from starlette.concurrency import run_in_threadpool

from service.api.deps import RuntimeDep, require_read_key, require_write_key
from service.api.errors import error_responses
from service.runtime import variant_for

router = APIRouter(prefix="/models", tags=["models"])


class ModelList(BaseModel):
    active: str | None
    active_variant: str | None = None  # which variant of the active model embeds: fp32 or int8
    # ModelCard fields (its `variants` with their verification figures) plus `active: bool` and
    # `serving_variant`: the variant this deployment embeds that model with; newest first
    models: list[dict[str, Any]]
    reembedding: dict[str, Any] | None = Field(
        None, description="the re-embedding job of the pending (or served) model: state, done, total, owner"
    )


class Activated(BaseModel):
    active: str
    model: dict[str, Any]


@router.get("", dependencies=[Depends(require_read_key)], response_model=ModelList)
async def list_models(request: Request, runtime: RuntimeDep) -> ModelList:
    cards = await run_in_threadpool(runtime.registry.list)
    active = runtime.active_id
    items = getattr(request.app.state, "items", None)
    progress = await run_in_threadpool(items.reembedding) if items is not None else None
    settings = runtime.settings
    return ModelList(
        active=active,
        active_variant=runtime.active_variant,
        models=[
            {**c.model_dump(), "active": c.model_id == active, "serving_variant": variant_for(c, settings)}
            for c in cards
        ],
        reembedding=asdict(progress) if progress else None,
    )


@router.post(
    "/{model_id}/activate",
    dependencies=[Depends(require_write_key)],
    response_model=Activated,
    responses=error_responses(401, 404, 409),
)
async def activate_model(model_id: str, runtime: RuntimeDep) -> Activated:
    """Verify and load the model, then swap: requests in flight finish on the previous model."""
    card = await runtime.activate(model_id)
    return Activated(active=card.model_id, model=card.model_dump())
