"""POST /embed: exact agreement with ONNX Runtime and torch, order, batching under load, hot swap."""

from __future__ import annotations

import base64
import re
import threading
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import httpx
import numpy as np
import pytest
from fastapi.testclient import TestClient
from PIL import Image

from service.contract.registry import ModelRegistry
from tests.service.conftest import DIM, MODEL_A, MODEL_B, Models, direct_ort, live_server, multipart, parse_vectors, png
from trainer.export import reference_embed


def test_embed_equals_direct_onnx_runtime_and_torch(
    client: TestClient, data_dir: Path, models: Models, photos: np.ndarray
) -> None:
    images = list(photos[:12])
    response = client.post("/embed", files=multipart([png(a) for a in images]))
    assert response.status_code == 200, response.text
    body = response.json()
    assert body["model_id"] == MODEL_A and body["dim"] == DIM
    got = parse_vectors(response)  # [12, D]
    expected = direct_ort(data_dir, MODEL_A, np.stack(images))
    assert got.shape == (12, DIM)
    np.testing.assert_allclose(got, expected, rtol=0, atol=1e-6)
    torch_ref = reference_embed(models.encoders[MODEL_A], np.stack(images))  # float64, independent preprocessing
    assert np.abs(got - torch_ref).max() < 1e-4
    np.testing.assert_allclose(np.linalg.norm(got, axis=1), 1.0, atol=1e-5)


def test_json_base64_and_multipart_agree_and_keep_order(client: TestClient, photos: np.ndarray) -> None:
    blobs = [png(a) for a in photos[20:26]]
    forward = parse_vectors(client.post("/embed", files=multipart(blobs)))
    reverse = client.post("/embed", json={"images": [base64.b64encode(b).decode() for b in blobs[::-1]]})
    assert reverse.status_code == 200, reverse.text
    np.testing.assert_array_equal(parse_vectors(reverse), forward[::-1])
    assert len({tuple(v) for v in forward}) == 6  # distinct images, distinct vectors


def test_larger_images_go_through_the_model_resize_policy(
    client: TestClient, data_dir: Path, photos: np.ndarray
) -> None:
    big = np.asarray(Image.fromarray(photos[3]).resize((96, 64), Image.Resampling.NEAREST))  # 64x96
    response = client.post("/embed", files=multipart([png(big)]))
    assert response.status_code == 200
    np.testing.assert_allclose(
        parse_vectors(response), direct_ort(data_dir, MODEL_A, [Image.fromarray(big)]), atol=1e-6
    )


def _batch_stats(metrics_text: str) -> tuple[float, float]:
    total = sum(float(v) for v in re.findall(r"^simclr_embed_batch_size_sum\{[^}]*\} (\S+)$", metrics_text, re.M))
    count = sum(float(v) for v in re.findall(r"^simclr_embed_batch_size_count\{[^}]*\} (\S+)$", metrics_text, re.M))
    return total, count


@pytest.mark.integration
def test_32_concurrent_clients_are_batched(data_dir: Path, photos: np.ndarray) -> None:
    """Real uvicorn; 32 clients each send 4 one-image requests; every answer is that image's."""
    expected = direct_ort(data_dir, MODEL_A, photos[:32])
    with live_server(data_dir, SIMCLR_EMBED_BATCH_MAX_WAIT_MS="5") as server:

        def client(i: int) -> list[np.ndarray]:
            with httpx.Client(base_url=server.url, timeout=30) as http:
                out = []
                for _ in range(4):
                    r = http.post("/embed", files=multipart([png(photos[i])]))
                    assert r.status_code == 200, r.text
                    out.append(parse_vectors(r)[0])
                return out

        with ThreadPoolExecutor(32) as pool:
            results = list(pool.map(client, range(32)))
        for i, vectors in enumerate(results):
            for v in vectors:
                np.testing.assert_allclose(v, expected[i], atol=1e-6)
        total, count = _batch_stats(httpx.get(server.url + "/metrics").text)
    assert total >= 128  # warm-up runs go around the batcher, so every counted image is a request's
    assert total / count > 1.0, f"mean batch size {total / count:.2f} over {count:.0f} runs"


@pytest.mark.integration
def test_hot_swap_while_embedding_loses_no_request(data_dir: Path, photos: np.ndarray) -> None:
    """16 clients embed without pause while B is activated through the API, then A again by
    another process writing models/active (as the worker does): every request answers 200
    with the vectors of the model it names."""
    images = photos[:16]
    expected = {m: direct_ort(data_dir, m, images) for m in (MODEL_A, MODEL_B)}
    stop = threading.Event()
    seen: list[str] = []
    started_after_swap: list[str] = []  # model ids of requests sent after activation returned
    swapped, back = threading.Event(), threading.Event()
    with live_server(data_dir, SIMCLR_EMBED_RETIRED_MODEL_TTL_S="0") as server:

        def client(i: int) -> int:
            done = 0
            with httpx.Client(base_url=server.url, timeout=30) as http:
                while not stop.is_set() or done < 3:
                    after_swap = swapped.is_set()
                    r = http.post("/embed", files=multipart([png(images[i]), png(images[(i + 1) % 16])]))
                    assert r.status_code == 200, r.text
                    model_id = r.json()["model_id"]
                    seen.append(model_id)
                    if after_swap and not back.is_set():
                        started_after_swap.append(model_id)
                    np.testing.assert_allclose(parse_vectors(r), expected[model_id][[i, (i + 1) % 16]], atol=1e-6)
                    done += 1
            return done

        with ThreadPoolExecutor(16) as pool:
            futures = [pool.submit(client, i) for i in range(16)]
            _wait_for(lambda: len(seen) >= 32)
            activated = httpx.post(server.url + f"/models/{MODEL_B}/activate", timeout=60)
            assert activated.status_code == 200, activated.text
            swapped.set()
            mark = len(seen)
            _wait_for(lambda: len(seen) >= mark + 32)
            back.set()
            ModelRegistry(data_dir / "models").activate(MODEL_A)  # another process's activation
            _wait_for(lambda: seen[-16:].count(MODEL_A) == 16)
            stop.set()
            counts = [f.result() for f in futures]
        assert httpx.get(server.url + "/healthz").status_code == 200
    assert all(c >= 3 for c in counts)
    assert seen[:mark].count(MODEL_A) > 0
    # in-flight requests may finish on A; every request sent after the swap returned uses B
    assert len(started_after_swap) >= 16 and set(started_after_swap) == {MODEL_B}


def _wait_for(check, timeout_s: float = 60.0) -> None:
    import time

    deadline = time.monotonic() + timeout_s
    while not check():
        assert time.monotonic() < deadline, "timed out"
        time.sleep(0.05)
