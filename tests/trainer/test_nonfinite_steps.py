"""A step whose loss or gradients are not finite is skipped instead of writing NaN into every
weight (bf16 on a CPU produced such steps now and then), and a run that stays non-finite stops
with an error a person can act on."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch

from service.contract.train_config import TrainConfig
from trainer.checkpoint import checkpoint_path, load_checkpoint, save_checkpoint
from trainer.engine import TrainingDivergedError, train

TINY = dict(image_size=16, small_stem=False, batch_size=8, num_workers=0, deterministic=True, log_every_steps=1)


def test_a_run_that_stays_non_finite_stops_with_an_actionable_error(tiny_npz: Path, tmp_path: Path) -> None:
    run = tmp_path / "run"
    train(TrainConfig(epochs=5, max_steps=1, **TINY), tiny_npz, run, resume=False)
    # Corrupt one weight of the saved run: from here every loss and gradient is NaN.
    state = load_checkpoint(checkpoint_path(run))
    name = next(k for k, v in state["method"].items() if k.endswith("weight") and v.dim() == 4)
    state["method"][name] = torch.full_like(state["method"][name], float("inf"))
    save_checkpoint(checkpoint_path(run), state)
    with pytest.raises(TrainingDivergedError, match=r"not finite for 10 steps in a row \(step 1[01],.*precision fp32"):
        train(TrainConfig(epochs=5, max_steps=20, **TINY), tiny_npz, run, resume=True)


def test_finite_runs_skip_nothing(tiny_npz: Path, tmp_path: Path) -> None:
    train(TrainConfig(epochs=1, max_steps=3, **TINY), tiny_npz, tmp_path / "run", resume=False)
    records = [json.loads(line) for line in (tmp_path / "run" / "metrics.jsonl").read_text().splitlines()]
    assert [r["skipped_steps"] for r in records if "loss" in r] == [0, 0, 0]
