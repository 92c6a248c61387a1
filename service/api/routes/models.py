"""Routes: the model registry (`GET /models`, `POST /models/{model_id}/activate`)."""

from __future__ import annotations

from typing import Any

from fastapi import APIRouter, Depends
from pydantic import BaseModel
from starlette.concurrency import run_in_threadpool

from service.api.deps import RuntimeDep, require_read_key, require_write_key
from service.api.errors import error_responses

router = APIRouter(prefix="/models", tags=["models"])


class ModelList(BaseModel):
    active: str | None
    models: list[dict[str, Any]]  # ModelCard fields plus `active: bool`, newest first


class Activated(BaseModel):
    active: str
    model: dict[str, Any]


@router.get("", dependencies=[Depends(require_read_key)], response_model=ModelList)
async def list_models(runtime: RuntimeDep) -> ModelList:
    cards = await run_in_threadpool(runtime.registry.list)
    active = runtime.active_id
    return ModelList(active=active, models=[{**c.model_dump(), "active": c.model_id == active} for c in cards])


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
