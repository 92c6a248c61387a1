"""One error shape for every failure: {"error": {"code": "...", "message": "..."}}.

Codes are stable snake_case ids clients can switch on; messages tell a person what to do.
"""

from __future__ import annotations

import logging

from fastapi import FastAPI, Request
from fastapi.exceptions import RequestValidationError
from fastapi.responses import JSONResponse
from pydantic import BaseModel, ConfigDict
from starlette.exceptions import HTTPException as StarletteHTTPException

from service.contract.imaging import ImageDecodeError
from service.contract.registry import ModelNotFoundError, RegistryError
from service.items.errors import (
    IndexNotReadyError,
    InvalidItemRequestError,
    ItemConflictError,
    ItemError,
    ItemExistsError,
    ItemNotFoundError,
    StoreUnavailableError,
)
from service.runtime import NoActiveModelError

log = logging.getLogger(__name__)


class ApiError(Exception):
    """Raise anywhere in a request: becomes `{"error": {"code", "message"}}` with `status`."""

    def __init__(self, status: int, code: str, message: str, headers: dict[str, str] | None = None) -> None:
        super().__init__(message)
        self.status = status
        self.code = code
        self.message = message
        self.headers = headers


class ErrorDetail(BaseModel):
    model_config = ConfigDict(extra="allow")  # e.g. `fields` on 422

    code: str
    message: str


class ErrorResponse(BaseModel):
    error: ErrorDetail


_MEANING = {
    400: "bad request (e.g. a path outside the allowed roots)",
    401: "missing or invalid API key",
    404: "not found",
    409: "conflict",
    413: "upload too large",
    415: "not a supported image",
    422: "invalid fields or values",
    503: "not ready: no active model, the item store or job queue unreachable, or the decode budget busy (Retry-After)",
}


def error_responses(*statuses: int) -> dict[int | str, dict[str, object]]:
    """OpenAPI `responses=` entries for the errors a route answers on purpose, all in the one shape."""
    return {status: {"model": ErrorResponse, "description": _MEANING[status]} for status in statuses}


def error_body(code: str, message: str, **extra: object) -> dict[str, object]:
    return {"error": {"code": code, "message": message, **extra}}


_HTTP_CODES = {
    400: "bad_request",
    401: "unauthorized",
    403: "forbidden",
    404: "not_found",
    405: "method_not_allowed",
    409: "conflict",
    413: "payload_too_large",
    415: "unsupported_media_type",
    422: "invalid_request",
    429: "too_many_requests",
    503: "unavailable",
}


_DECODE_STATUS = {"unsupported_format": 415, "corrupt_image": 422, "empty_image": 422, "image_too_large": 413}


def decode_error(exc: ImageDecodeError, name: str | None = None) -> ApiError:
    """An image that cannot be used -> its 4xx (`name: ` before the message when given)."""
    message = f"{name}: {exc}" if name else str(exc)
    return ApiError(_DECODE_STATUS.get(exc.code, 422), exc.code, message)


# The item layer's errors (service/items/errors.py) and their statuses.
_ITEM_STATUS: dict[type[ItemError], int] = {
    ItemNotFoundError: 404,
    ItemExistsError: 409,
    ItemConflictError: 409,
    IndexNotReadyError: 503,
    InvalidItemRequestError: 422,
    StoreUnavailableError: 503,
}


def install_error_handlers(app: FastAPI) -> None:
    """ApiError, validation, HTTP, registry, runtime and item-layer errors to the one shape; anything else a JSON 500."""

    @app.exception_handler(ApiError)
    async def _api_error(_: Request, exc: ApiError) -> JSONResponse:
        return JSONResponse(error_body(exc.code, exc.message), status_code=exc.status, headers=exc.headers)

    @app.exception_handler(RequestValidationError)
    async def _validation(_: Request, exc: RequestValidationError) -> JSONResponse:
        fields = [
            {"field": ".".join(str(p) for p in e.get("loc", ()) if p != "body"), "message": e.get("msg", "")}
            for e in exc.errors()
        ]
        summary = "; ".join(f"{f['field'] or 'body'}: {f['message']}" for f in fields[:5])
        return JSONResponse(
            error_body("invalid_request", f"invalid request: {summary}", fields=fields), status_code=422
        )

    @app.exception_handler(StarletteHTTPException)
    async def _http(_: Request, exc: StarletteHTTPException) -> JSONResponse:
        code = _HTTP_CODES.get(exc.status_code, "http_error")
        return JSONResponse(error_body(code, str(exc.detail)), status_code=exc.status_code, headers=exc.headers)

    @app.exception_handler(ImageDecodeError)
    async def _decode(request: Request, exc: ImageDecodeError) -> JSONResponse:
        # Pixels are decoded lazily, inside the runtime: a broken image surfaces from there.
        return await _api_error(request, decode_error(exc))

    @app.exception_handler(NoActiveModelError)
    async def _no_model(_: Request, exc: NoActiveModelError) -> JSONResponse:
        return JSONResponse(error_body(exc.code, str(exc)), status_code=503, headers={"Retry-After": "30"})

    @app.exception_handler(RegistryError)
    async def _registry(_: Request, exc: RegistryError) -> JSONResponse:
        # not found -> 404; a model that fails its checksum or cannot be loaded -> 409
        status = 404 if isinstance(exc, ModelNotFoundError) else 409
        return JSONResponse(error_body(exc.code, str(exc)), status_code=status)

    @app.exception_handler(ItemError)
    async def _item(_: Request, exc: ItemError) -> JSONResponse:
        status, headers = _ITEM_STATUS.get(type(exc), 400), None
        extra: dict[str, object] = {}
        if isinstance(exc, IndexNotReadyError | StoreUnavailableError):
            headers = {"Retry-After": "5"}
        if isinstance(exc, InvalidItemRequestError) and exc.field:
            extra["fields"] = [{"field": exc.field, "message": exc.message}]
        return JSONResponse(error_body(exc.code, exc.message, **extra), status_code=status, headers=headers)

    @app.exception_handler(Exception)
    async def _internal(request: Request, exc: Exception) -> JSONResponse:
        # The safety net: a bug becomes a JSON 500 (logged with its traceback), never a dropped connection.
        log.error("unhandled error on %s %s", request.method, request.url.path, exc_info=exc)
        return JSONResponse(
            error_body("internal_error", "the server failed to handle this request; it has been logged"),
            status_code=500,
        )
