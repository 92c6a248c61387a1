"""Routes: `POST /embed`, images in, one unit-norm vector per image out, in input order."""

from __future__ import annotations

import json

from fastapi import APIRouter, Depends, Request, Response
from pydantic import BaseModel

from service.api.deps import RuntimeDep, SettingsDep, read_images, require_read_key
from service.api.errors import error_responses

router = APIRouter(tags=["embed"])

IMAGE_BODY = {
    "requestBody": {
        "required": True,
        "content": {
            "multipart/form-data": {
                "schema": {
                    "type": "object",
                    "properties": {
                        "files": {"type": "array", "minItems": 1, "items": {"type": "string", "format": "binary"}}
                    },
                    "required": ["files"],
                }
            },
            "application/json": {
                "schema": {
                    "type": "object",
                    "properties": {
                        "images": {"type": "array", "minItems": 1, "items": {"type": "string", "format": "byte"}}
                    },
                    "required": ["images"],
                }
            },
        },
    }
}


class EmbedResponse(BaseModel):
    model_id: str
    dim: int
    embeddings: list[list[float]]


@router.post(
    "/embed",
    dependencies=[Depends(require_read_key)],
    response_model=None,
    responses={200: {"model": EmbedResponse}, **error_responses(401, 413, 415, 422, 503)},
    openapi_extra=IMAGE_BODY,
    summary="Embed images with the active encoder",
)
async def embed(request: Request, settings: SettingsDep, runtime: RuntimeDep) -> Response:
    """Multipart `files` parts or JSON `{"images": [base64, ...]}` -> `{model_id, dim, embeddings}`.

    The response is serialised directly (no pydantic pass over N x D floats); float32 values
    are written as the shortest float64 text, so a client parsing them back gets the exact
    float32 numbers.
    """
    async with read_images(request, settings) as upload:
        model_id, vectors = await runtime.embed(upload.encoded)  # [N, D]
    body = json.dumps({"model_id": model_id, "dim": int(vectors.shape[1]), "embeddings": vectors.tolist()})
    return Response(body, media_type="application/json")
