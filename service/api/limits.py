"""Request limits: the body size, enforced while the body streams in (not after buffering
it), and the process-wide budget of pixels being decoded.

A declared Content-Length over the limit is refused before any byte is read; a body without
one (chunked) is counted as it arrives and the request fails with 413 the moment it crosses
`max_upload_bytes`, whichever route reads it (embed, items, search, jobs).

`DecodeBudget` bounds what concurrent image requests decode at once: each holds its largest
image's pixel count (images are decoded one at a time) from reading to answering; when the
budget is spent a request waits in line at most `decode_wait_s`, then gets 503 with Retry-After.
"""

from __future__ import annotations

import asyncio
import json
import math
from collections import deque
from collections.abc import AsyncIterator
from contextlib import asynccontextmanager

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


class DecodeBudget:
    """Pixels the process may be decoding at once, shared first come, first served."""

    def __init__(self, capacity: int) -> None:
        self.capacity = capacity
        self.in_use = 0
        self._waiting: deque[tuple[int, asyncio.Future[None]]] = deque()

    @asynccontextmanager
    async def reserve(self, pixels: int, wait_s: float) -> AsyncIterator[None]:
        """Hold `pixels` (<= capacity) for the block; 503 `server_busy` after `wait_s` in line."""
        if pixels > self.capacity:
            raise ValueError(f"{pixels} pixels can never fit a budget of {self.capacity}")
        if not self._waiting and self.in_use + pixels <= self.capacity:
            self.in_use += pixels
        else:
            granted: asyncio.Future[None] = asyncio.get_running_loop().create_future()
            entry = (pixels, granted)
            self._waiting.append(entry)
            try:
                await asyncio.wait_for(asyncio.shield(granted), wait_s)
            except (TimeoutError, asyncio.CancelledError) as exc:
                if granted.done():  # granted as the wait ended: give it back
                    self._release(pixels)
                else:
                    self._waiting.remove(entry)
                    self._grant()  # a large request leaving the head may let smaller ones in
                if isinstance(exc, asyncio.CancelledError):
                    raise
                raise ApiError(
                    503,
                    "server_busy",
                    f"the server is decoding {self.in_use} of its {self.capacity} pixels "
                    f"(SIMCLR_EMBED_DECODE_BUDGET_PIXELS) and this request's largest image needs {pixels}; "
                    f"waited {wait_s:g} s: retry later",
                    headers={"Retry-After": str(max(1, math.ceil(wait_s)))},
                ) from None
        try:
            yield
        finally:
            self._release(pixels)

    def _release(self, pixels: int) -> None:
        self.in_use -= pixels
        self._grant()

    def _grant(self) -> None:
        while self._waiting and self.in_use + self._waiting[0][0] <= self.capacity:
            pixels, granted = self._waiting.popleft()
            self.in_use += pixels
            granted.set_result(None)
