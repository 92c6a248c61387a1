"""The request-size limit, enforced while the body streams in (not after buffering it).

A declared Content-Length over the limit is refused before any byte is read; a body without
one (chunked) is counted as it arrives and the request fails with 413 the moment it crosses
`max_upload_bytes`, whichever route reads it (embed, items, search, jobs).
"""

from __future__ import annotations

import json

from starlette.types import ASGIApp, Message, Receive, Scope, Send

from service.api.errors import ApiError, error_body


def _too_large(limit: int) -> str:
    return (
        f"the request body is larger than the limit of {limit} bytes (SIMCLR_EMBED_MAX_UPLOAD_BYTES); "
        "send fewer or smaller images per request"
    )


class BodyLimitMiddleware:
    """Pure ASGI middleware: 413 `payload_too_large` as soon as the body exceeds `max_bytes`."""

    def __init__(self, app: ASGIApp, max_bytes: int) -> None:
        self.app = app
        self.max_bytes = max_bytes

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] != "http":
            await self.app(scope, receive, send)
            return
        declared = dict(scope["headers"]).get(b"content-length")
        if declared is not None and (not declared.isdigit() or int(declared) > self.max_bytes):
            body = json.dumps(error_body("payload_too_large", _too_large(self.max_bytes))).encode()
            await send(
                {
                    "type": "http.response.start",
                    "status": 413,
                    "headers": [
                        (b"content-type", b"application/json"),
                        (b"content-length", str(len(body)).encode()),
                        (b"connection", b"close"),
                    ],
                }
            )
            await send({"type": "http.response.body", "body": body})
            return
        received = 0

        async def limited_receive() -> Message:
            nonlocal received
            message = await receive()
            if message["type"] == "http.request":
                received += len(message.get("body", b""))
                if received > self.max_bytes:
                    # Raised inside the route's body read; the ApiError handler answers 413.
                    raise ApiError(
                        413, "payload_too_large", _too_large(self.max_bytes), headers={"Connection": "close"}
                    )
            return message

        await self.app(scope, limited_receive, send)
