"""The decode budgets: per request (413 with the numbers) and process-wide (wait in line, then
503 with Retry-After), on the real app and on `DecodeBudget` itself."""

from __future__ import annotations

import asyncio
from pathlib import Path

import numpy as np
import pytest
from fastapi.testclient import TestClient

from service.api.errors import ApiError
from service.api.limits import DecodeBudget
from service.app import create_app
from service.settings import Settings
from tests.service.conftest import make_settings, multipart, png


def test_request_over_its_pixel_budget_is_413_with_the_numbers(data_dir: Path) -> None:
    settings = make_settings(data_dir, max_request_pixels=3 * 100 * 100)
    images = [png(np.full((100, 100, 3), i, np.uint8)) for i in range(4)]
    with TestClient(create_app(settings), raise_server_exceptions=False) as client:
        assert client.post("/embed", files=multipart(images[:3])).status_code == 200  # exactly at the limit
        answer = client.post("/embed", files=multipart(images))
        assert answer.status_code == 413
        error = answer.json()["error"]
        assert error["code"] == "request_too_large"
        assert "40000 pixels" in error["message"] and "30000" in error["message"]
        assert "SIMCLR_EMBED_MAX_REQUEST_PIXELS" in error["message"]


def test_busy_budget_answers_503_with_retry_after(data_dir: Path) -> None:
    settings = make_settings(data_dir, max_image_pixels=10_000, decode_budget_pixels=10_000, decode_wait_s=0.3)
    image = png(np.full((100, 100, 3), 7, np.uint8))  # 10,000 pixels: the whole budget
    with TestClient(create_app(settings), raise_server_exceptions=False) as client:
        budget: DecodeBudget = client.app.state.decode_budget
        budget.in_use = budget.capacity  # another request decoding (the budget is the app's own)
        busy = client.post("/embed", files=multipart([image]))
        assert busy.status_code == 503 and busy.headers["retry-after"] == "1"
        assert busy.json()["error"]["code"] == "server_busy"
        budget.in_use = 0
        assert client.post("/embed", files=multipart([image])).status_code == 200
        assert budget.in_use == 0  # released after the answer


def test_budget_must_fit_one_image_at_the_limit() -> None:
    with pytest.raises(ValueError, match="decode_budget_pixels"):
        Settings(max_image_pixels=1000, decode_budget_pixels=999)


def test_waiters_are_served_in_order_and_time_out_alone() -> None:
    async def scenario() -> list[str]:
        budget = DecodeBudget(100)
        order: list[str] = []

        async def request(name: str, pixels: int, wait_s: float, hold_s: float) -> None:
            try:
                async with budget.reserve(pixels, wait_s):
                    order.append(f"{name} in")
                    await asyncio.sleep(hold_s)
            except ApiError as exc:
                order.append(f"{name} {exc.status}")

        first = asyncio.create_task(request("a", 80, 1.0, 0.2))
        await asyncio.sleep(0.01)
        big = asyncio.create_task(request("b", 60, 1.0, 0.0))  # waits for a
        await asyncio.sleep(0.01)
        small = asyncio.create_task(request("c", 10, 1.0, 0.0))  # fits, but must not jump the line
        hopeless = asyncio.create_task(request("d", 100, 0.05, 0.0))  # gives up first
        await asyncio.gather(first, big, small, hopeless)
        assert budget.in_use == 0
        return order

    assert asyncio.run(scenario()) == ["a in", "d 503", "b in", "c in"]
    with pytest.raises(ValueError):
        asyncio.run(DecodeBudget(10).reserve(11, 1.0).__aenter__())
