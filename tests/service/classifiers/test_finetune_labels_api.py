"""`POST /finetune-jobs` with labels given as for classifiers (`examples`, `label_key` over the
stored items): every bad input answers a clear 4xx before anything is queued; good labels get
as far as the queue (503 here: this app has no broker)."""

from __future__ import annotations

from pathlib import Path

import pytest
from fastapi.testclient import TestClient


@pytest.fixture
def run(data_dir: Path) -> str:
    """A run id with a checkpoint file: the route only checks that it exists."""
    path = data_dir / "jobs" / "pretrain-1" / "checkpoints" / "last.pt"
    path.parent.mkdir(parents=True)
    path.write_bytes(b"checkpoint")
    return "pretrain-1"


def post(client: TestClient, **body: object) -> tuple[int, str]:
    answer = client.post("/finetune-jobs", json=body)
    error = answer.json().get("error", {})
    return answer.status_code, error.get("code", "") + ": " + error.get("message", "")


@pytest.mark.parametrize(
    ("examples", "code", "says"),
    [
        ([("c0", "a"), ("c1", "a"), ("nope", "b"), ("gone", "b")], "unknown_items", "'nope', 'gone'"),
        ([("c0", "a"), ("c1", "a")], "one_class", "'a'"),
        ([("c0", "a"), ("c1", "a"), ("c2", "b")], "too_few_examples", "'b' (1)"),
        ([("c0", "a"), ("c1", 2.5)], "invalid_label", "float 2.5"),
        ([("c0", "a"), ("c1", True)], "invalid_label", "bool True"),
        ([("c0", "a"), ("c0", "b")], "conflicting_labels", "'c0'"),
    ],
)
def test_bad_examples_are_refused_with_what_to_fix(
    client: TestClient, indexed: list[str], run: str, examples: list[tuple[str, object]], code: str, says: str
) -> None:
    status, error = post(client, run=run, examples=[{"item_id": i, "label": lab} for i, lab in examples])
    assert (status, error.split(":")[0]) == (422, code) and says in error


def test_sources_are_exclusive_and_good_labels_reach_the_queue(
    client: TestClient, indexed: list[str], run: str
) -> None:
    assert post(client, run=run, label_key="label", dataset="x.npz")[0] == 422
    assert post(client, run=run)[0] == 422
    assert post(client, run=run, label_key="no-such-field")[1].startswith("no_examples")
    assert post(client, run="no-run", label_key="label")[1].startswith("no_checkpoint")
    status, error = post(client, run=run, label_key="label")
    assert (status, error.split(":")[0]) == (503, "jobs_unavailable")
