"""MoCo v2 and BYOL jobs through `POST /train-jobs` to a served model (SimCLR's is in test_jobs.py).

Same real stack: Redis, a `simclr-embed worker` subprocess and the API under uvicorn. Each job is
a few steps on the real digits at 16 px; what matters is that every method's code path (config,
training loop, export of f alone, registry card, activation, ORT serving) holds end to end.
"""

from __future__ import annotations

from typing import Any

import numpy as np
import pytest
from _procs import wait_until
from jobstack import Stack
from test_jobs import png

pytestmark = [pytest.mark.integration, pytest.mark.slow]

STEPS = 3
METHOD_OPTIONS: dict[str, dict[str, Any]] = {
    # A queue of 4 batches, so the keys of steps 1-3 are enqueued and step 2 on meets real negatives.
    "moco_v2": {"queue_size": 64},
    "byol": {},  # the default 4096-wide projector and predictor
}


@pytest.mark.parametrize("method", sorted(METHOD_OPTIONS))
def test_method_job_runs_to_a_served_model(stack: Stack, method: str, job_datasets) -> None:
    job_id = stack.submit(method=method, max_steps=STEPS, activate=True, **METHOD_OPTIONS[method])
    done = stack.wait_state(job_id, "succeeded", 240)
    assert done["error"] is None and done["progress"]["step"] == STEPS
    losses = [loss for _, loss in done["loss_history"]]
    assert len(losses) == STEPS and all(np.isfinite(losses))

    model_id = done["model_id"]
    card = stack.registry.get(model_id)
    assert card.method == method and card.input_size == 16
    assert stack.registry.active() == model_id

    with np.load(job_datasets / "digits.npz") as data:
        images = np.repeat(data["x_test"][:2], 3, axis=-1)  # [2, 8, 8, 3] uint8, real scans
    files = [("files", (f"d{i}.png", png(image), "image/png")) for i, image in enumerate(images)]

    def served() -> dict | None:
        answer = stack.http.post("/embed", files=files)
        return answer.json() if answer.status_code == 200 and answer.json()["model_id"] == model_id else None

    embedded = wait_until(served, 30, f"/embed to serve {model_id}")
    vectors = np.asarray(embedded["embeddings"])  # [2, dim]
    assert embedded["dim"] == card.embedding_dim and vectors.shape == (2, card.embedding_dim)
    np.testing.assert_allclose(np.linalg.norm(vectors, axis=1), 1.0, atol=1e-4)
    assert not np.allclose(vectors[0], vectors[1])  # two different digits, two different points
