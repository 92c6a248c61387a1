"""Bounded decode memory, measured on a real `simclr-embed serve` process.

Requests of many large flat images, each under the per-image pixel limit and the body limit
(flat PNGs compress about 1000:1), go to /embed and /items one at a time and three at once.
The server's peak RSS (VmHWM, reset through /proc/<pid>/clear_refs before each phase) may
grow by less than 1 GiB for one request and 2 GiB for three; decoding every image of such a
request before resizing any needed 12 x 144 MB. Each answer is 413, 503 or 200/201 with the
vectors the same image gets alone, and RSS falls back once the traffic stops.
"""

from __future__ import annotations

import io
import time
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import httpx
import numpy as np
import pytest
from PIL import Image

from tests.service.conftest import live_server, parse_vectors

pytestmark = [pytest.mark.integration, pytest.mark.slow]

SIDE = 6000  # 36 MP: under the default max_image_pixels (40 MP)
PER_REQUEST = 12  # 432 MP in all: under the default max_request_pixels (1 GP)
COLOURS = ((0, 0, 0), (255, 255, 255), (200, 40, 90))
MiB = 1 << 20


def flat_png(colour: tuple[int, int, int]) -> bytes:
    buf = io.BytesIO()
    Image.new("RGB", (SIDE, SIDE), colour).save(buf, format="PNG")
    return buf.getvalue()


def rss(pid: int, field: str = "VmRSS") -> int:
    """Bytes of `field` (VmRSS: now, VmHWM: peak since the last reset) of process `pid`."""
    for line in Path(f"/proc/{pid}/status").read_text().splitlines():
        if line.startswith(field + ":"):
            return int(line.split()[1]) * 1024
    raise AssertionError(f"{field} missing from /proc/{pid}/status")


def reset_peak(pid: int) -> None:
    Path(f"/proc/{pid}/clear_refs").write_text("5")  # resets VmHWM to the current RSS


def files(pngs: list[bytes]) -> list[tuple[str, tuple[str, bytes, str]]]:
    return [("files", (f"flat{i}.png", data, "image/png")) for i, data in enumerate(pngs)]


@pytest.fixture(scope="module")
def pngs() -> list[bytes]:
    return [flat_png(c) for c in COLOURS]


def test_large_requests_keep_peak_rss_bounded_and_give_memory_back(data_dir: Path, pngs: list[bytes]) -> None:
    colour_of = [i % len(COLOURS) for i in range(PER_REQUEST)]
    request_pngs = [pngs[c] for c in colour_of]
    assert sum(map(len, request_pngs)) < 20 * MiB  # under the body limit

    with live_server(data_dir) as server, httpx.Client(base_url=server.url, timeout=600) as http:
        pid = server.proc.pid
        # Each colour embedded alone: the vectors every answer below must carry.
        alone = []
        for png in pngs:
            answer = http.post("/embed", files=files([png]))
            assert answer.status_code == 200, answer.text
            alone.append(parse_vectors(answer)[0])
        alone_arr = np.stack(alone)  # [3, D]
        # The check can fail: the colours' vectors are told apart well beyond the tolerance.
        cosines = alone_arr @ alone_arr.T
        assert (cosines[~np.eye(len(COLOURS), dtype=bool)] < 1 - 1e-3).all(), cosines
        time.sleep(1.0)
        baseline = rss(pid)

        def embed() -> httpx.Response:
            return httpx.post(server.url + "/embed", files=files(request_pngs), timeout=600)

        def add(tag: str) -> httpx.Response:
            ids = [f"{tag}-{i}" for i in range(PER_REQUEST)]
            return httpx.post(server.url + "/items", files=files(request_pngs), data={"ids": ids}, timeout=600)

        def check_embed(answer: httpx.Response) -> bool:
            assert answer.status_code in (200, 413, 503), answer.text
            if answer.status_code != 200:
                return False
            np.testing.assert_allclose(parse_vectors(answer), alone_arr[colour_of], atol=1e-5)
            return True

        def check_items(answer: httpx.Response, tag: str) -> bool:
            assert answer.status_code in (201, 413, 503), answer.text
            if answer.status_code != 201:
                return False
            for c in range(len(COLOURS)):
                query = {"vector": alone_arr[c].tolist(), "k": 100}
                hits = {h["id"]: h["score"] for h in http.post("/search", json=query).json()["results"]}
                for i in range(c, PER_REQUEST, len(COLOURS)):
                    assert abs(hits[f"{tag}-{i}"] - 1.0) < 1e-5, (tag, i, hits.get(f"{tag}-{i}"))
            return True

        peaks = {}
        reset_peak(pid)
        assert check_embed(embed())
        peaks["embed, one"] = rss(pid, "VmHWM") - baseline
        reset_peak(pid)
        assert check_items(add("one"), "one")
        peaks["items, one"] = rss(pid, "VmHWM") - baseline

        with ThreadPoolExecutor(3) as pool:
            reset_peak(pid)
            answers = list(pool.map(lambda _: embed(), range(3)))
            peaks["embed, three"] = rss(pid, "VmHWM") - baseline
            assert sum(map(check_embed, answers)) >= 1
            reset_peak(pid)
            tags = [f"three{i}" for i in range(3)]
            answers = list(pool.map(add, tags))
            peaks["items, three"] = rss(pid, "VmHWM") - baseline
            assert sum(check_items(a, t) for a, t in zip(answers, tags, strict=True)) >= 1

        # One image more than the request's pixel budget allows: refused before decoding, numbers given.
        too_many = http.post("/embed", files=files([pngs[0]] * 28))  # 28 x 36 MP > 1 GP
        assert too_many.status_code == 413 and too_many.json()["error"]["code"] == "request_too_large"
        assert "1008000000 pixels" in too_many.json()["error"]["message"]

        time.sleep(2.0)
        after = rss(pid)

    report = ", ".join(f"{k}: +{v / MiB:.0f} MiB" for k, v in peaks.items())
    assert peaks["embed, one"] < 1024 * MiB and peaks["items, one"] < 1024 * MiB, report
    assert peaks["embed, three"] < 2048 * MiB and peaks["items, three"] < 2048 * MiB, report
    # Memory is returned: RSS ends near where it started, far below the peaks.
    assert after - baseline < 256 * MiB, f"RSS {baseline / MiB:.0f} MiB -> {after / MiB:.0f} MiB after; {report}"
